"""The round engine: drives any method through its rounds (task/engine/rounds.py)."""
