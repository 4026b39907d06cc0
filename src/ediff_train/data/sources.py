"""Inputs of data_prep/embed.py, cut into units of work.

Two layouts: a folder with `captions.jsonl` ({"image": relative path, "caption": text,
optional "key"} per line; cut into units of `unit_size` lines in file order), or a folder of
WebDataset tars as img2dataset writes them (key.jpg/png/webp + key.txt + key.json; one unit per
tar, in sorted name order). Units are numbered from the listing alone, so every process of a
job derives the same units without talking to the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ediff_train.data.tario import split_key, tar_members
from ediff_train.errors import EdiffError

log = logging.getLogger(__name__)

CAPTIONS = "captions.jsonl"
SOURCE_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-]")
Skip = Callable[[str, str, str], None]  # (reason, key, detail)


@dataclass(frozen=True)
class Record:
    """One captions.jsonl line."""

    key: str
    image: str
    caption: str


@dataclass(frozen=True)
class Unit:
    """The smallest piece of work: one output shard, written whole or not at all."""

    index: int
    name: str
    records: tuple[Record, ...] = ()
    tar: Path | None = None
    size: int | None = None  # samples, when known in advance


@dataclass
class Item:
    """One input sample: image bytes (tar input) or an image path (jsonl input)."""

    key: str
    caption: str
    data: bytes | bytearray | None = None
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Listing:
    kind: str  # "jsonl" | "tars"
    root: Path
    units: tuple[Unit, ...]
    fingerprint: str  # of the input listing: a finished job refuses a changed input

    @property
    def size(self) -> int | None:
        sizes = [u.size for u in self.units]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[misc]


def list_input(path: str | Path, unit_size: int = 5000) -> Listing:
    """The units of `path` (a captions.jsonl folder or file, or a folder of tars)."""
    root = Path(path)
    if not root.exists():
        raise EdiffError(f"input {root} does not exist")
    if unit_size < 1:
        raise EdiffError(f"unit_size must be ≥ 1, got {unit_size}")
    if root.is_file():
        if root.suffix != ".jsonl":
            raise EdiffError(f"input {root} is a file but not a .jsonl captions file")
        return _list_jsonl(root, unit_size)
    jsonl = root / CAPTIONS
    tars = sorted(p for p in root.glob("*.tar") if p.is_file())
    if jsonl.is_file() and tars:
        raise EdiffError(
            f"input {root} holds both {CAPTIONS} and .tar files; point input at "
            f"one of them (input={jsonl} for the captions)"
        )
    if jsonl.is_file():
        return _list_jsonl(jsonl, unit_size)
    if tars:
        return _list_tars(root, tars)
    raise EdiffError(f"input {root} holds neither {CAPTIONS} nor .tar files")


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not key or _BAD_KEY.search(key):
        raise EdiffError(f"{where}: key {key!r} must be non-empty letters, digits, '_' or '-'")
    return key


def _list_jsonl(path: Path, unit_size: int) -> Listing:
    raw = path.read_bytes()
    records: list[Record] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(raw.decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EdiffError(f"{where}: not a JSON object ({e.msg})") from None
        if not isinstance(obj, dict):
            raise EdiffError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        image, caption = obj.get("image"), obj.get("caption")
        if not isinstance(image, str) or not image:
            raise EdiffError(f'{where}: "image" must be a relative image path')
        if not isinstance(caption, str):
            raise EdiffError(f'{where}: "caption" must be a string')
        key = _check_key(obj["key"], where) if "key" in obj else f"{lineno:09d}"
        if key in seen:
            raise EdiffError(f"{where}: key {key!r} already used on line {seen[key]}")
        seen[key] = lineno
        records.append(Record(key, image, caption))
    if not records:
        raise EdiffError(f"{path} holds no captions")
    units = tuple(
        Unit(
            i,
            f"{path.name} records {start + 1}-{start + len(chunk)}",
            tuple(chunk),
            size=len(chunk),
        )
        for i, start in enumerate(range(0, len(records), unit_size))
        for chunk in [records[start : start + unit_size]]
    )
    digest = hashlib.sha256(raw).hexdigest()
    return Listing("jsonl", path.parent, units, f"sha256:{digest}")


def _list_tars(root: Path, tars: list[Path]) -> Listing:
    h = hashlib.sha256()
    units = []
    for i, tar in enumerate(tars):
        h.update(f"{tar.name}:{tar.stat().st_size}\n".encode())
        units.append(Unit(i, tar.name, tar=tar, size=_stats_count(tar)))
    return Listing("tars", root, tuple(units), f"sha256:{h.hexdigest()}")


def _stats_count(tar: Path) -> int | None:
    """Samples in an img2dataset tar, from its NNNNN_stats.json (for the progress bar)."""
    stats = tar.with_name(f"{tar.stem}_stats.json")
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def iter_unit(listing: Listing, unit: Unit, skip: Skip) -> Iterator[Item]:
    """The unit's samples in input order; unusable tar samples are reported to `skip`."""
    if listing.kind == "jsonl":
        for r in unit.records:
            yield Item(r.key, r.caption, path=listing.root / r.image, meta={"source": r.image})
        return
    assert unit.tar is not None
    yield from _iter_tar_samples(unit.tar, skip)


def _iter_tar_samples(path: Path, skip: Skip) -> Iterator[Item]:
    """Members grouped by key (WebDataset convention: a sample's files are adjacent)."""
    current: dict[str, Any] | None = None
    try:
        for name, data in tar_members(path):
            base, ext = split_key(name)
            if base is None or Path(base).name.startswith("_"):
                continue
            if current is not None and base != current["__key__"]:
                yield from _tar_item(current, path, skip)
                current = None
            if current is None:
                current = {"__key__": base}
            current[ext.lower()] = data
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as e:
        skip("truncated_tar", path.name, str(e))
        return  # the sample being read when the tar broke may be incomplete: dropped
    if current is not None:
        yield from _tar_item(current, path, skip)


def _tar_item(sample: dict[str, Any], path: Path, skip: Skip) -> Iterator[Item]:
    key = _BAD_KEY.sub("_", sample["__key__"])
    ext = next((e for e in SOURCE_IMAGE_EXTS if e in sample), None)
    if ext is None:
        skip("no_image", key, f"in {path.name}")
        return
    if "txt" not in sample:
        skip("no_caption", key, f"in {path.name}")
        return
    meta: dict[str, Any] = {"source": f"{path.name}/{sample['__key__']}.{ext}"}
    if "json" in sample:
        try:
            info = json.loads(bytes(sample["json"]))
        except (ValueError, UnicodeDecodeError):
            info = {}
        if isinstance(info, dict):
            meta.update({k: info[k] for k in ("url", "sha256") if k in info})
    caption = bytes(sample["txt"]).decode("utf-8", "replace").strip()
    yield Item(key, caption, data=sample[ext], meta=meta)
