"""Where and how a job of ``python -m train`` runs (``job``) and the command line's contract (``command``)."""
