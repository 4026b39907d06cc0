"""Unknown keys on train.py's command line, `+` or not, are refused in one line naming the
closest valid key: `+module.lrr=1e-3` would otherwise train at the default lr without a word,
and `module.lrr=1e-3` ends in Hydra's five lines advising the `+` that hides the typo.

The valid keys come from where they are defined: the settings classes (training/settings.py's
GROUPS) and conf/train.yaml's own keys. Keys of the other groups (model, data, trainer, ...)
are Hydra's to check; keys under an open mapping (`callbacks.<name>...`, `module.drop.<x>`) and
`hydra.*` are free, so `+callbacks.x._target_=...` keeps working.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ediff_train import CONF_DIR
from ediff_train.errors import EdiffError
from ediff_train.training.settings import GROUPS


def schema_keys(schema: type, prefix: str) -> tuple[set[str], set[str]]:
    """(every dotted key of a settings class, the open ones: mappings taking any key below)."""
    keys, open_keys = set(), set()
    for f in dataclasses.fields(schema):
        key = f"{prefix}.{f.name}"
        keys.add(key)
        sub = f.metadata.get("schema")
        if sub is not None:
            more, more_open = schema_keys(sub, key)
            keys |= more
            open_keys |= more_open
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, dict):
            open_keys.add(key)
    return keys, open_keys


def _yaml_keys(value: Any, prefix: str) -> tuple[set[str], set[str]]:
    keys, open_keys = {prefix}, set()
    if isinstance(value, dict):
        if not value:
            open_keys.add(prefix)  # `callbacks: {}`: named by the user
        for k, v in value.items():
            more, more_open = _yaml_keys(v, f"{prefix}.{k}")
            keys |= more
            open_keys |= more_open
    return keys, open_keys


def _group_name(entry: Any) -> str | None:
    if not isinstance(entry, dict) or not entry:
        return None
    name = str(next(iter(entry))).split()[-1]  # "optional tuning", "override hydra/..."
    return name.split("/")[0]


class KnownKeys:
    """The keys of a primary config (conf/<name>.yaml) and of its settings groups."""

    def __init__(self, conf: Path = CONF_DIR / "train.yaml") -> None:
        raw = OmegaConf.to_container(OmegaConf.load(conf), resolve=False)
        assert isinstance(raw, dict)
        self.groups = {g for g in map(_group_name, raw.pop("defaults", [])) if g}
        raw.pop("hydra", None)
        self.keys: set[str] = set()
        self.open: set[str] = set()
        for k, v in raw.items():
            more, more_open = _yaml_keys(v, str(k))
            self.keys |= more
            self.open |= more_open
        for group, schema in GROUPS.items():
            more, more_open = schema_keys(schema, group)
            self.keys |= more | {group}
            self.open |= more_open
        self.checked = set(GROUPS)  # groups whose keys are known here

    def valid(self, key: str) -> bool:
        head = key.split(".")[0]
        if head == "hydra" or key in self.keys or "@" in key:
            return True
        if any(key.startswith(o + ".") for o in self.open):
            return True
        return head in self.groups and head not in self.checked  # model.*, data.*: Hydra's

    def check(self, argv: list[str]) -> None:
        """EdiffError for the first override naming an unknown key."""
        for arg in argv:
            if arg.startswith("-") or "=" not in arg or arg.startswith("~"):
                continue
            key = arg.split("=", 1)[0].lstrip("+")
            if not key or self.valid(key):
                continue
            near = difflib.get_close_matches(key, sorted(self.keys), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]}?" if near else " (--cfg job lists the keys)"
            raise EdiffError(f"unknown key {key}{hint}")


def check_train_keys(argv: list[str]) -> None:
    KnownKeys().check(argv)
