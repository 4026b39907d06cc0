"""manifest.json of a shard set (docs/design.md §4): read, write, merge, and check against a model.

Checking happens before the first step so a shard set made with other encoders, dims or
dtypes is refused with one line instead of training on the wrong embeddings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ediff_train.errors import EdiffError
from ediff_train.io.remote import RETRY, Retry, brief, is_remote, join, normalize, read_text

FORMAT = "ediff-shards/1"
MANIFEST = "manifest.json"

# Keys of `expect` (from the model/encoder config) and where each lives in the manifest.
_CHECKS = {
    "t5_dim": ("t5", "dim"),
    "t5_name": ("t5", "name"),
    "clip_txt_dim": ("clip", "text_dim"),
    "clip_pool_dim": ("clip", "pool_dim"),
    "clip_img_dim": ("clip", "image_dim"),
    "clip_name": ("clip", "name"),
    "t5_fingerprint": ("t5", "fingerprint"),
    "clip_fingerprint": ("clip", "fingerprint"),
}


def new_manifest(encoders: dict[str, dict[str, Any]], image: dict[str, Any], **extra: Any) -> dict:
    """A manifest skeleton: encoders = {"t5": {...}, "clip": {...}}, image = {"format", "size"}."""
    return {"format": FORMAT, "encoders": encoders, "image": image, "shards": {}, **extra}


def write_manifest(root: str | os.PathLike, manifest: dict) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a manifest."""
    root = Path(root)
    manifest = dict(manifest)
    manifest["num_samples"] = int(sum(manifest.get("shards", {}).values()))
    path = root / MANIFEST
    tmp = root / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_manifest(root: str | os.PathLike, retry: Retry = RETRY) -> dict:
    """The manifest of a local shard set or one at a URL (remote.py, tried `retry` times),
    checked for its format."""
    if is_remote(root):
        path: str | Path = join(root, MANIFEST)
        try:
            text = read_text(str(path), retry, missing_ok=False)
        except FileNotFoundError as e:  # the backend's reason when it says more (no bucket)
            why = brief(e)
            why = "" if why.strip("/") in str(path) else f" ({why})"
            raise EdiffError(
                f"no shard set at {normalize(root)}: {path} does not exist{why}"
            ) from None
        assert text is not None
    else:
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise EdiffError(f"no shard set at {root}: {path} does not exist")
        text = path.read_text()
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise EdiffError(f"{path} is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise EdiffError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def merge_manifests(parts: list[dict]) -> dict:
    """One manifest from per-unit ones; their encoders and image settings must agree."""
    if not parts:
        raise EdiffError("no manifests to merge")
    first = parts[0]
    merged = {k: v for k, v in first.items() if k != "shards"}
    merged["shards"] = {}
    for part in parts:
        for key in ("encoders", "image", "codec"):
            if part.get(key) != first.get(key):
                raise EdiffError(f"cannot merge manifests: their {key!r} settings differ")
        overlap = merged["shards"].keys() & part["shards"].keys()
        if overlap:
            raise EdiffError(f"cannot merge manifests: shard {sorted(overlap)[0]} appears twice")
        merged["shards"].update(part["shards"])
    merged["num_samples"] = int(sum(merged["shards"].values()))
    return merged


def check_manifest(manifest: dict, expect: dict[str, Any], where: str = "shards") -> None:
    """Raise one EdiffError naming every field where the manifest differs from `expect`."""
    bad = []
    for key, want in expect.items():
        if want is None:
            continue
        if key not in _CHECKS:
            raise EdiffError(f"unknown manifest check {key!r}; known: {', '.join(_CHECKS)}")
        enc, field = _CHECKS[key]
        have = manifest.get("encoders", {}).get(enc, {}).get(field)
        if have != want:
            bad.append(f"{enc}.{field} is {have!r} but the model expects {want!r}")
    if bad:
        raise EdiffError(f"{where} do not match the model: " + "; ".join(bad))
