"""Every test passes alone: run a seeded random sample of test ids, each in its own
`pytest -n 0 <id>` process, and report the ones that fail.

A test that only passes after another one ran (a module fixture it did not ask for, a file an
earlier test wrote, a registry entry left behind) fails here. The ids come from
`pytest --collect-only` over tests/ (committed test files only, unless --all-files: a file
another engineer is still writing is not sampled); the seed makes the sample repeatable.

    .venv/bin/python tools/isolation.py -n 15 --seed 25        # 15 ids, each alone
    .venv/bin/python tools/isolation.py --ids tests/test_train.py::test_root_writes_handoff

The digits data build (tests/conftest.py's cache, content-keyed and built under a lock by
whichever test needs it) is shared by the sampled runs unless --fresh-cache: it is a build
cache, not another test's side effect, and rebuilding it per test costs ~1 min each.
Exit status 0 when every sampled test passed (or skipped) alone. Docs: docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST = [sys.executable, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider", "-o", "addopts="]


def committed_test_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "tests/test_*.py"], cwd=ROOT, capture_output=True, text=True
    )
    return sorted(out.stdout.split())


def collect(files: list[str]) -> list[str]:
    """Every test id in the files, as pytest names them."""
    proc = subprocess.run(
        [*PYTEST, "--collect-only", "-q", *files], cwd=ROOT, capture_output=True, text=True
    )
    ids = [ln.strip() for ln in proc.stdout.splitlines() if "::" in ln]
    if not ids:
        raise SystemExit(
            f"error: nothing collected from {len(files)} files:\n{proc.stdout[-2000:]}"
        )
    return ids


def run_alone(test_id: str, env: dict[str, str], timeout: float) -> tuple[str, float, str]:
    """(passed | failed | skipped | timeout, seconds, the output's tail) of one id alone."""
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [*PYTEST, "-q", "-rs", test_id],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, f"over {timeout:.0f} s"
    tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr.strip()[-300:]]
    if proc.returncode == 0:
        status = "skipped" if " skipped" in tail[0] and " passed" not in tail[0] else "passed"
    else:
        status = "failed"
        tail = [proc.stdout[-3000:]]
    return status, time.monotonic() - start, tail[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/isolation.py", description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=15, help="how many test ids to sample")
    p.add_argument("--seed", type=int, default=0, help="the sample's seed")
    p.add_argument("--ids", nargs="*", default=None, help="these ids instead of a sample")
    p.add_argument("--files", nargs="*", default=None, help="sample from these files only")
    p.add_argument("--exclude", nargs="*", default=[], help="test files never to sample")
    p.add_argument("--all-files", action="store_true", help="also uncommitted test files")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per test")
    p.add_argument("--fresh-cache", action="store_true", help="a new data cache per test")
    args = p.parse_args(argv)
    if args.ids:
        chosen = list(args.ids)
    else:
        files = args.files or (
            sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py"))
            if args.all_files
            else committed_test_files()
        )
        files = [f for f in files if f not in set(args.exclude)]
        ids = collect(files)
        chosen = random.Random(args.seed).sample(ids, min(args.n, len(ids)))
        print(f"sampled {len(chosen)} of {len(ids)} test ids (seed {args.seed})", flush=True)
    shared = None if args.fresh_cache else tempfile.mkdtemp(prefix="ediff-isolation-cache-")
    if shared and os.environ.get("EDIFF_TEST_CACHE"):
        shutil.rmtree(shared)
        shared = None
    results: dict[str, list[str]] = {}
    t0 = time.monotonic()
    try:
        for test_id in chosen:
            env = dict(os.environ)
            cache = shared or os.environ.get("EDIFF_TEST_CACHE")
            if args.fresh_cache:
                cache = tempfile.mkdtemp(prefix="ediff-isolation-cache-")
            if cache:
                env["EDIFF_TEST_CACHE"] = cache
            status, secs, tail = run_alone(test_id, env, args.timeout)
            if args.fresh_cache and cache:
                shutil.rmtree(cache, ignore_errors=True)
            results.setdefault(status, []).append(test_id)
            first = tail if status != "failed" else "see below"
            print(f"{status:<8} {secs:6.1f} s  {test_id}  ({first})", flush=True)
            if status == "failed":
                print("    " + tail.replace("\n", "\n    "), flush=True)
    finally:
        if shared:
            shutil.rmtree(shared, ignore_errors=True)
    counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(results.items()))
    print(f"{len(chosen)} tests alone: {counts}, in {time.monotonic() - t0:.0f} s")
    for test_id in results.get("failed", []) + results.get("timeout", []):
        print(f"  not alone-safe: {test_id}")
    return 1 if results.get("failed") or results.get("timeout") else 0


if __name__ == "__main__":
    raise SystemExit(main())
