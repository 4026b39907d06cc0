"""A schedule stage's own network: sized experts (docs/handoff.md, "Sized experts") name their
model per stage, as train.py overrides that follow the schedule's shared ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ediff_train.errors import EdiffError


def model_overrides(model: Any) -> list[str]:
    """A stage's own network (sized experts, docs/handoff.md): `model: dit_tiny`, or
    `model: {name: tiny, model_channels: 16}` → train.py's `model=…` and `model.<key>=…`."""
    if model is None:
        return []
    if isinstance(model, str):
        return [f"model={model}"]
    if not isinstance(model, Mapping):
        raise EdiffError(f"a stage's model: is a config name or a mapping, got {model!r}")
    items = dict(model)
    name = [f"model={items.pop('name')}"] if "name" in items else []
    values = [f"model.{k}={_value(v)}" for k, v in items.items()]
    return [*name, *values]


def _value(v: Any) -> str:
    """A value as a Hydra override writes it: [1, 2, 2], null, true, 16."""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
