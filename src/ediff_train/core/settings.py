"""Settings as dataclasses: each field carries its type, default and valid range in one place.

A settings class is registered in Hydra's ConfigStore as a config group option (its defaults,
as a plain node), so the YAML files do not spell the defaults again; `check` walks a composed
config against the class and refuses the first bad value in one line naming the key, the value
and what is valid, before anything is written. The node is stored untyped on purpose: a typed
node would make OmegaConf refuse `module.lr=fast` at composition with a multi-line error, before
this check can name it (docs/design.md §6).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from ediff_train.errors import EdiffError

Test = Callable[[Any], bool]


def number(value: Any) -> float | None:
    """The value as a float if it is a real number (bools and strings are not), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def whole(value: Any) -> int | None:
    """The value as an int if it is a whole number (1e3 counts; 2.5 does not), else None."""
    x = number(value)
    return int(x) if x is not None and math.isfinite(x) and x.is_integer() else None


def real(test: Callable[[float], bool] = lambda x: True) -> Test:
    """A finite real number passing `test`."""

    def ok(value: Any) -> bool:
        x = number(value)
        return x is not None and math.isfinite(x) and test(x)

    return ok


def count(low: int, high: int | None = None) -> Test:
    """A whole number in [low, high]."""

    def ok(value: Any) -> bool:
        n = whole(value)
        return n is not None and n >= low and (high is None or n <= high)

    return ok


def boolean(value: Any) -> bool:
    return isinstance(value, bool)


def one_of(*choices: Any) -> Test:
    return lambda value: value in choices


def optional(test: Test) -> Test:
    """None, or a value passing `test`."""
    return lambda value: value is None or test(value)


def setting(default: Any, valid: str | None = None, test: Test | None = None) -> Any:
    """A dataclass field with its default and, when `test` is given, its valid range."""
    meta = {"valid": valid, "test": test}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: _copy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def defaults(schema: type) -> dict[str, Any]:
    """The class's defaults as plain containers (what the ConfigStore holds)."""
    return dataclasses.asdict(schema())


def plain(value: Any) -> Any:
    """OmegaConf containers as Python ones, so a message shows `[0.9, 1.0]`, not ListConfig."""
    if hasattr(value, "items"):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [plain(v) for v in value]
    return value


def check(values: Any, schema: type, prefix: str) -> None:
    """EdiffError for the first value in `values` (a mapping) that the schema refuses; keys the
    config lacks are not checked (a preset may drop a group)."""
    if values is None:
        return
    for f in dataclasses.fields(schema):
        if f.name not in values:
            continue
        value, key = values[f.name], f"{prefix}.{f.name}" if prefix else f.name
        sub = f.metadata.get("schema")
        if sub is not None:
            check(value, sub, key)
            continue
        test = f.metadata.get("test")
        if test is not None and not test(value):
            raise EdiffError(f"{key} must be {f.metadata['valid']}, got {plain(value)!r}")


def nested(schema: type) -> Any:
    """A field holding another settings class, checked under its own key."""
    return dataclasses.field(default_factory=schema, metadata={"schema": schema})
