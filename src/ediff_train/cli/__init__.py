"""Glue shared by the Hydra entry points: node configs in the ConfigStore, early checks of the
command line, and turning EdiffError into one line on stderr with a non-zero exit.

Tree nodes are registered in code rather than as 2,047 files: levels 0–3 always (so `--help`
lists them), and any other node when the command line names it, which keeps start-up fast.
"""

from __future__ import annotations

import functools
import math
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ediff_train import CONF_DIR
from ediff_train.core.experts import parse_node
from ediff_train.core.settings import defaults
from ediff_train.errors import EdiffError, user_error
from ediff_train.sampling.settings import SamplerSettings
from ediff_train.training.settings import GROUPS, NAMED_OPTIONS

# conf/model/*.yaml: image_size = ${floordiv:${data.image_size},${codec.downsample}}, the
# backbone's size in the codec's space (docs/latent.md)
if not OmegaConf.has_resolver("floordiv"):
    OmegaConf.register_new_resolver("floordiv", lambda a, b: int(a) // int(b))


def _interval(lo: float, hi: float) -> list[Any]:
    return [lo, hi if math.isfinite(hi) else "inf"]


def node_config(name: str) -> dict[str, Any]:
    """The `expert:` group entry for a named node, with its intervals for `--cfg job`."""
    node = parse_node(name)
    one = len(node.pieces) == 1
    return {
        "name": node.name,
        "kind": node.kind,
        "parent": None,  # null = the tree parent (complements: the root)
        "quantile": list(node.pieces[0]) if one else [list(p) for p in node.pieces],
        "sigma": (
            _interval(*node.sigma_pieces[0]) if one else [_interval(*p) for p in node.sigma_pieces]
        ),
    }


def register_settings() -> None:
    """Store each settings class's defaults as its group's `default` option (conf/train.yaml's
    defaults list names them) and the sampler's (conf/sampling/config.yaml): the defaults live
    in the dataclasses, not in YAML. Run when this module is imported, so code that composes
    the configs with Hydra's compose API imports `ediff_train.cli` first."""
    cs = ConfigStore.instance()
    for group, schema in GROUPS.items():
        cs.store(group=group, name="default", node=defaults(schema))
    for group, (field, values) in NAMED_OPTIONS.items():  # init=slice: the defaults, mode=slice
        for value in values:
            cs.store(group=group, name=value, node={**defaults(GROUPS[group]), field: value})
    cs.store(group="sampler", name="default", node=defaults(SamplerSettings))


def register_nodes(names: list[str] | None = None, always_levels: int = 3) -> None:
    """Store the shallow tree levels plus the named nodes as `expert` group options, and the
    settings groups (train.yaml composes both)."""
    register_settings()
    cs = ConfigStore.instance()
    shallow = [f"E{lv}_{i}" for lv in range(always_levels + 1) for i in range(2**lv)]
    for name in dict.fromkeys(shallow + list(names or [])):
        cs.store(group="expert", name=name, node=node_config(name))


def expert_overrides(argv: list[str]) -> list[str]:
    """Values given to `expert=` on the command line (comma lists for multirun included)."""
    values: list[str] = []
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key == "expert":
            values.extend(v.strip() for v in value.split(",") if v.strip())
    return values


def check_expert_overrides(argv: list[str], conf_dir: Path = CONF_DIR) -> list[str]:
    """Validate node names before Hydra sees them; return those that need registering."""
    files = {p.stem for p in (conf_dir / "expert").glob("*.yaml")}
    names = []
    for value in expert_overrides(argv):
        if value not in files:
            names.append(parse_node(value).name)  # raises EdiffError with the valid range
    return names


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def entry_point(
    main: Callable[[], Any],
    register: bool = True,
    check_keys: Callable[[list[str]], None] | None = None,
) -> Callable[[], Any]:
    """Wrap a Hydra main: check `expert=` (and, with `check_keys`, every key: cli/keys.py)
    first, register nodes, report EdiffError in one line.

    Apps whose `expert` is a plain key rather than the config group (sample.py) pass
    register=False, or Hydra would read `expert=E0_0` as a group choice."""

    @functools.wraps(main)
    def run() -> Any:
        try:
            if check_keys is not None:
                check_keys(sys.argv[1:])
            extra = check_expert_overrides(sys.argv[1:])
        except EdiffError as e:
            fail(str(e))
        if register:
            register_nodes(extra)
        return main()

    return run


def reporting_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Inside the Hydra task: EdiffError, or a full disk anywhere, becomes `error: ...` and exit
    code 2, no traceback."""

    @functools.wraps(task)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except EdiffError as e:
            fail(str(e))
        except Exception as e:  # Hydra's instantiate and Lightning's hooks wrap the real error
            err = user_error(e)
            if err is None:
                raise
            fail(str(err))

    return run


def check_writable(path: str | Path, key: str) -> Path:
    """Create `path` and a scratch file in it; EdiffError naming `key` if either fails."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        where = f": {e.filename}" if e.filename and str(e.filename) != str(path) else ""
        raise EdiffError(
            f"{key}={path} cannot be created or written ({e.strerror or e}{where}); "
            f"choose a folder you can write to"
        ) from None
    return path


class WritableDirs(Callback):
    """Hydra callback (`hydra.callbacks` in an app's config): check the output folders before
    Hydra creates its own folder inside them, which would fail with a traceback instead."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = list(keys)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            for key in self.keys:
                value = OmegaConf.select(config, key)
                if value is not None:
                    check_writable(str(value), key)
        except EdiffError as e:
            fail(str(e))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Swept values are unknown here (each job's app checks its own); the sweep folder's
        # parent is fixed (its last part holds the time, which may tick before Hydra's mkdir).
        try:
            check_writable(
                Path(str(OmegaConf.select(config, "hydra.sweep.dir"))).parent, "hydra.sweep.dir"
            )
        except EdiffError as e:
            fail(str(e))


_python_warning = warnings.formatwarning


def _one_line_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: Any = None
) -> str:
    """This package's warnings as one `warning: ...` line (they say what to do); others as
    Python shows them."""
    if f"{Path('ediff_train')}" in str(filename):
        return f"warning: {message}\n"
    return _python_warning(message, category, filename, lineno, line)


warnings.formatwarning = _one_line_warning
register_settings()
