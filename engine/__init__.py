"""Training machinery that is not part of a model: the memory check before fitting (engine/memory.py)."""
