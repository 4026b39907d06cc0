"""bench/loader.py runs at its smallest settings and prints its table with real figures (it is
otherwise never run by the suite, so a loader change could silently break it). Its own `main`
is called in this process: a subprocess would spend its time importing Lightning again."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import ROOT

SMALL = [
    "--dims",
    "tiny",
    "--samples",
    "48",
    "--shards",
    "2",
    "--image-size",
    "16",
    "--batch-size",
    "8",
    "--batches",
    "3",
    "--workers",
    "1",
    "--repeat",
    "1",
    "--fixed-samples",
    "8",
]


def test_loader_bench_prints_positive_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("_bench_loader", ROOT / "bench" / "loader.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "loader.json"
    assert bench.main([*SMALL, "--root", str(tmp_path), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    size = figures["bytes_per_sample"]
    assert size["ours"] > 0 and 0 < size["ours_same_samples"] < size["fixed_fp32_113_same_samples"]
    rows = figures["loader"]
    assert sorted((r["consumer"], r["reader"]) for r in rows) == [
        (c, r) for c in ("compact", "float32") for r in ("fast", "webdataset")
    ]  # both readers by default, one after the other on each row
    for r in rows:
        assert r["workers"] == 1 and r["samples"] == 3 * 8  # the timed batches, all of them
        assert r["seconds"] > 0 and r["samples_per_s"] > 0 and r["samples_per_s_per_worker"] > 0
        assert r["main_cpu_us_per_sample"] > 0
    # the printed table: a header, then one line per measurement with its figures
    lines = printed.splitlines()
    head = next(i for i, ln in enumerate(lines) if "samples/s" in ln and "workers" in ln)
    table = lines[head + 1 : head + 1 + len(rows)]
    for r, line in zip(rows, table):
        cells = line.split()
        assert r["consumer"] in cells and f"{r['samples_per_s']:,.0f}" in cells, line
        assert r["reader"] in cells, line
    # the side-by-side table: per consumer, fast's then webdataset's samples/s, then CPU-µs
    side = lines[lines.index("readers side by side") + 2 :][:2]
    for line in side:
        source, consumer, workers, *cells = line.split()
        by = {r["reader"]: r for r in rows if r["consumer"] == consumer}
        assert (source, workers) == ("local", "1") and cells[:2] == [
            f"{by[n]['samples_per_s']:,.0f}" for n in ("fast", "webdataset")
        ]
        assert cells[2:] == [
            f"{1e6 / by[n]['samples_per_cpu_s_all']:,.0f}" for n in ("fast", "webdataset")
        ]
    assert any(ln.startswith("bytes/sample: ours") for ln in lines[:head])
    assert [p.name for p in tmp_path.iterdir()] == ["loader.json"]  # its temp shards are gone
