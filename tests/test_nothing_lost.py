"""Issue 37, "nothing lost, nothing silently reset", on the real entry point: SIGTERM and Ctrl-C
save a checkpoint at the step they arrive and the same command finishes the node with the
weights of an uninterrupted run; a corrupt last.ckpt falls back to the one before it, and on a
finished node changes nothing; refused commands write nothing; unknown keys are one line."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_env

from ediff_train.run.weights import load_weights
from ediff_train.training.resume import AtomicCheckpointIO, checkpoint_step, resume_checkpoint

STEPS = 8
FAST = [
    "sample.per_prompt=0",
    "data.batch_size=8",
    "data.num_workers=2",  # workers too: a signal to the group must not kill them mid-run
    "monitor.every=0",
    "probe.enabled=false",
    "logger=csv",
    "checkpoint_every=2",
    f"steps={STEPS}",
    "+callbacks.keys._target_=record_keys.RecordKeys",
]
SAVED = re.compile(r"interrupted at step (\d+) \((SIG\w+)\): saved (\S+); rerun the same command")


def env_for(tmp: Path) -> dict[str, str]:
    env = run_env(tmp)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def args(run_dir: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *FAST,
        f"run_dir={run_dir}",
        f"+callbacks.keys.folder={run_dir}_keys",
        *extra,
    ]


def train(tmp: Path, run_dir: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args(run_dir, *extra),
        cwd=tmp,
        env=env_for(tmp),
        capture_output=True,
        text=True,
        timeout=400,
        start_new_session=True,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def steps_seen(tmp: Path, run_dir: str) -> list[int]:
    path = tmp / f"{run_dir}_keys" / "rank0.jsonl"
    return [int(line.split('"step": ')[1].split(",")[0]) for line in path.read_text().splitlines()]


def interrupt(tmp: Path, run_dir: str, signum: int, *extra: str) -> tuple[int, Path, str]:
    """Start the command, signal its whole process group (as a terminal's Ctrl-C or SLURM's
    scancel do) once it is a random 3–6 steps in; (saved step, checkpoint, stderr)."""
    proc = subprocess.Popen(
        args(run_dir, *extra),
        cwd=tmp,
        env=env_for(tmp),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    at = random.Random().randint(3, 6)
    keys = tmp / f"{run_dir}_keys" / "rank0.jsonl"
    end = time.monotonic() + 600  # two DDP ranks on a busy 2-core machine start slowly
    while not (keys.is_file() and len(keys.read_text().splitlines()) >= at):
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
        if time.monotonic() > end:  # leave no rank behind, then fail
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
            pytest.fail("the run never reached its steps")
        time.sleep(0.02)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum], err[-3000:]
    assert "Traceback" not in err and "killed by signal" not in err, err[-3000:]
    lines = [m for m in map(SAVED.search, err.splitlines()) if m]
    assert len(lines) == 1, err[-3000:]
    step, name, where = int(lines[0].group(1)), lines[0].group(2), Path(lines[0].group(3))
    assert name == signal.Signals(signum).name and 1 <= step < STEPS
    ckpt = tmp / where
    assert ckpt == tmp / run_dir / "E0_0" / "checkpoints" / "last.ckpt"
    assert checkpoint_step(ckpt) == step  # at the step the signal arrived, resumable
    assert not (tmp / run_dir / "E0_0" / "weights.safetensors").exists()  # no hand-off
    return step, ckpt, err


def worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nothing_lost")


@pytest.fixture(scope="module")
def reference(tmp: Path) -> tuple[dict, dict]:
    """The same command never interrupted: its weights and EMA."""
    ok(train(tmp, "U"))
    model, ema, _ = load_weights(tmp / "U" / "E0_0" / "weights.safetensors")
    return model, ema


def test_sigterm_saves_at_its_step_and_the_same_command_finishes_exactly(
    tmp: Path, reference: tuple[dict, dict]
) -> None:
    step, _, _ = interrupt(tmp, "T", signal.SIGTERM)
    proc = ok(train(tmp, "T"))
    assert "Restoring states from the checkpoint" in proc.stderr
    assert steps_seen(tmp, "T") == list(range(STEPS))  # resumed at the saved step: none again
    model, ema, meta = load_weights(tmp / "T" / "E0_0" / "weights.safetensors")
    assert meta["step"] == STEPS and step < STEPS
    assert worst(model, reference[0]) < 1e-6 and worst(ema, reference[1]) < 1e-6


def test_ctrl_c_then_corrupt_last_resumes_from_the_one_before(
    tmp: Path, reference: tuple[dict, dict]
) -> None:
    step, last, _ = interrupt(tmp, "C", signal.SIGINT)
    previous = last.with_name("previous.ckpt")
    before = checkpoint_step(previous)
    assert before is not None and before < step  # the last two are kept
    last.write_bytes(last.read_bytes()[:1000])  # a copy cut short
    proc = ok(train(tmp, "C"))
    warned = [ln for ln in proc.stderr.splitlines() if "unreadable checkpoint" in ln]
    assert len(warned) == 1 and "last.ckpt" in warned[0], proc.stderr[-3000:]
    seen = steps_seen(tmp, "C")
    assert seen == list(range(step)) + list(range(before, STEPS))  # from previous.ckpt on
    model, ema, _ = load_weights(tmp / "C" / "E0_0" / "weights.safetensors")
    assert worst(model, reference[0]) < 1e-6 and worst(ema, reference[1]) < 1e-6


@pytest.mark.parametrize(
    "name, strategy",
    [
        ("D", ()),
        ("Z", ("strategy=deepspeed_stage_2", "strategy._target_=cpu_deepspeed.CPUDeepSpeed")),
    ],
)
def test_sigterm_under_two_processes_saves_one_checkpoint_and_resumes(
    tmp: Path, name: str, strategy: tuple[str, ...]
) -> None:
    """Real 2-process DDP (gloo), and DeepSpeed: both ranks get the signal (the process group),
    agree on one step and save it together; the same command resumes there on both ranks."""
    if strategy:
        pytest.importorskip("deepspeed")
    ddp = ("trainer=ddp_cpu", "data.num_workers=1", *strategy)
    step, _, err = interrupt(tmp, name, signal.SIGTERM, *ddp)
    assert err.count("interrupted at step") == 1  # one line, from rank 0
    ok(train(tmp, name, *ddp))
    for rank in (0, 1):
        path = tmp / f"{name}_keys" / f"rank{rank}.jsonl"
        seen = [int(ln.split('"step": ')[1].split(",")[0]) for ln in path.read_text().splitlines()]
        assert seen == list(range(STEPS)), (rank, step, seen)  # none repeated, none skipped
    _, _, meta = load_weights(tmp / name / "E0_0" / "weights.safetensors")
    assert meta["step"] == STEPS


def hydra_runs(ndir: Path) -> list[str]:
    return sorted(p.name for p in (ndir / "hydra").iterdir())


def test_finished_node_with_corrupt_last_or_fewer_steps_is_left_as_it_is(tmp: Path) -> None:
    ndir = tmp / "T" / "E0_0"  # finished by the SIGTERM test
    if not (ndir / "weights.safetensors").is_file():
        ok(train(tmp, "T"))
    files = {
        n: (ndir / n).read_bytes() for n in ("weights.safetensors", "node.json", "config.yaml")
    }
    runs = hydra_runs(ndir)
    last = ndir / "checkpoints" / "last.ckpt"
    last.write_bytes(b"PK\x03\x04 cut short")
    for extra in ([], ["steps=3"]):
        proc = ok(train(tmp, "T", *extra))
        target = 3 if extra else STEPS
        assert f"node E0_0 already at step {STEPS} ≥ steps={target}: nothing to do" in proc.stdout
        assert {n: (ndir / n).read_bytes() for n in files} == files  # byte-identical
        assert hydra_runs(ndir) == runs  # not even Hydra's record of the command


def test_lora_over_a_full_node_is_one_line_and_writes_nothing(tmp: Path) -> None:
    child = ["expert=E1_1", "steps=1", "data.num_workers=0"]
    ok(train(tmp, "U", *child))  # a full-weight child of the reference root
    ndir = tmp / "U" / "E1_1"
    config, runs = (ndir / "config.yaml").read_bytes(), hydra_runs(ndir)
    proc = train(tmp, "U", *child, "lora=default")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "trained as full weights (lora=none)" in errors[0]
    assert "asks for a LoRA adapter (lora=default)" in errors[0]
    assert (ndir / "config.yaml").read_bytes() == config and hydra_runs(ndir) == runs


def test_refused_command_on_a_fresh_run_dir_leaves_no_node_folder(tmp: Path) -> None:
    proc = train(tmp, "Fresh", "expert=E1_1")  # its parent was never trained there
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: parent E0_0 has not finished")
    assert not (tmp / "Fresh" / "E1_1").exists()


@pytest.mark.parametrize("plus", ["+", ""])
def test_unknown_key_is_one_line_naming_the_closest(tmp: Path, plus: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "run_dir=K", f"{plus}module.lrr=1e-3"],
        cwd=tmp,
        env=env_for(tmp),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == "error: unknown key module.lrr; did you mean module.lr?\n"
    assert not (tmp / "K").exists()


def test_known_keys_and_free_ones_pass() -> None:
    from ediff_train.cli.keys import KnownKeys

    known = KnownKeys()
    known.check(
        [
            "+callbacks.x._target_=a.B",
            "++expert.split_sigma=1",
            "module.drop.t5=0.1",
            "module.lr_schedule.decay=cosine",
            "posthoc_ema.enabled=true",
            "model=tiny",
            "data.batch_size=4",
            "hydra.verbose=true",
            "-m",
        ]
    )
    with pytest.raises(Exception, match="unknown key stepz; did you mean steps"):
        known.check(["stepz=3"])


def test_keep_previous_and_fall_back(tmp_path: Path) -> None:
    ck = tmp_path / "N" / "checkpoints"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 4}, ck / "last.ckpt")
    io.save_checkpoint({"global_step": 6}, ck / "last.ckpt")
    assert checkpoint_step(ck / "previous.ckpt") == 4 and checkpoint_step(ck / "last.ckpt") == 6
    (ck / "last.ckpt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"last\.ckpt"):
        assert resume_checkpoint(tmp_path / "N") == ck / "previous.ckpt"


def test_threads_follow_the_cpu_quota_and_slurm(tmp_path: Path) -> None:
    from ediff_train.training.strategies import cpu_budget, cpu_quota, note_if_busy

    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v2) == 1.5 and cpu_quota(v1) is None and cpu_quota(tmp_path) is None
    assert cpu_budget({}, v2) == 1  # 1.5 CPUs: one thread, not two throttled ones
    cores = len(os.sched_getaffinity(0))
    assert cpu_budget({}, v1) == cores
    assert cpu_budget({"SLURM_CPUS_PER_TASK": "1"}, v1) == 1
    assert note_if_busy(cores, load=0.0) is None
    line = note_if_busy(cores, load=100.0 * (os.cpu_count() or 1))
    assert line is not None and line.startswith("note: load average")
