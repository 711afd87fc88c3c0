"""The library warnings a run cannot act on, filtered in this one place, each by its message, category and the
module that raises it, with the reason it is harmless. Warnings with a cause in this repository are fixed there
instead (loader workers and pinned memory: datamodules/base.py; W&B's anonymous setting: engine/loggers.py)."""

from __future__ import annotations

import warnings

# (message regex, category, module regex, why it is harmless)
KNOWN_HARMLESS = (
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
        "Lightning 2.6 builds torch's deprecated LeafSpec in its loaders' flattening: the same leaf, nothing to change",
    ),
)


def ignore_known_harmless() -> None:
    """Filter the warnings of ``KNOWN_HARMLESS`` in this process (and the loader workers it forks)."""
    for message, category, module, _why in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
