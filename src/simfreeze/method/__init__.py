"""The method: how many layers to freeze from S (plan), measuring S (similarity), applying a plan (freeze)."""
