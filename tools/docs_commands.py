"""The docs run as written: every shell command in README.md and docs/*.md, classified and the
cheap ones run.

Commands are read from ```bash / ```sh / ```console blocks (a trailing backslash joins lines,
`#` comments go, `a && b` is two commands), and from the README's prose where it quotes a
script or a command with its arguments in backticks. Each must match one rule of RULES, first
match wins:

- **run**: executed as written, in one scratch folder, in the order a reader meets them (README,
  then the guides in mkdocs.yml's order), so a later command finds what an earlier one trained;
  only its sizes are cut (`steps=2`, `n=2`, …: `key=value` tokens replaced or appended, the
  command's own arguments otherwise untouched). `.venv/bin/python` and `python` are this
  interpreter, `.venv/bin/ediff-*` its scripts, `train.py` & co. the checkout's;
- **skip**: long, cluster, GPU, network or private-data commands, each with the reason and,
  where there is one, the test that covers it cut down.

A command no rule matches is an error: a new documented command must be classified here.

    .venv/bin/python tools/docs_commands.py            # run every cheap command (~5 min, 2 cores)
    .venv/bin/python tools/docs_commands.py --list     # each command, its rule and cut-down form
    .venv/bin/python tools/docs_commands.py --only README.md

Exit status 0 when every run command exited 0. tests/test_docs_commands.py checks the
classification and runs the README's tour chain; docs/testing.md#the-docs-run-as-written.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(bash|sh|shell|console)\n(.*?)^```", re.S | re.M)
# the README's commands quoted inline in its prose (a script or a command with arguments)
SPAN = re.compile(r"`([^`\n]+)`")
INLINE = re.compile(r"(\.venv/bin/)?(python \S+\.py|ediff-[a-z-]+ |mkdocs ).*")
SCRIPTS = ("train.py", "sample.py", "evaluate.py", "data_prep/", "slurm/", "bench/")

# sizes cut for a run on a 2-core CPU: `key=value` tokens replaced (or added when absent)
TRAIN = {
    "steps": "2",
    "logger": "csv",
    "data.num_workers": "0",
    "data.batch_size": "8",
    "sample.per_prompt": "1",
    "sample.steps": "2",
    "monitor.every": "0",
    "probe.batches": "1",
    "probe.batch_size": "8",
    "checkpoint_every": "100",
}
# a local schedule run: its stages' steps scaled, each stage's sizes cut as train.py's
SCHEDULE = {k: v for k, v in TRAIN.items() if k not in ("steps", "logger", "checkpoint_every")}
SAMPLE = {"n": "2", "steps": "2", "progress": "false"}
IMAGES = {
    "steps": "2",
    "captions.templates": "plain",
    "captions.per_caption": "1",
    "metrics.classifier_steps": "20",
    "batch_size": "10",
}
LOSS = {"loss_by_sigma.images": "16", "loss_by_sigma.sigmas": "4", "loss_by_sigma.batch_size": "16"}
SR = {
    "sr.images": "10",
    "steps": "2",
    "sr.sigma_aug": "[0.002]",
    "batch_size": "10",
    "metrics.classifier_steps": "20",
}
CASCADE = {"captions.templates": "plain", "captions.per_caption": "1", "batch_size": "10"}
CASCADE.update({"metrics.classifier_steps": "20"})


@dataclass(frozen=True)
class Rule:
    """`pattern` (a regex searched in the command) → run with `cuts`, or skip for `reason`."""

    pattern: str
    cuts: dict[str, str] = field(default_factory=dict)
    reason: str = ""  # non-empty: skip
    setup: dict[str, str] = field(default_factory=dict)  # files to write first (name: text)

    @property
    def runs(self) -> bool:
        return not self.reason


RULES: tuple[Rule, ...] = (
    Rule(r"slurm/submit\.py .*dry_run=true"),  # prints the job chain: runs, whatever it names
    # --- skipped, with why ---
    Rule(r"^bash tools/install\.sh", reason="the install itself (the checkout is installed)"),
    Rule(r"-m pytest|^pytest ", reason="the test suite itself"),
    Rule(r"tools/(docs_commands|isolation|mutate)\.py", reason="the suite's own checks (minutes)"),
    Rule(r"--device cuda", reason="needs a GPU (bench/train_step.py runs on CPU in test_perf.py)"),
    Rule(r"^torchrun --nproc_per_node 8", reason="8 ranks over 30,000 COCO captions"),
    Rule(r"^srun ", reason="inside a SLURM allocation"),
    Rule(r"s3://my-bucket", reason="a real bucket (object storage: tests/test_remote.py)"),
    Rule(r"--remote s3", reason="a local S3 server, minutes (tests/test_readahead.py)"),
    Rule(r"data_prep/embed\.py", reason="COCO/LAION and the paper's encoders from local files"),
    Rule(r" \.\.\.(\s|$)", reason="arguments elided in the docs (…)"),
    Rule(r"slurm/submit\.py .*slurm\.", reason="submits to a real SLURM cluster"),
    Rule(r"slurm/submit\.py .*'train\.args=", reason="submits to a real SLURM cluster"),
    Rule(r"cascade=config_b", reason="the paper-scale Config-B runs (runs/base, runs/sr256)"),
    Rule(
        r"ediff-experiment fig7_toy",
        reason="3 seeds of a schedule plus evaluation, ~1 h (tests/test_experiment.py cut down)",
    ),
    Rule(r"ediff-experiment fig7_plateau", reason="the fair Fig. 7 test, 49 min"),
    Rule(
        r"ediff-experiment|ediff_train\.experiments\.experiment ",
        reason="an experiment over seeds, many minutes (tests/test_experiment.py cut down)",
    ),
    Rule(r"=/(data|models|shared|weights)/", reason="data or weights at a site's own paths"),
    Rule(
        r"python bench/", reason="a benchmark, minutes (tests/test_bench_loader.py, test_perf.py)"
    ),
    Rule(r"mkdocs build", reason="run in the checkout by .ci/run (mkdocs build --strict)"),
    Rule(
        r"distill_guidance|runs/digits_gd",
        reason="guidance-distilled students need a finished digits tree (runs/digits) as "
        "teacher, and the comparison is a pending measurement: tests/test_guidance_distill.py "
        "trains, samples and refuses cut down",
    ),
    Rule(
        r"data=shapes|metric=shapes|ediff-shapes|toys\.shapes|run_dir=runs/shapes",
        reason="the shapes build (100,000 renders, minutes) and runs on it: tests/test_shapes.py "
        "builds a small set, trains, samples and evaluates on it",
    ),
    Rule(
        r"ediff-advise ",
        reason="probes and validation train on a finished node, minutes to an hour: "
        "tests/test_advise.py runs the command cut down on a tiny trained node",
    ),
    # --- run, cut down ---
    Rule(r"ediff-experts "),
    Rule(r"ediff-export |ediff_train\.cli\.export "),  # writes a new folder from a trained run
    Rule(r"ediff-schedule run ", cuts={"scale": "0.004", **SCHEDULE}),
    Rule(r"ediff-schedule "),
    Rule(r"train\.py", cuts=TRAIN),
    Rule(r"sample\.py .*prompts_file=prompts\.txt", cuts=SAMPLE, setup={"prompts.txt": "seven\n"}),
    Rule(r"sample\.py|ediff-sample ", cuts=SAMPLE),
    Rule(r"evaluate\.py .*metric=loss_by_sigma", cuts=LOSS),
    Rule(r"evaluate\.py .*metric=sr", cuts=SR),
    Rule(r"evaluate\.py .*metric=cascade", cuts=CASCADE),
    Rule(r"evaluate\.py", cuts={**IMAGES, **LOSS, "guidance": "[1,2]"}),
)


@dataclass(frozen=True)
class Command:
    """One documented command: where it is and its text as written (continuations joined)."""

    source: str  # file:line
    text: str

    def rule(self) -> Rule:
        for r in RULES:
            if re.search(r.pattern, self.text):
                return r
        raise LookupError(f"{self.source}: no rule in tools/docs_commands.py for: {self.text}")


def _strip_comment(line: str) -> str:
    """`cmd args   # note` → `cmd args` (a `#` inside quotes stays)."""
    out, quote = [], ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            break
        out.append(ch)
    return "".join(out).strip()


def extract(path: Path) -> list[Command]:
    """The shell commands of one markdown file, in order."""
    text = path.read_text()
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    found = []
    for m in BLOCK.finditer(text):
        first = text.count("\n", 0, m.start(2)) + 1
        lines = m.group(2).splitlines()
        i = 0
        while i < len(lines):
            start, parts = i, []
            while True:  # a trailing backslash joins the next line; comments go per line
                piece = _strip_comment(lines[i])
                if piece.endswith("\\"):
                    parts.append(piece[:-1].strip())
                    i += 1
                    if i < len(lines):
                        continue
                else:
                    parts.append(piece)
                    i += 1
                break
            joined = " ".join(p for p in parts if p)
            for cmd in (c.strip() for c in joined.split(" && ")):
                if cmd:
                    found.append(Command(f"{rel}:{first + start}", cmd))
    if path.name == "README.md":
        prose = BLOCK.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)  # same offsets
        for m in SPAN.finditer(prose):
            if INLINE.fullmatch(m.group(1)):
                line = text.count("\n", 0, m.start()) + 1
                found.append(Command(f"{rel}:{line}", m.group(1)))
    return sorted(found, key=lambda c: int(c.source.rsplit(":", 1)[1]))  # stable: in reading order


def doc_files() -> list[Path]:
    """README.md, then docs/ in mkdocs.yml's nav order, then any page the nav leaves out."""
    nav = re.findall(r"^\s*-\s*[^:]+:\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    pages = [ROOT / "docs" / n for n in nav if (ROOT / "docs" / n).is_file()]
    pages += [p for p in sorted((ROOT / "docs").glob("*.md")) if p not in pages]
    return [ROOT / "README.md", *pages]


def all_commands(files: Iterable[Path] | None = None) -> list[Command]:
    return [c for f in (files or doc_files()) for c in extract(f)]


def cut_down(cmd: Command) -> list[str]:
    """argv of the command as it will run: programs resolved, sizes cut."""
    rule = cmd.rule()
    args = shlex.split(cmd.text)
    bindir = Path(sys.executable).parent
    if args[0] in (".venv/bin/python", "python", "python3"):
        args[0] = sys.executable
    elif args[0].startswith(".venv/bin/"):
        args[0] = str(bindir / args[0].removeprefix(".venv/bin/"))
    elif args[0].startswith("ediff-"):
        args[0] = str(bindir / args[0])
    if len(args) > 1 and args[1].startswith(SCRIPTS):
        args[1] = str(ROOT / args[1])
    for key, value in rule.cuts.items():
        hits = [i for i, a in enumerate(args) if a.split("=", 1)[0].lstrip("+") == key]
        for i in hits:
            args[i] = f"{args[i].split('=', 1)[0]}={value}"
        if not hits:
            args.append(f"{key}={value}")
    return args


def environment(cache: str | None = None) -> dict[str, str]:
    """Offline, no inherited distributed variables, the shared digits cache when given."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    if cache or os.environ.get("EDIFF_TEST_CACHE"):
        env["EDIFF_CACHE"] = cache or os.environ["EDIFF_TEST_CACHE"]
    return env


def run(cmd: Command, work: Path, env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
    """Run one command in `work`; (exit status, the tail of its output)."""
    for name, text in cmd.rule().setup.items():
        if not (work / name).exists():
            (work / name).write_text(text)
    try:
        proc = subprocess.run(
            cut_down(cmd), cwd=work, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    return proc.returncode, (proc.stdout + proc.stderr)[-3000:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/docs_commands.py", description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="classify only, run nothing")
    p.add_argument("--only", default="", help="comma-separated files (README.md, docs/x.md)")
    p.add_argument("--work", default="", help="scratch folder (default: a new temporary one)")
    args = p.parse_args(argv)
    files = doc_files()
    if args.only:
        files = [ROOT / f for f in args.only.split(",") if f]
    try:
        commands = all_commands(files)
        rules = [c.rule() for c in commands]
    except LookupError as e:
        print(f"error: {e}")
        return 2
    if args.list:
        for c, r in zip(commands, rules):
            what = f"skip: {r.reason}" if not r.runs else "run: " + shlex.join(cut_down(c))
            print(f"{c.source}: {c.text}\n    {what.replace(str(ROOT) + '/', '')}")
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="ediff-docs-"))
    work.mkdir(parents=True, exist_ok=True)
    env, failed, ran, t0 = environment(), [], 0, time.monotonic()
    for c, r in zip(commands, rules):
        if not r.runs:
            print(f"skip  {c.source}: {c.text[:70]}  ({r.reason})", flush=True)
            continue
        start = time.monotonic()
        rc, tail = run(c, work, env)
        ran += 1
        status = "ok  " if rc == 0 else "FAIL"
        print(f"{status}  {c.source}: {c.text[:70]}  {time.monotonic() - start:.1f} s", flush=True)
        if rc != 0:
            failed.append(c)
            print("      " + tail.replace("\n", "\n      "))
    print(
        f"{ran - len(failed)}/{ran} documented commands ran, {len(commands) - ran} skipped with a"
        f" reason, in {time.monotonic() - t0:.0f} s (work folder {work})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
