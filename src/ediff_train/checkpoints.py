"""Run-directory layout and the hand-off files between nodes (DESIGN §5).

`runs/<experiment>/<node>/` holds Lightning's `checkpoints/` (resume state, never read by other
nodes: `last.ckpt`, SLURM requeue `hpc_ckpt_N.ckpt`; files or DeepSpeed folders; resume.py),
`weights.safetensors` (model + EMA: what children and the sampler load), `node.json`
and the resolved `config.yaml`. Everything written here goes to a temp name first and is renamed
into place, so an interrupted run never leaves a half-written hand-off file. Everything read
here is weights-only (safetensors), so a shared run dir cannot execute code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ediff_train.errors import EdiffError, disk_full, is_disk_full

WEIGHTS = "weights.safetensors"
NODE_JSON = "node.json"
CONFIG = "config.yaml"
LAST_CKPT = "last.ckpt"


def node_dir(run_dir: str | os.PathLike, node: str) -> Path:
    return Path(run_dir) / node


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> Path:
    """safetensors file written atomically, readable as the umask allows (not owner-only)."""
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """A temp name next to `path` to write to, renamed over `path` when the block succeeds.

    On any failure the partial temp is removed, so nothing half-written stays (a full disk
    would otherwise be left fuller), and running out of space becomes one DiskFull line that
    names `path`, whose previous version is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if tmp.is_file():  # safetensors creates owner-only files: a shared run dir needs umask's
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(path, e) from None
        raise


def save_weights(
    path: str | os.PathLike,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Consolidated model + EMA weights under `model.` / `ema.` prefixes."""
    path = Path(path)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.items()})
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    return save_safetensors(path, tensors, meta)


def load_weights(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, EMA state dict, metadata) from a weights.safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise EdiffError(f"weights not found: {path} does not exist")
    model: dict[str, torch.Tensor] = {}
    ema: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            for key in f.keys():
                group, _, name = key.partition(".")
                (model if group == "model" else ema)[name] = f.get_tensor(key)
    except OSError as e:
        raise EdiffError(f"cannot read weights file {path}: {e.strerror or e}") from None
    except (SafetensorError, ValueError, RuntimeError) as e:
        # a copy cut short or overwritten: say which file and how to get a good one back
        raise EdiffError(
            f"weights file {path} is corrupt or truncated ({e}): retrain node "
            f"{path.parent.name} or copy its weights.safetensors again from where it was trained"
        ) from None
    if not model or not ema:
        raise EdiffError(f"{path} lacks model or EMA weights (keys must start with model./ema.)")
    return model, ema, meta


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace a small text file whole (never a truncated one after a crash or a full disk)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_node_json(ndir: str | os.PathLike) -> dict[str, Any]:
    path = Path(ndir) / NODE_JSON
    if not path.is_file():
        raise EdiffError(f"node info not found: {path} does not exist")
    return json.loads(path.read_text())


def parent_weights(run_dir: str | os.PathLike, parent: str, parent_dir: str | None = None) -> Path:
    """The parent's hand-off file; a missing one is an error naming the path."""
    ndir = Path(parent_dir) if parent_dir else node_dir(run_dir, parent)
    path = ndir / WEIGHTS
    if not path.is_file():
        raise EdiffError(
            f"parent {parent} has not finished training: {path} does not exist "
            f"(train it first: python train.py expert={parent} run_dir={run_dir})"
        )
    return path


def last_checkpoint(ndir: str | os.PathLike) -> Path | None:
    """The checkpoint a new run of this node would resume from (newest valid), if any."""
    from ediff_train.resume import resume_checkpoint  # Lightning: only imported when asked

    return resume_checkpoint(ndir, cleanup=False)


def load_train_config(ndir: str | os.PathLike) -> Any:
    """The resolved training config a node was trained with (its config.yaml)."""
    from omegaconf import OmegaConf

    path = Path(ndir) / CONFIG
    if not path.is_file():
        raise EdiffError(f"not a trained node: {path} does not exist")
    return OmegaConf.load(path)


def load_expert(ndir: str | os.PathLike, which: str = "ema") -> tuple[Any, torch.nn.Module]:
    """(Node, EDMPrecond denoiser) of a finished node, rebuilt from its config and weights."""
    from hydra.utils import instantiate

    from ediff_train.edm import EDMPrecond
    from ediff_train.experts import node_from_config

    if which not in ("ema", "model"):
        raise EdiffError(f"weights must be 'ema' or 'model', got {which!r}")
    cfg = load_train_config(ndir)
    model, ema, _ = load_weights(Path(ndir) / WEIGHTS)
    denoiser = EDMPrecond(instantiate(cfg.model))
    denoiser.load_state_dict(ema if which == "ema" else model)
    return node_from_config(cfg.expert), denoiser.eval().requires_grad_(False)


def load_encoders(cfg: Any) -> Any:
    """The encoders that embedded a config's shards: tiny ones saved next to the data, or the
    pretrained ones from the local paths in `encoders:`."""
    from ediff_train.encoders import Encoders, build_encoders

    enc = cfg.encoders
    if enc.get("kind", "tiny") == "tiny":
        return Encoders.load(enc.get("path") or Path(cfg.data.root) / "encoders")
    return build_encoders(**{k: v for k, v in enc.items() if k != "dims"})
