"""The docs run as written (tools/docs_commands.py): every shell command in README.md and docs/
is classified (run cut down, or skipped with a reason), the extraction reads what a reader
reads, and the README's tour (a root, two children, the ensemble sampled) runs as written with
docs/sampling.md's per-expert guidance from the command line. The full run of every cheap
command is `tools/docs_commands.py`, in .ci/run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SHARED_CACHE


def _load_tool() -> object:
    spec = importlib.util.spec_from_file_location("docs_commands", ROOT / "tools/docs_commands.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_commands"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


dc = _load_tool()


def test_every_documented_command_has_a_rule() -> None:
    """A new command in the docs without a rule fails here; the README's train, sample,
    evaluate, ediff-experts and dry-run submit commands are run, not skipped."""
    commands = dc.all_commands()
    rules = {c.source: c.rule() for c in commands}  # raises on a command without a rule
    assert all(r.runs or len(r.reason) > 10 for r in rules.values())
    readme = [c for c in commands if c.source.startswith("README.md:")]
    ran = {c.text for c in readme if rules[c.source].runs}
    for needle in (
        "train.py run_dir=runs/demo expert=E1_1",
        "sample.py run_dir=runs/demo experts=[E1_0,E1_1]",
        "evaluate.py run_dir=runs/demo experts=[E1_0,E1_1] compare=[[E0_0]] metric=loss_by_sigma",
        "ediff-experts E9_511 E3_0 not_E9_511_E3_0",
        "slurm/submit.py schedule=fig7 dry_run=true",
    ):
        assert any(needle in t for t in ran), needle
    assert {c.source.split(":")[0] for c in commands} >= {"README.md", "docs/sampling.md"}


def test_extraction_joins_lines_drops_comments_and_splits_chains(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Intro `python train.py steps=3` in prose.\n"
        "```bash\n"
        "# a comment line\n"
        "python train.py a=1 \\\n"
        "    b='x # y'   # trailing note\n"
        "bash tools/install.sh && .venv/bin/python sample.py n=4\n"
        "```\n"
        "```python\nimport os\n```\n"
    )
    got = [(c.source.split(":")[1], c.text) for c in dc.extract(page)]
    assert got == [
        ("4", "python train.py a=1 b='x # y'"),
        ("6", "bash tools/install.sh"),
        ("6", ".venv/bin/python sample.py n=4"),
    ]  # prose is read from README.md only


def test_cut_down_replaces_sizes_or_adds_them_and_resolves_programs() -> None:
    cmd = dc.Command("README.md:1", '.venv/bin/python sample.py prompt="the number 3" n=16')
    argv = dc.cut_down(cmd)
    assert argv[:2] == [sys.executable, str(ROOT / "sample.py")]
    assert argv[2:] == ["prompt=the number 3", "n=2", "steps=2", "progress=false"]
    tool = dc.cut_down(dc.Command("x:1", ".venv/bin/ediff-experts E1_1"))
    assert tool == [str(Path(sys.executable).parent / "ediff-experts"), "E1_1"]
    with pytest.raises(LookupError, match="no rule"):
        dc.Command("x:9", "rm -rf /").rule()


@pytest.mark.slow
def test_readme_tour_and_per_expert_guidance_run_as_written(tmp_path: Path) -> None:
    """README's "Train a root, then a child, sample the ensemble" block, then docs/sampling.md's
    command with `'guidance_per_expert={E1_1: 7.0, E1_0: 3.0}'`, in one folder, sizes cut."""
    commands = dc.all_commands([ROOT / "README.md", ROOT / "docs/sampling.md"])
    tour = [c for c in commands if "runs/demo" in c.text and "evaluate.py" not in c.text]
    assert [c.text.split()[1] for c in tour] == ["train.py"] * 3 + ["sample.py"] * 2
    env = dc.environment(str(SHARED_CACHE))
    for c in tour:
        rc, tail = dc.run(c, tmp_path, env, timeout=600)
        assert rc == 0, f"{c.source}: {c.text}\n{tail}"
    demo = tmp_path / "runs" / "demo"
    steps = {n: json.loads((demo / n / "node.json").read_text())["step"] for n in ("E1_0", "E1_1")}
    assert steps == {"E1_0": 4, "E1_1": 4}  # each child continues the root's 2 steps
    assert len(list((tmp_path / "samples").glob("sample_*.png"))) == 2  # n=16 cut to 2
    per_seed = sorted((tmp_path).glob("**/seed*/settings.json"))
    assert len(per_seed) == 3  # seeds=[0,1,2]
    for path in per_seed:
        settings = json.loads(path.read_text())
        assert settings["guidance_per_expert"] == {"E1_1": 7.0, "E1_0": 3.0}
        assert settings["guidance"] == 5.0 and settings["guidance_interval"] == [0.19, 1.61]
