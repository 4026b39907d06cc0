"""Training one node of the expert tree: the LightningModule, the loop, hand-off, resume."""

from typing import Any as _Any

from ediff_train.legacy import old_name as _old_name


def __getattr__(name: str) -> _Any:
    """Names the old `ediff_train.training` module exported say where they live now."""
    raise _old_name(__name__, name)
