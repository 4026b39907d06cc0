"""Mutation testing by hand: break the core on purpose, one line at a time, and check that the
tests meant to guard that line fail.

Each mutant is one (file, old text, new text) edit plus the test files that should catch it.
For each: the file is copied to a backup, the edit applied, `pytest -x -q -n 0 <tests>` run,
and the file restored from the backup in a `finally` (also on Ctrl-C, `kill` or a timeout). By
default all of this happens in a scratch copy of the checkout (git's tracked and unignored
files, the copy's `src/` first on PYTHONPATH), so a shared working tree never holds a broken file;
`--in-place` mutates the checkout itself. A mutant is
*killed* when pytest fails, *survived* when it passes (a missing test), *stale* when its old text
is no longer in the file (the list needs updating; counted as neither).

    .venv/bin/python tools/mutate.py                 # every mutant, prints the score
    .venv/bin/python tools/mutate.py --list          # the mutants and their tests
    .venv/bin/python tools/mutate.py --only loss_weight,router_tie

Exit status: 0 when every mutant was killed, 1 when any survived or went stale.
Docs: docs/testing.md#mutation-testing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = "src/ediff_train/"


@dataclass(frozen=True)
class Mutant:
    """One deliberate break and the tests that must catch it."""

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    select: str = ""  # a pytest -k expression, to keep a slow file's run short


# the closed-form tests of those files (their train.py subprocess tests take minutes)
CLOSED_FORM = "not tree_trains and not bad_parameterisations"

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "loss_weight",  # EDM's λ(σ) loses its square
        SRC + "core/edm.py",
        "return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2",
        "return (sigma**2 + sigma_data**2) / (sigma * sigma_data)",
        ("tests/test_edm.py", "tests/test_parameterisation.py"),
        select=CLOSED_FORM,
    ),
    Mutant(
        "precond_c_skip",  # c_skip = σ_d/(σ²+σ_d²) instead of σ_d²/(σ²+σ_d²)
        SRC + "core/edm.py",
        "c_skip = sigma_data**2 / s2",
        "c_skip = sigma_data / s2",
        ("tests/test_edm.py", "tests/test_parameterisation.py"),
        select=CLOSED_FORM,
    ),
    Mutant(
        "precond_c_noise",  # ½·ln σ instead of ¼·ln σ
        SRC + "core/edm.py",
        "c_noise = sigma.log() / 4.0",
        "c_noise = sigma.log() / 2.0",
        ("tests/test_edm.py", "tests/test_parameterisation.py"),
        select=CLOSED_FORM,
    ),
    Mutant(
        "router_tie",  # a σ exactly on a boundary goes to the lower node: [lo, hi) broken
        SRC + "core/experts.py",
        "self._owner[torch.searchsorted(self._bounds, u, right=True)]",
        "self._owner[torch.searchsorted(self._bounds, u, right=False)]",
        ("tests/test_experts.py", "tests/test_sampling.py"),
        select="router or ensemble_routes or boundary_belongs",
    ),
    Mutant(
        "router_owner",  # the owner table read one piece off
        SRC + "core/experts.py",
        "self._owner = torch.tensor([p[2] for p in pieces], dtype=torch.long)",
        "self._owner = torch.tensor([p[2] for p in pieces], dtype=torch.long).flip(0)",
        ("tests/test_experts.py", "tests/test_sampling.py"),
        select="router or ensemble_routes or boundary_belongs",
    ),
    Mutant(
        "node_interval",  # a tree node's quantile interval starts half a slot late
        SRC + "core/experts.py",
        'return Node(f"E{level}_{index}", ((index / n, (index + 1) / n),), parent, "tree")',
        'return Node(f"E{level}_{index}", (((index + 0.5) / n, (index + 1) / n),), parent, "tree")',
        ("tests/test_experts.py",),
        select="not cli",
    ),
    Mutant(
        "flow_c_out",  # flow matching's c_out loses its sign (v = ε − x₀ read as x₀ − ε)
        SRC + "core/parameterisation.py",
        "return one, -sigma * one, one, sigma * one",
        "return one, sigma * one, one, sigma * one",
        ("tests/test_parameterisation.py",),
        select=CLOSED_FORM,
    ),
    Mutant(
        "flow_loss_weight",  # flow matching's λ without the square
        SRC + "core/parameterisation.py",
        "return ((1.0 + sigma) / sigma) ** 2",
        "return (1.0 + sigma) / sigma",
        ("tests/test_parameterisation.py",),
        select=CLOSED_FORM,
    ),
    Mutant(
        "digits_scorer",  # prompt accuracy counts the wrong guesses
        SRC + "metrics/scorers.py",
        "right += torch.bincount(want[known & (guess == want)], minlength=10).float()",
        "right += torch.bincount(want[known & (guess != want)], minlength=10).float()",
        ("tests/test_evaluate_parts.py",),
        select="digits_scorer",
    ),
    Mutant(
        "resume_oldest",  # resume picks the oldest valid checkpoint, not the newest
        SRC + "training/resume.py",
        "best = found[-1][2]",
        "best = found[0][2]",
        ("tests/test_resume.py",),
        select="resume_choice",
    ),
    Mutant(
        "handoff_adam_step",  # the child's AdamW starts at step 0 despite the parent's moments
        SRC + "run/optim_state.py",
        'st["step"] = torch.tensor(float(step), dtype',
        'st["step"] = torch.tensor(0.0, dtype',
        ("tests/test_handoff.py",),
        select="adamw_state_handed",
    ),
    Mutant(
        "heun_correction",  # Heun's trapezoid becomes a plain second Euler slope
        SRC + "core/solvers.py",
        "x_next = x + (sn - sc) * 0.5 * (d + d2)",
        "x_next = x + (sn - sc) * d2",
        ("tests/test_solvers.py",),
        select="heun_and_dpmpp or converges",
    ),
    Mutant(
        "guidance_sign",  # classifier-free guidance extrapolates from the conditional branch
        SRC + "sampling/guidance.py",
        "return d_u + w * (d_c - d_u)",
        "return d_c + w * (d_c - d_u)",
        ("tests/test_sampling.py", "tests/test_solvers.py"),
        select="guidance",
    ),
    # the tests issue #25 fixed, each shown to fail when its behaviour breaks
    Mutant(
        "compile_eager",  # module.compile silently runs the eager module
        SRC + "core/perf.py",
        "                return self._fn(*args, **kwargs)",
        "                return self.module(*args, **kwargs)",
        ("tests/test_perf.py",),
        select="compiled_graphs",
    ),
    Mutant(
        "paint_weight_ignored",  # the paint bias added at full strength whatever w′ is
        SRC + "nn/attention.py",
        "scores = scores + w * top * paint.float()[:, None]",
        "scores = scores + top * paint.float()[:, None]",
        ("tests/test_paint.py",),
        select="zero_weight",
    ),
    Mutant(
        "sr_psnr_scale",  # PSNR as 20·log10(1/MSE)
        SRC + "evaluation/sr.py",
        "return 10 * torch.log10(1.0 / mse)",
        "return 20 * torch.log10(1.0 / mse)",
        ("tests/test_sr_cascade.py",),
        select="independent",
    ),
    Mutant(
        "sr_bilinear_baseline",  # the "bicubic" row up-samples bilinearly
        SRC + "evaluation/sr.py",
        'outputs: dict[str, Tensor] = {"bicubic": upsample(low, size)}',
        'outputs: dict[str, Tensor] = {"bicubic": upsample(low, size, "bilinear")}',
        ("tests/test_sr_cascade.py",),
        select="independent",
    ),
    Mutant(
        "cascade_stage_swap",  # each stage's accuracy reported under the other stage
        SRC + "evaluation/sr.py",
        "for ls, a in zip(loaded, acc)",
        "for ls, a in zip(loaded, acc[::-1])",
        ("tests/test_sr_cascade.py",),
        select="known_digits",
    ),
)


def scratch_copy() -> Path:
    """The checkout's tracked and unignored files in a temporary folder (no .venv, no runs)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    dest = Path(tempfile.mkdtemp(prefix="ediff-mutate-"))
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def prebuild(root: Path) -> None:
    """The digits shard set the tests share, built by the unbroken code (tests/conftest.py)."""
    code = (
        "import os, pathlib; from ediff_train.data.toys.digits import build_digits; "
        "build_digits(pathlib.Path(os.environ['EDIFF_TEST_CACHE']) / 'digits16')"
    )
    subprocess.run([sys.executable, "-c", code], cwd=root, env=_env(root), check=True)


def pytest(root: Path, tests: tuple[str, ...], select: str, timeout: float) -> tuple[int, str]:
    """`pytest -x -q -n 0` on the files (and -k selection): exit status and its last line."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider"]
    cmd += ["--no-header", "-o", "addopts=", *tests]
    if select:
        cmd += ["-k", select]
    try:
        proc = subprocess.run(
            cmd, cwd=root, capture_output=True, text=True, timeout=timeout, env=_env(root)
        )
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    return proc.returncode, lines[-1] if lines else proc.stderr.strip()[-200:]


def run_mutant(m: Mutant, root: Path, timeout: float) -> tuple[str, float, str]:
    """Apply, test, restore. Returns (outcome, seconds, the last line pytest printed)."""
    path = root / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        return "stale", 0.0, f"{m.old!r} occurs {text.count(m.old)} times in {m.file}"
    backup = path.with_name(path.name + ".mutate-backup")
    shutil.copy2(path, backup)
    start = time.monotonic()
    try:
        path.write_text(text.replace(m.old, m.new))
        rc, last = pytest(root, m.tests, m.select, timeout)
        outcome = "survived" if rc == 0 else "killed"  # a timeout (-1) counts as killed
        if rc in (4, 5):  # usage error / nothing collected: not a kill
            outcome = "stale"
    finally:
        shutil.copy2(backup, path)
        backup.unlink()
    return outcome, time.monotonic() - start, last


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/mutate.py", description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated mutant names")
    p.add_argument("--list", action="store_true", help="print the mutants and exit")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per test run")
    p.add_argument(
        "--no-baseline", action="store_true", help="skip the unbroken run of the tests first"
    )
    p.add_argument(
        "--in-place", action="store_true", help="mutate this checkout, not a scratch copy"
    )
    args = p.parse_args(argv)
    chosen = list(MUTANTS)
    if args.only:
        names = {m.name for m in MUTANTS}
        want = [n for n in args.only.split(",") if n]
        unknown = [n for n in want if n not in names]
        if unknown:
            print(f"error: unknown mutant {unknown[0]!r}; known: {', '.join(sorted(names))}")
            return 2
        chosen = [m for m in MUTANTS if m.name in want]
    if args.list:
        for m in chosen:
            sel = f" -k {m.select}" if m.select else ""
            print(f"{m.name:<18} {m.file}  ->  {' '.join(m.tests)}{sel}")
        return 0
    # a plain `kill` must restore the file too: SIGTERM becomes SystemExit, so `finally` runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    counts = {"killed": 0, "survived": 0, "stale": 0}
    total = time.monotonic()
    root = ROOT if args.in_place else scratch_copy()
    made_cache = not os.environ.get("EDIFF_TEST_CACHE")
    if made_cache:  # one digits build for every mutant, made before anything is broken
        os.environ["EDIFF_TEST_CACHE"] = tempfile.mkdtemp(prefix="ediff-mutate-cache-")
    try:
        prebuild(root)
        if not args.no_baseline:  # unbroken, every test the mutants use must pass
            for tests, select in dict.fromkeys((m.tests, m.select) for m in chosen):
                rc, last = pytest(root, tests, select, args.timeout)
                print(f"{'baseline':<9} {' '.join(tests)} {select}: {last}", flush=True)
                if rc != 0:
                    print("error: the unbroken code fails these tests; fix them first")
                    return 1
        for m in chosen:
            outcome, secs, last = run_mutant(m, root, args.timeout)
            counts[outcome] += 1
            print(f"{outcome.upper():<9} {m.name:<18} {secs:6.1f} s  {last}", flush=True)
    finally:
        if root != ROOT:
            shutil.rmtree(root, ignore_errors=True)
        if made_cache:
            shutil.rmtree(os.environ.pop("EDIFF_TEST_CACHE"), ignore_errors=True)
    scored = counts["killed"] + counts["survived"]
    score = counts["killed"] / scored if scored else 0.0
    print(
        f"mutation score {counts['killed']}/{scored} = {score:.0%} killed"
        f" ({counts['survived']} survived, {counts['stale']} stale)"
        f" in {time.monotonic() - total:.0f} s"
    )
    return 0 if counts["survived"] == 0 and counts["stale"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
