"""simfreeze: similarity-driven layer freezing for transfer learning (README, "How the code is laid out")."""
