"""Loader throughput and bytes per sample of the shard layout; prints a table.

    python bench/loader.py --json loader.json            # real dims: T5-XXL 4096, CLIP-L 768
    python bench/loader.py --dims tiny                   # the tiny encoders' dims (32/24)
    python bench/loader.py --remote s3 --readahead 0 2   # also from a local S3 server (moto)
    python bench/loader.py --quick                       # seconds: smallest useful settings
    python bench/loader.py --reader fast                 # one reader only (default: both)

Data: synthetic but shaped like COCO at the base stage: 64 px JPEG crops of real photographs
(scikit-learn's two sample images), captions of COCO length (T5 tokens ~ N(15, 3) clipped to
[8, 30], EOS included), embeddings random float16 at the chosen dims (the loader's cost does not
depend on their values). Written with the real ShardWriter and read through the real
ShardDataModule, so the figures are those of training.

Bytes per sample: our layout (T5 stored with only its real tokens, float16) against the fixed
layout others use (T5 padded to 113 tokens, every embedding float32), both measured from tar
files holding the same samples (the fixed one for the first --fixed-samples samples).

Throughput: samples/s through the DataLoader with 1 and 2 worker processes after one warm-up
batch, per worker, and per CPU-second the workers actually used (read from /proc: on a loaded
machine this is the figure to hold against "samples/s per core"), for two consumers: CPU
training (the main process expands each batch to float32) and GPU training (the batch goes to
the GPU compact and is cast there; without a GPU, a copy into a reused host buffer stands in
for the transfer). The main process's own cost is shown per sample, and "all CPU-s" divides
the samples by the CPU-seconds of the workers and the main process together. Data sits in the
page cache. Each row is the median of --repeat trials; all trials are listed, since shared
machines are noisy.

Readers (`--reader`): every row is measured with the fast reader (data.reader=fast: mapped
tars, zero-copy members, tario.py) and with the webdataset one (data.reader=webdataset:
webdataset's pipeline and Python's tarfile, wds_reader.py), on the same shards, settings and
consumers, one after the other; a second table puts them side by side (samples/s, and CPU-µs
per sample over the workers and the main process together). Both yield the same batches.

Remote (`--remote s3`): the same shards uploaded to an S3-compatible server that the bench
starts itself (moto in server mode, a separate process on 127.0.0.1: offline, no account) and
read through the real remote path (s3fs ranged reads, readahead.py), once per `--readahead`
depth (0 = each shard fetched when the worker reaches it). The server's CPU-seconds are shown
per sample: on a small machine it competes with the workers for the same cores, which a real
object store does not. `--s3-latency-ms` delays every request, standing in for a network.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ediff_train.data.batching import release_slab
from ediff_train.data.datamodule import ShardDataModule
from ediff_train.data.shards import ShardWriter, npy_bytes
from ediff_train.io.remote import filesystem

DIMS = {
    "real": {"t5": 4096, "clip_txt": 768, "clip_pool": 768, "clip_img": 768},
    "tiny": {"t5": 32, "clip_txt": 32, "clip_pool": 24, "clip_img": 24},
}
FIXED_T5 = 113
WORDS = (
    "a man woman dog cat plate of food sitting on top table next to street with red large "
    "small white black two people standing in front building bus train kitchen"
).split()


def encoder_entry(d: dict[str, int]) -> dict[str, dict[str, Any]]:
    return {
        "t5": {
            "name": "bench-t5",
            "version": "1",
            "dim": d["t5"],
            "max_length": FIXED_T5,
            "dtype": "float16",
            "fingerprint": "bench",
        },
        "clip": {
            "name": "bench-clip",
            "version": "1",
            "text_dim": d["clip_txt"],
            "pool_dim": d["clip_pool"],
            "image_dim": d["clip_img"],
            "context_length": 77,
            "dtype": "float16",
            "fingerprint": "bench",
        },
    }


def make_samples(n: int, size: int, dims: dict[str, int], seed: int = 0):  # noqa: ANN201
    """Yield (key, uint8 image, caption, t5, clip_txt, clip_pool, clip_img), float16 arrays."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [np.asarray(p) for p in load_sample_images().images]
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(size, min(photo.shape[:2])))
        y = int(rng.integers(0, photo.shape[0] - side + 1))
        x = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = Image.fromarray(photo[y : y + side, x : x + side]).resize(
            (size, size), Image.Resampling.BICUBIC
        )
        length = int(np.clip(round(rng.normal(15, 3)), 8, 30))
        caption = " ".join(rng.choice(WORDS, size=max(1, round(length / 1.3))))
        f16 = np.float16
        yield (
            f"s{i:07d}",
            np.asarray(crop),
            caption,
            rng.standard_normal((length, dims["t5"]), dtype=np.float32).astype(f16),
            rng.standard_normal((77, dims["clip_txt"]), dtype=np.float32).astype(f16),
            rng.standard_normal(dims["clip_pool"], dtype=np.float32).astype(f16),
            rng.standard_normal(dims["clip_img"], dtype=np.float32).astype(f16),
        )


def write_fixed(path: Path, samples: list[tuple], image_format: str) -> None:
    """The same samples in the fixed layout: T5 zero-padded to 113 tokens, all float32."""
    from ediff_train.data.shards import encode_image

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, image, caption, t5, clip_txt, clip_pool, clip_img in samples:
            padded = np.zeros((FIXED_T5, t5.shape[1]), np.float32)
            padded[: len(t5)] = t5
            members = {
                image_format: encode_image(image, image_format)[0],
                "txt": caption.encode(),
                "t5.npy": npy_bytes(padded),
                "t5_mask.npy": npy_bytes(np.arange(FIXED_T5) < len(t5)),
                "clip_txt.npy": npy_bytes(clip_txt.astype(np.float32)),
                "clip_pool.npy": npy_bytes(clip_pool.astype(np.float32)),
                "clip_img.npy": npy_bytes(clip_img.astype(np.float32)),
                "json": json.dumps(
                    {"height": len(image), "source": "", "width": len(image[0])}
                ).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def measure(
    root: str,
    workers: int,
    batch_size: int,
    image_size: int,
    batches: int,
    consumer: str,
    readahead: int = 2,
    server: int | None = None,
    reader: str = "fast",
) -> dict[str, Any]:
    """One timed pass: wall rate, and CPU-seconds of the workers and of the main process.

    consumer "float32": the main process expands batches to float32 (CPU training).
    consumer "compact": GPU training (ShardDataModule.cast_on_device): the compact batch is
    copied once to the GPU, which casts it; without a GPU a host copy stands in for the
    transfer, then the slab goes back to its worker. `server`: pid of the S3 server, whose
    CPU-seconds are counted apart."""
    dm = ShardDataModule(
        root,
        batch_size=batch_size,
        image_size=image_size,
        num_workers=workers,
        shuffle_buffer=1000,
        batches_per_epoch=batches + 1,
        cast_on_device=consumer == "compact",
        rank=0,
        world_size=1,
        readahead=readahead,
        reader=reader,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    cuda = torch.cuda.is_available()

    staging = torch.empty(0, dtype=torch.uint8)  # like a driver's pinned staging buffer

    def consume(batch: dict[str, Any]) -> int:
        nonlocal staging
        if consumer == "compact" and batch.get("compact"):
            if cuda:
                moved = {
                    k: v.to("cuda", non_blocking=True) if torch.is_tensor(v) else v
                    for k, v in batch.items()
                }
                dm.on_after_batch_transfer(moved, 0)
            else:  # one thread, like a DMA engine: torch's pool would fight the workers
                tensors = [v for v in batch.values() if torch.is_tensor(v)]
                need = sum(v.nbytes for v in tensors)
                if staging.numel() < need:
                    staging = torch.empty(need + need // 4, dtype=torch.uint8)
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                off = 0
                for v in tensors:
                    staging[off : off + v.nbytes].view(v.dtype).view(v.shape).copy_(v)
                    off += v.nbytes
                torch.set_num_threads(threads)
                release_slab(batch.get("slab"), loader.dataset.slab_flags)
        return len(batch["key"])

    it = iter(loader)
    consume(next(it))  # warm-up: workers started, shuffle buffers filled
    pids = [p.pid for p in multiprocessing.active_children()] if workers else [os.getpid()]
    c0, m0 = sum(cpu_seconds(p) for p in pids), time.process_time()
    s0 = cpu_seconds(server) if server else 0.0
    t0, n = time.perf_counter(), 0
    for batch in it:
        n += consume(batch)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    cpu = sum(cpu_seconds(p) for p in pids) - c0
    main_cpu = time.process_time() - m0
    server_cpu = cpu_seconds(server) - s0 if server else None
    del it
    rate = n / wall
    return {
        "reader": reader,
        "consumer": consumer,
        "workers": workers,
        "readahead": readahead if server else None,
        "samples": n,
        "seconds": round(wall, 3),
        "samples_per_s": round(rate, 1),
        "samples_per_s_per_worker": round(rate / max(workers, 1), 1),
        "worker_cpu_s": round(cpu, 3),
        "samples_per_worker_cpu_s": round(n / cpu, 1) if cpu > 0 else None,
        "main_cpu_us_per_sample": round(main_cpu / n * 1e6, 1) if workers else None,
        "samples_per_cpu_s_all": round(n / (cpu + main_cpu), 1) if cpu + main_cpu > 0 else None,
        "server_cpu_us_per_sample": None if server_cpu is None else round(server_cpu / n * 1e6, 1),
    }


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The trial with the median per-CPU-second rate (shared machines are noisy), with the
    spread of all trials."""
    key = "samples_per_worker_cpu_s"
    ordered = sorted(runs, key=lambda r: r[key] or 0.0)
    out = dict(ordered[len(ordered) // 2])
    out["trials"] = [r[key] for r in runs]
    return out


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


# The server process runs this (what `python -m moto.server` runs, plus the delay), so it loads
# moto and werkzeug only. argv[1]: milliseconds added to every request.
SERVE_S3 = """
import logging, sys, time
from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

logging.getLogger("werkzeug").setLevel(logging.ERROR)
moto_app, delay = DomainDispatcherApplication(create_backend_app), float(sys.argv[1]) / 1000

def slow(environ, start_response):
    time.sleep(delay)
    return moto_app(environ, start_response)

server = make_server("127.0.0.1", 0, slow if delay > 0 else moto_app, threaded=True,
                     request_handler=MotoRequestHandler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def start_s3(latency_ms: float) -> subprocess.Popen:
    """moto's S3 server in its own process on 127.0.0.1 (a free port), with this process's AWS
    variables pointed at it (loader workers inherit them)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_S3, str(latency_ms)], stdout=subprocess.PIPE, text=True
    )
    port = proc.stdout.readline().strip() if proc.stdout else ""
    if not port.isdigit():
        proc.kill()
        sys.exit(
            "the S3 server did not start (see above); --remote s3 needs moto's server "
            "and s3fs: pip install 'moto[server]' s3fs"
        )
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches by arguments, not environment
    return proc


def upload_set(local: Path, url: str) -> None:
    fs, path = filesystem(url)
    fs.mkdir(path.split("/")[0])
    for f in sorted(local.iterdir()):
        fs.put_file(str(f), f"{path}/{f.name}")


def write_sets(
    tmp: Path, samples: list[tuple], dims: dict[str, int], a: argparse.Namespace
) -> tuple[Path, dict[str, float]]:
    """Our shards for the loader, and bytes per sample of both layouts on the same samples."""
    root = tmp / "ours"
    per_shard = -(-a.samples // a.shards)
    with ShardWriter(root, encoder_entry(dims), a.format, a.image_size, per_shard) as w:
        for key, image, caption, *emb in samples:
            w.write(key, image, caption, *emb)
    w.finish()
    ours = sum(f.stat().st_size for f in root.glob("*.tar")) / a.samples
    nf = min(a.fixed_samples, a.samples)  # the same samples in both layouts
    with ShardWriter(tmp / "same", encoder_entry(dims), a.format, a.image_size, nf) as w:
        for key, image, caption, *emb in samples[:nf]:
            w.write(key, image, caption, *emb)
    same = (tmp / "same" / "000000.tar").stat().st_size / nf
    write_fixed(tmp / "fixed.tar", samples[:nf], a.format)
    fixed = (tmp / "fixed.tar").stat().st_size / nf
    return root, {"ours": ours, "same": same, "fixed": fixed, "nf": nf}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smallest useful run (tests, a first "
        "look): tiny dims, 256 samples, 4 timed batches, 1 worker, 1 trial; any "
        "option given as well still applies",
    )
    p.add_argument("--dims", choices=sorted(DIMS), default="real")
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--format", choices=("jpg", "png"), default="jpg")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3, help="trials per row (median shown)")
    p.add_argument(
        "--consumers",
        nargs="+",
        choices=("float32", "compact"),
        default=["float32", "compact"],
        help="what the training process does "
        "with a batch: expand it on the CPU, or ship it compact to the GPU",
    )
    p.add_argument(
        "--reader",
        nargs="+",
        choices=("fast", "webdataset"),
        default=["fast", "webdataset"],
        help="data.reader values to measure, each on every row (side by side)",
    )
    p.add_argument("--fixed-samples", type=int, default=128)
    p.add_argument(
        "--remote",
        choices=("none", "s3"),
        default="none",
        help="also read the "
        "shards from a local S3 server (moto, started here) next to the local figures",
    )
    p.add_argument(
        "--readahead",
        type=int,
        nargs="+",
        default=[0, 2],
        help="remote rows: shards each worker fetches ahead (0 = off; training's default is 2)",
    )
    p.add_argument(
        "--s3-latency-ms",
        type=float,
        default=0.0,
        help="delay added to every S3 request (0: loopback as it is)",
    )
    p.add_argument("--root", type=Path, default=None, help="where to write (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(
            dims="tiny",
            samples=256,
            shards=4,
            batch_size=32,
            batches=4,
            workers=[1],
            repeat=1,
            consumers=["float32"],
            fixed_samples=32,
            readahead=[0, 1],
        )
    return p.parse_args(argv)


def num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def print_table(runs: list[dict[str, Any]]) -> None:
    print(
        f"{'source':>10} {'reader':>10} {'consumer':>8} {'workers':>7} {'samples/s':>10} "
        f"{'per worker':>11} "
        f"{'per worker-CPU-s':>17} {'main µs/sample':>15} {'per all CPU-s':>14} "
        f"{'server µs/sample':>17}  trials (per worker-CPU-s)"
    )
    for r in runs:
        trials = ", ".join(f"{t:,.0f}" for t in r["trials"] if t)
        print(
            f"{r['source']:>10} {r['reader']:>10} {r['consumer']:>8} {r['workers']:>7} "
            f"{r['samples_per_s']:>10,.0f} {r['samples_per_s_per_worker']:>11,.0f} "
            f"{num(r['samples_per_worker_cpu_s']):>17} {num(r['main_cpu_us_per_sample']):>15} "
            f"{num(r['samples_per_cpu_s_all']):>14} {num(r['server_cpu_us_per_sample']):>17}"
            f"  {trials}"
        )


def cpu_us_per_sample(r: dict[str, Any]) -> float | None:
    """CPU-µs one sample cost, workers and main process together (in-process: the process)."""
    rate = r["samples_per_cpu_s_all"] if r["workers"] else r["samples_per_worker_cpu_s"]
    return 1e6 / rate if rate else None


def print_side_by_side(runs: list[dict[str, Any]], readers: list[str]) -> None:
    """One line per (source, consumer, workers): each reader's samples/s and CPU-µs/sample."""
    rows: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in runs:
        rows.setdefault((r["source"], r["consumer"], r["workers"]), {})[r["reader"]] = r
    head = " ".join(f"{'samples/s ' + n:>20}" for n in readers)
    head += " " + " ".join(f"{'CPU-µs/sample ' + n:>24}" for n in readers)
    print(f"\nreaders side by side\n{'source':>10} {'consumer':>8} {'workers':>7} {head}")
    for (source, consumer, workers), by in rows.items():
        rates = " ".join(f"{by[n]['samples_per_s']:>20,.0f}" for n in readers)
        cost = " ".join(f"{num(cpu_us_per_sample(by[n])):>24}" for n in readers)
        print(f"{source:>10} {consumer:>8} {workers:>7} {rates} {cost}")


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    dims = DIMS[a.dims]
    server = start_s3(a.s3_latency_ms) if a.remote == "s3" else None
    try:
        with tempfile.TemporaryDirectory(dir=a.root) as tmp:
            samples = list(make_samples(a.samples, a.image_size, dims))
            tokens_mean = sum(len(s[3]) for s in samples) / a.samples
            root, size = write_sets(Path(tmp), samples, dims, a)
            del samples
            sources: list[tuple[str, str, int, int | None]] = [("local", str(root), 2, None)]
            if server is not None:
                upload_set(root, "s3://ediff-bench/ours")
                sources += [
                    (f"s3 ra={d}", "s3://ediff-bench/ours", d, server.pid) for d in a.readahead
                ]
            runs = []
            for name, url, depth, pid in sources:
                for c in a.consumers:
                    for k in a.workers:
                        for reader in a.reader:
                            trials = [
                                measure(
                                    url,
                                    k,
                                    a.batch_size,
                                    a.image_size,
                                    a.batches,
                                    c,
                                    depth,
                                    pid,
                                    reader,
                                )
                                for _ in range(max(a.repeat, 1))
                            ]
                            runs.append({"source": name, **median_run(trials)})
    finally:
        if server is not None:
            server.kill()
            server.wait()
    ours, same, fixed, nf = size["ours"], size["same"], size["fixed"], int(size["nf"])
    figures = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "setup": {
            "dims": dims,
            "image_size": a.image_size,
            "format": a.format,
            "samples": a.samples,
            "shards": a.shards,
            "batch_size": a.batch_size,
            "t5_tokens_mean": round(tokens_mean, 2),
            "readers": a.reader,
            "remote": a.remote,
            "s3_latency_ms": a.s3_latency_ms if server else None,
        },
        "bytes_per_sample": {
            "ours": round(ours),
            "ours_same_samples": round(same),
            "fixed_fp32_113_same_samples": round(fixed),
            "ratio": round(same / fixed, 4),
            "target_ratio": 0.125,
        },
        "loader": runs,
        "target_samples_per_core": 3000,
    }
    print(
        f"dims {dims}, {a.image_size} px {a.format}, T5 tokens mean {tokens_mean:.1f}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"bytes/sample: ours {ours:,.0f} (all {a.samples}); on the same {nf} samples ours "
        f"{same:,.0f} vs fixed fp32 113-token {fixed:,.0f}: ratio {same / fixed:.3f} "
        "(target ≤ 0.125)"
    )
    print_table(runs)
    if len(a.reader) > 1:
        print_side_by_side(runs, a.reader)
    print(
        "target: ≥ 3,000 samples/s per CPU core (a worker is one core: per worker-CPU-s; "
        "per all CPU-s adds the main process)"
    )
    if server is not None:
        print(
            f"s3 = moto server on 127.0.0.1 (this machine, {a.s3_latency_ms:g} ms added per "
            "request); ra = read-ahead depth per worker (0 = off)"
        )
    if a.json is not None:
        a.json.write_text(json.dumps(figures, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
