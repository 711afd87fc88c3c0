"""Training machinery that is not part of a model: the memory check before fitting (engine/memory.py), the
activation layout chosen per machine (engine/layout.py), what machine this is (engine/machine.py)."""
