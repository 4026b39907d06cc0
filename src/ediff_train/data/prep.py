"""The embedding job behind data_prep/embed.py: input units → §4 shards, restartable, split
over any number of independent processes.

Completion, per unit: ShardWriter writes `NNNNNN.tar` under a temporary name and renames it when
complete; then `parts/NNNNNN.json` (the unit's manifest, keys and skip counts) is written
atomically. A unit is done only when its part exists, so a process killed at any moment leaves
done units and units the next run redoes from scratch (with the same bytes: shards are
deterministic). Task t of N takes units t, t+N, ...; any N works on a re-run, because done units
are skipped. `manifest.json` is written when every unit's part exists, by whichever task sees
that first, and never rewritten with equal content: re-running a finished job changes no file.
`job.json` pins the settings; a re-run with another input, stage or encoders is refused.
The output may be an object-store URL (s3://, gs://): store.py keeps the same rules there.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ediff_train.data.images import ImageSkip, ImageSpec, prepare_image, read_source
from ediff_train.data.latents import encode_stored
from ediff_train.data.manifest import MANIFEST, merge_manifests
from ediff_train.data.prep_tasks import (
    TaskReport,
    _diff,
    _Skips,
    _torch_threads,
    resolve_task,  # noqa: F401  (its old home)
)
from ediff_train.data.shards import ShardWriter, encode_image
from ediff_train.data.sources import Item, Listing, Unit, iter_unit, list_input
from ediff_train.data.store import LocalStore, load_json, open_store
from ediff_train.errors import EdiffError

log = logging.getLogger(__name__)

PREP_FORMAT = "ediff-prep/1"
JOB_FILE = "job.json"
PARTS = "parts"
ENCODERS_DIR = "encoders"
SKIP_REASONS = (
    "missing_image",
    "bad_image",
    "too_small",
    "no_image",
    "no_caption",
    "truncated_tar",
    "duplicate_key",
    "nonfinite",
    "low_similarity",
)
_PART_ONLY = ("unit", "source", "keys", "skipped", "bytes", "compute")
_ONE_SHARD = 10**12  # samples_per_shard: a unit is exactly one shard


@dataclass(frozen=True)
class PrepConfig:
    input: str | Path
    output: str | Path
    image: ImageSpec
    unit_size: int = 5000  # jsonl records per unit (tar input: one unit per tar)
    batch_size: int = 64
    sort_window: int = 1024  # samples whose captions are sorted by T5 length before batching
    workers: int = 4  # image decode/resize threads (0: in the calling thread)
    clip_min_similarity: float | None = None


class EmbedJob:
    """One shard set being made from one input; `run` does one task's share."""

    def __init__(
        self, cfg: PrepConfig, encoders: Any, listing: Listing | None = None, codec: Any = None
    ) -> None:
        self.cfg, self.enc = cfg, encoders
        # a VAE codec (nn/codec.py): each sample's latent is encoded once, into the shards
        self.codec = None if codec is None or codec.is_identity else codec
        self.codec_spec = self.codec.spec() if self.codec is not None else None
        self.listing = listing or list_input(cfg.input, cfg.unit_size)
        self.store = open_store(cfg.output)
        if (
            isinstance(self.store, LocalStore)
            and self.store.root.resolve() == self.listing.root.resolve()
        ):
            raise EdiffError("output must not be the input folder")
        self.entry = encoders.manifest_entry()
        self._done: set[str] | None = None  # part files, from one listing per run

    # ------------------------------------------------------------------ settings and encoders
    def job_record(self) -> dict[str, Any]:
        inp: dict[str, Any] = {
            "kind": self.listing.kind,
            "digest": self.listing.fingerprint,
            "units": len(self.listing.units),
        }
        if self.listing.kind == "jsonl":
            inp["unit_size"] = self.cfg.unit_size
        return {
            "format": PREP_FORMAT,
            "input": inp,
            "image": asdict(self.cfg.image),
            "clip_min_similarity": self.cfg.clip_min_similarity,
            "encoders": self.entry,
            **({"codec": self.codec_spec} if self.codec_spec else {}),
        }

    def _claim_output(self) -> None:
        """Create or check job.json, save the encoders next to the shards."""
        self.store.prepare(PARTS)
        record = self.job_record()
        self.store.create_text(JOB_FILE, json.dumps(record, indent=1, sort_keys=True))
        have = load_json(self.store.read_text(JOB_FILE), str(self.store.place(JOB_FILE)))
        bad = _diff(record, have)
        if bad:
            raise EdiffError(
                f"{self.store.root} was started with other settings "
                f"({', '.join(bad)} differ); continue it with the same ones, or use "
                "a new output"
            )
        self._save_encoders()

    def _save_encoders(self) -> None:
        """Tiny encoders' weights (pretrained ones: their paths) in output/encoders, where the
        trainer and sampler look; saved once, under a temporary name, then renamed."""
        target, marker = self.store.place(ENCODERS_DIR), f"{ENCODERS_DIR}/encoders.json"
        if self.store.read_text(marker) is None:
            tmp = self.store.staging / f".{ENCODERS_DIR}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
            self.enc.save(tmp)
            self.store.put_dir(tmp, ENCODERS_DIR)  # unless another task saved them first
        try:
            saved = json.loads(self.store.read_text(marker) or "")["fingerprints"]
        except (ValueError, KeyError, TypeError) as e:
            raise EdiffError(f"{target} is not a saved encoders folder ({e})") from None
        mine = {"t5": self.entry["t5"]["fingerprint"], "clip": self.entry["clip"]["fingerprint"]}
        if saved != mine:
            raise EdiffError(f"{target} holds other encoders than this job's")

    # ------------------------------------------------------------------ running
    def is_done(self, unit: Unit) -> bool:
        if self._done is None:
            self._done = set(self.store.names(PARTS))
        return f"{unit.index:06d}.json" in self._done

    def run(
        self,
        task_id: int = 0,
        num_tasks: int = 1,
        max_units: int | None = None,
        progress: bool = True,
        finalize: bool = True,
        cpu_threads: int | None = None,
    ) -> TaskReport:
        """Embed this task's units that are not done yet; then finish the job if complete."""

        mine = [u for u in self.listing.units if u.index % num_tasks == task_id]
        report = TaskReport(task_id, num_tasks, len(self.listing.units), len(mine))
        self._claim_output()
        self._done = None  # list the parts afresh
        todo = [u for u in mine if not self.is_done(u)]
        report.done_before = len(mine) - len(todo)
        if max_units is not None:
            todo = todo[: max(0, max_units)]
        sizes = [u.size for u in todo]
        total = None if None in sizes else sum(sizes)  # type: ignore[arg-type]
        bar = tqdm(
            total=total,
            unit="sample",
            disable=not progress or not todo,
            desc=f"task {task_id}/{num_tasks}",
            dynamic_ncols=True,
            smoothing=0.1,
        )
        threads = ThreadPoolExecutor(self.cfg.workers) if self.cfg.workers > 0 else None
        try:
            with bar, _torch_threads(cpu_threads):
                for unit in todo:
                    bar.set_postfix_str(f"unit {unit.index}", refresh=False)
                    part = self._run_unit(unit, bar, threads)
                    report.embedded += 1
                    report.written += part["num_samples"]
                    report.skipped.update(part["skipped"])
        finally:
            if threads is not None:
                threads.shutdown(cancel_futures=True)
        self._done = None  # other tasks may have finished units meanwhile
        if finalize and max_units is None:
            report.manifest = self.finalize()
        report.units_complete = sum(self.is_done(u) for u in self.listing.units)
        return report

    def _run_unit(self, unit: Unit, bar: Any, threads: ThreadPoolExecutor | None) -> dict[str, Any]:
        name = f"{unit.index:06d}.tar"
        self.store.clean(name)  # temporaries left by a killed run
        skips, keys = _Skips(), []
        writer = ShardWriter(
            self.store.staging,
            self.entry,
            image_format=self.cfg.image.format,
            image_size=self.cfg.image.size,
            samples_per_shard=_ONE_SHARD,
            start_index=unit.index,
            codec=self.codec_spec,
        )
        items = iter_unit(self.listing, unit, skips)
        seen: set[str] = set()
        with writer:
            while window := list(itertools.islice(items, self.cfg.sort_window)):
                rows = self._embed_window(window, skips, threads)
                latents = self._latents([image.stored for _, image, _ in rows])
                for (item, image, emb), latent in zip(rows, latents):
                    if item.key in seen:
                        skips("duplicate_key", item.key)
                        continue
                    seen.add(item.key)
                    meta = {
                        **item.meta,
                        "original_width": image.width,
                        "original_height": image.height,
                        **emb.pop("meta"),
                    }
                    writer.write(
                        item.key, image.stored, item.caption, meta=meta, latent=latent, **emb
                    )
                    keys.append(item.key)
                bar.update(len(window))
        if name not in writer.shards:  # nothing usable: no shard (drop one from a crash)
            self.store.remove(name)
        sizes = {n: (self.store.staging / n).stat().st_size for n in writer.shards}
        for n in writer.shards:
            self.store.publish(n)  # remote: uploaded whole, before the part that marks it done
        part = writer.manifest(**self._extras())
        part.update(
            unit=unit.index,
            source=unit.name,
            keys=keys,
            skipped={r: int(skips.get(r, 0)) for r in SKIP_REASONS},
            bytes=sizes,
            compute={"device": str(self.enc.device), "dtype": str(self.enc.dtype)},
        )
        self.store.write_text(
            f"{PARTS}/{unit.index:06d}.json", json.dumps(part, indent=1, sort_keys=True)
        )
        return part

    def _latents(self, stored: list[bytes]) -> list[Any]:
        """The codec's latents of these stored images (None each without a VAE codec)."""
        if self.codec is None:
            return [None] * len(stored)
        return encode_stored(self.codec, stored, self.cfg.image.size, self.cfg.batch_size)

    def _prepare(self, item: Item) -> Any:
        try:
            data = read_source(item.data, item.path)
            image = prepare_image(data, self.cfg.image, self.enc.image_size)
        except ImageSkip as s:
            return s
        if not isinstance(image.stored, bytes):  # encode here: in parallel, and it is smaller
            image.stored = encode_image(image.stored, self.cfg.image.format)[0]
        return image

    def _embed_window(
        self, window: list[Item], skip: _Skips, threads: ThreadPoolExecutor | None
    ) -> list[tuple[Item, Any, dict[str, Any]]]:
        """Images prepared (in threads), captions embedded in batches of similar T5 length."""
        prepared = list(
            threads.map(self._prepare, window) if threads else map(self._prepare, window)
        )
        ok = []
        for item, image in zip(window, prepared):
            if isinstance(image, ImageSkip):
                skip(image.reason, item.key, str(image))
            else:
                ok.append((item, image))
        if not ok:
            return []
        emb = self._encode([it.caption for it, _ in ok], [im.clip for _, im in ok])
        out = []
        for (item, image), e in zip(ok, emb):
            if e is None:
                skip("nonfinite", item.key, "an embedding overflows float16")
                continue
            if (
                self.cfg.clip_min_similarity is not None
                and e["meta"]["clip_similarity"] < self.cfg.clip_min_similarity
            ):
                skip("low_similarity", item.key, f"{e['meta']['clip_similarity']:.3f}")
                continue
            out.append((item, image, e))
        return out

    def _encode(
        self, captions: list[str], clip_images: list[np.ndarray]
    ) -> list[dict[str, Any] | None]:
        enc, bs = self.enc, self.cfg.batch_size
        ids = enc.t5_tokenizer(captions, truncation=True, max_length=enc.t5_max_length)
        order = sorted(range(len(captions)), key=lambda i: len(ids["input_ids"][i]))
        rows: list[dict[str, Any]] = [{} for _ in captions]
        for start in range(0, len(order), bs):
            chunk = order[start : start + bs]
            text = enc.encode_text([captions[i] for i in chunk], batch_size=len(chunk))
            for j, i in enumerate(chunk):
                rows[i].update(
                    t5=text["t5"][j], clip_txt=text["clip_txt"][j], clip_pool=text["clip_pool"][j]
                )
        for start in range(0, len(clip_images), bs):
            x = torch.from_numpy(np.stack(clip_images[start : start + bs])).permute(0, 3, 1, 2)
            img = enc.encode_image(x.float().div_(255.0), batch_size=bs)
            for j, row in enumerate(rows[start : start + bs]):
                row["clip_img"] = img[j]
        out: list[dict[str, Any] | None] = []
        for row in rows:
            arrays = {k: v.numpy().astype(np.float16) for k, v in row.items()}
            if not all(np.isfinite(a).all() for a in arrays.values()):
                out.append(None)
                continue
            sim = torch.nn.functional.cosine_similarity(row["clip_pool"], row["clip_img"], dim=0)
            out.append({**arrays, "meta": {"clip_similarity": round(float(sim), 4)}})
        return out

    # ------------------------------------------------------------------ finishing
    def _extras(self) -> dict[str, Any]:
        job = self.job_record()
        return {
            "created_by": "data_prep/embed.py",
            "prep": {k: job[k] for k in ("input", "image", "clip_min_similarity")},
        }

    def finalize(self) -> Path | str | None:
        """manifest.json from all unit parts, if every unit is done; None otherwise."""
        if not all(self.is_done(u) for u in self.listing.units):
            return None
        names = [f"{PARTS}/{u.index:06d}.json" for u in self.listing.units]
        parts = [
            load_json(text, str(self.store.place(n)))
            for n, text in zip(names, self.store.read_many(names))
        ]
        owner: dict[str, int] = {}
        stored = self.store.names()
        for part in parts:
            for name, size in part["bytes"].items():
                if stored.get(name) != size:
                    raise EdiffError(
                        f"{self.store.place(name)} is missing or changed since its "
                        f"unit finished; delete {PARTS}/{part['unit']:06d}.json "
                        "and re-run"
                    )
            for key in part["keys"]:
                if key in owner:
                    raise EdiffError(
                        f"sample key {key!r} occurs in units {owner[key]} and "
                        f"{part['unit']}; input keys must be unique"
                    )
                owner[key] = part["unit"]
        merged = merge_manifests(
            [{k: v for k, v in p.items() if k not in _PART_ONLY} for p in parts]
        )
        skipped = sum((Counter(p["skipped"]) for p in parts), Counter())
        merged["skipped"] = {r: int(skipped.get(r, 0)) for r in SKIP_REASONS}
        merged["units"] = len(parts)
        text = json.dumps(
            {**merged, "num_samples": sum(merged["shards"].values())}, indent=1, sort_keys=True
        )
        if self.store.read_text(MANIFEST) != text:  # a finished job's re-run changes no file
            self.store.write_text(MANIFEST, text)
        return self.store.place(MANIFEST)
