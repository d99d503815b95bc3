"""simfreeze: similarity-driven layer freezing for transfer learning."""

__version__ = "0.1.0"
