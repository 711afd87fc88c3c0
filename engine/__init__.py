"""Training machinery that is not part of a model (docs/ARCHITECTURE.md §4): the config resolvers (config.py),
callbacks, checkpoint saving and loading, loggers, guards for multi-process runs, the memory check before fitting,
the activation layout chosen per machine, and what machine this is."""
