"""Tasks and data: splits (pure) → images → the datamodule."""
