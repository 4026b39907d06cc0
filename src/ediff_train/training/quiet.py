"""Quiet by default: each log line once, and only warnings a user can act on.

Lightning's `lightning` logger has its own console handler (`INFO: ...` on stderr) and also
passes each record up to the root logger, where Hydra's handler printed it a second time as
`[...][HYDRA] ...` on stdout. The warnings filtered here say nothing a user can change: an
internal deprecation inside Lightning, the `__len__` of our IterableDataset (the shard stream
splits its data by worker itself), an advertisement.
"""

from __future__ import annotations

import logging
import warnings

_NOT_ACTIONABLE = (
    r".*isinstance\(treespec, LeafSpec\)",  # inside Lightning's own _pytree
    r"Your `IterableDataset` has `__len__` defined",  # ShardStream splits by worker itself
)


def _no_tips(record: logging.LogRecord) -> bool:
    return "💡 Tip" not in str(record.msg)


def quiet_logging() -> None:
    """Called once per process before the Trainer exists; idempotent."""
    lightning = logging.getLogger("lightning")
    lightning.propagate = False
    for handler in lightning.handlers:
        if _no_tips not in handler.filters:
            handler.addFilter(_no_tips)
    for pattern in _NOT_ACTIONABLE:
        warnings.filterwarnings("ignore", message=pattern)
