"""Shard sets at a URL: embed into a real local S3 server (moto), train and sample from it;
HTTP drops retried then skipped and counted; pipe: roots; bad URLs as one-line errors."""

from __future__ import annotations

import http.server
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, run_env
from test_embed import make_jsonl
from test_loader import write_set

from ediff_train.data.datamodule import ShardDataModule
from ediff_train.data.images import ImageSpec
from ediff_train.data.manifest import read_manifest
from ediff_train.data.prep import EmbedJob, PrepConfig
from ediff_train.data.readahead import fetch
from ediff_train.data.store import open_store
from ediff_train.errors import EdiffError
from ediff_train.io.remote import Retry, filesystem, listing, read_bytes
from ediff_train.nn.encoders import Encoders
from ediff_train.sampling.pipeline import Sampler

BUCKET = "ediff-test"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_MAX_ATTEMPTS": "1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _fresh_fs() -> None:
    """fsspec caches filesystems by arguments, not environment: drop them after env changes."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (random port), reached through the usual AWS variables."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=f"http://{host}:{port}")
    _fresh_fs()
    import fsspec

    fsspec.filesystem("s3").mkdir(BUCKET)
    try:
        yield f"s3://{BUCKET}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _fresh_fs()


def embed(src: Path, out: str, **kw) -> object:  # noqa: ANN401
    cfg = PrepConfig(
        src, out, ImageSpec(16, 16, "jpg"), unit_size=10, batch_size=16, sort_window=16, workers=0
    )
    return EmbedJob(cfg, Encoders.tiny(0)).run(progress=False, cpu_threads=1, **kw)


def test_embed_to_s3_resumes_then_trains_and_samples(s3: str, tmp_path: Path, monkeypatch) -> None:
    make_jsonl(tmp_path / "in", 30)
    out = f"{s3}/set"
    first = embed(tmp_path / "in", out, max_units=1)
    assert first.embedded == 1 and read_text_or_none(out, "manifest.json") is None
    # a job killed after uploading unit 1's shard under its temporary name: no part, no shard
    store = open_store(out)
    store.write_text(".000001.tar.tmp-killed", "half")
    second = embed(tmp_path / "in", out)
    assert (second.embedded, second.done_before) == (2, 1)
    assert second.manifest == f"{out}/manifest.json"
    names = listing(out)
    assert names is not None and not [n for n in names if "tmp" in n]
    assert sorted(n for n in names if n.endswith(".tar")) == [f"{i:06d}.tar" for i in range(3)]
    assert read_manifest(out)["num_samples"] == 30
    # ranged reads: a range that fails is fetched again on its own, not the whole shard
    shard = f"{out}/000000.tar"
    fs, calls = filesystem(shard)[0], []
    real = fs.cat_ranges

    def flaky(paths: list, starts: list, ends: list, **kw: object) -> list:
        calls.append(len(starts))
        got = real(paths, starts, ends, **kw)
        return [ConnectionResetError("dropped"), *got[1:]] if len(calls) == 1 else got

    monkeypatch.setattr(fs, "cat_ranges", flaky)
    monkeypatch.setattr(Retry, "wait", lambda self, attempt: 0.0)
    assert fetch(shard, chunk=4096) == read_bytes(shard) and calls[0] > 2 and calls[1] == 1
    monkeypatch.undo()

    run = tmp_path / "run"
    train = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "logger=csv",
            "monitor.every=0",
            "probe.enabled=false",
            "data=shards",
            f"data.root={out}",
            "data.image_size=16",
            "data.num_workers=2",
            "data.batch_size=8",
            "data.readahead=1",
            "data.shuffle_buffer=16",
            "steps=2",
            "checkpoint_every=5",
            "sample.per_prompt=0",
            f"run_dir={run}",
        ],
        cwd=tmp_path,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert json.loads((run / "E0_0" / "node.json").read_text())["step"] == 2
    monkeypatch.setenv("EDIFF_CACHE", str(tmp_path / "cache"))  # fetch the encoders afresh
    images = Sampler.from_run(run, ["E0_0"])(["a red cat"], steps=2)
    assert images.shape == (1, 3, 16, 16) and list((tmp_path / "cache" / "remote").iterdir())


def read_text_or_none(root: str, name: str) -> str | None:
    return open_store(root).read_text(name)


class _Flaky(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; `drops[name]` requests of that file are cut off mid-body."""

    drops: dict[str, int] = {}
    seen: dict[str, int] = {}

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        name = self.path.rsplit("/", 1)[-1]
        self.seen[name] = self.seen.get(name, 0) + 1
        if self.drops.get(name, 0) > 0:
            self.drops[name] -= 1
            body = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops mid-shard
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[str]:
    write_set(tmp_path / "set", [4, 4, 4])
    handler = lambda *a, **k: _Flaky(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/set"
    finally:
        server.shutdown()
        server.server_close()


def test_http_drops_are_retried_then_the_shard_is_skipped_and_counted(
    http_root: str, monkeypatch
) -> None:
    monkeypatch.setattr(Retry, "wait", lambda self, attempt: 0.01)
    _Flaky.drops = {"000000.tar": 1, "000001.tar": 99}  # one drop, then always
    _Flaky.seen = {}
    dm = ShardDataModule(
        http_root,
        batch_size=4,
        image_size=16,
        num_workers=0,
        shuffle_buffer=0,
        batches_per_epoch=2,
        retries=3,
        rank=0,
        world_size=1,
    )
    dm.setup("fit")
    keys = sorted(k for b in dm.train_dataloader() for k in b["key"])
    assert keys == sorted(f"s{i}_{j}" for i in (0, 2) for j in range(4))
    assert _Flaky.seen["000000.tar"] == 2 and _Flaky.seen["000001.tar"] == 3
    assert dm.skip_counts()["unreadable_shard"] == 1


def test_pipe_root_reads_through_a_command(tmp_path: Path) -> None:
    write_set(tmp_path / "set", [3, 3])
    dm = ShardDataModule(
        f"pipe:cat {tmp_path}/set/{{name}}",
        batch_size=3,
        image_size=16,
        num_workers=0,
        shuffle_buffer=0,
        batches_per_epoch=2,
        rank=0,
        world_size=1,
    )
    dm.setup("fit")
    assert sorted(k for b in dm.train_dataloader() for k in b["key"]) == sorted(
        f"s{i}_{j}" for i in range(2) for j in range(3)
    )


def test_bad_remote_roots_are_one_line_errors(s3: str, tmp_path: Path, monkeypatch) -> None:
    def fails(root: str, needle: str) -> None:
        with pytest.raises(EdiffError) as e:
            ShardDataModule(root, batch_size=4, image_size=16, retries=1).setup("fit")
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)

    fails(
        f"{s3}/nothing", f"no shard set at {s3}/nothing: {s3}/nothing/manifest.json does not exist"
    )
    fails("s3://no-such-bucket/set", "(The specified bucket does not exist)")
    fails("gs://b/set", "gs:// needs a backend that is not installed: pip install gcsfs")
    with pytest.raises(EdiffError, match="bucket no-such-bucket does not exist"):
        open_store("s3://no-such-bucket/out").check()
    with pytest.raises(EdiffError, match="locations are read-only"):
        open_store("https://example.org/out")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    _fresh_fs()
    fails(f"{s3}/set", "cannot reach s3://ediff-test/set/manifest.json after 1 try")
    monkeypatch.undo()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    _fresh_fs()
    fails(f"{s3}/set", "no credentials for s3://ediff-test/set/manifest.json")
    monkeypatch.undo()
    _fresh_fs()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "logger=csv",
            "monitor.every=0",
            "probe.enabled=false",
            "data=shards",
            f"data.root={s3}/nothing",
            "data.image_size=16",
            "steps=1",
            "run_dir=R",
        ],
        cwd=tmp_path,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: no shard set at {s3}/nothing: {s3}/nothing/manifest.json does not exist"
    )
    assert not list((tmp_path / "R").rglob("weights.safetensors"))
