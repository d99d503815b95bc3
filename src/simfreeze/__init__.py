"""simfreeze: similarity-driven layer freezing for transfer learning (docs/architecture.md, "How the code is laid out")."""
