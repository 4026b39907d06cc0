"""Schedules as data: which nodes are trained, from which parent, for how many steps.

A schedule is a list of stages. A stage trains one node (`node`, any name `experts.parse_node`
reads, or an expert spec of conf/expert/ such as `wan22_t2v_high`) into the run directory
`run_dir/<name>` (`name` defaults to the node), starting from the weights of the stage
`parent` (default: the node's tree parent; complements: the root). Its `steps` are trained
on top of the parent's global step, exactly like `train.py steps=`, so a stage's target global
step is its parent's target plus its own steps. Every count carries a `source` saying where
the number came from, because most of the paper's are not recoverable.

A stage whose `name` differs from its node (the Fig. 7 root continued to 800K, `E0_0_cont`) is
trained as a custom interval with the node's quantiles, so it gets its own directory without
touching the node it continues. No SLURM here: `slurm/submit.py` turns a schedule into jobs.

`ediff-schedule fig7 [--scale 0.0001]` prints a schedule as a tree;
`ediff-schedule run fig7_toy [scale=S] [run_dir=D] [train.py overrides]` trains it
on this machine (experiments/runner.py)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from ediff_train import CONF_DIR
from ediff_train.core.experts import Node, node_from_config, parse_node
from ediff_train.errors import EdiffError
from ediff_train.experiments.stage_model import model_overrides

SCHEDULE_DIR = CONF_DIR / "schedule"


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


_NODE_NAME = re.compile(r"^(E\d+_\d+|not_.*)$")


_STAGE_KEYS = {
    "node",
    "name",
    "parent",
    "steps",
    "source",
    "overrides",
    "continue",
    "branch_step",
    "model",
}


@dataclass(frozen=True)
class Stage:
    """One training run: `node` into `run_dir/<name>`, from stage `parent`, for `steps` more."""

    name: str
    node: Node
    parent: str | None
    steps: int
    source: str
    overrides: tuple[str, ...] = ()
    continues: bool = False  # the parent stage's run going on (continuation.py), not a child
    branch_step: int | None = None  # start from the parent's hand-off at this tree step

    def expert_args(self) -> list[str]:
        """train.py overrides that select this stage's node, run name and parent (and, for a
        continuation, the folder it continues: `${run_dir}/<parent>`)."""
        cont = [f"continue_from=${{run_dir}}/{self.parent}"] if self.continues else []
        branch = [f"branch_step={self.branch_step}"] if self.branch_step is not None else []
        return [*self._node_args(), *cont, *branch]

    def _node_args(self) -> list[str]:
        node = self.node
        if self.name == node.name:
            args = [f"expert={node.name}"]
            if self.parent != node.parent:
                args.append(f"expert.parent={self.parent}")
            return args
        # its own directory: the node's quantiles as a custom interval (see the module doc)
        ((lo, hi),) = node.pieces
        return [
            "expert=interval",
            f"expert.name={self.name}",
            f"expert.u_lo={lo!r}",
            f"expert.u_hi={hi!r}",
            f"expert.parent={self.parent}",
        ]

    def train_args(self, run_dir: str | Path) -> list[str]:
        """All train.py overrides for this stage: node, `run_dir=`, `steps=`, its own overrides."""
        return [*self.expert_args(), f"run_dir={run_dir}", f"steps={self.steps}", *self.overrides]


@dataclass(frozen=True)
class Schedule:
    """Stages in dependency order (every parent before its children), validated."""

    name: str
    description: str
    stages: tuple[Stage, ...]
    overrides: tuple[str, ...] = ()
    scale: float = 1.0

    def __post_init__(self) -> None:
        self._by_name()  # duplicate names
        for stage in self.stages:
            _check_stage(stage, self._by_name())
        ordered = tuple(_toposort(self.stages))
        object.__setattr__(self, "stages", ordered)
        self.targets()  # branch steps inside their parents' runs

    def _by_name(self) -> dict[str, Stage]:
        out: dict[str, Stage] = {}
        for s in self.stages:
            if s.name in out:
                raise EdiffError(f"schedule {self.name}: two stages are named {s.name!r}")
            out[s.name] = s
        return out

    def __getitem__(self, name: str) -> Stage:
        try:
            return self._by_name()[name]
        except KeyError:
            raise EdiffError(f"schedule {self.name} has no stage {name!r}") from None

    def children(self, name: str | None) -> list[Stage]:
        return [s for s in self.stages if s.parent == name]

    def branch_points(self, name: str) -> list[int]:
        """Tree steps at which stage `name` must write hand-off files for its children."""
        return sorted({s.branch_step for s in self.children(name) if s.branch_step is not None})

    def stage_overrides(self, stage: Stage) -> list[str]:
        """train.py overrides the schedule derives for a stage (its children's branch points)."""
        at = self.branch_points(stage.name)
        return [f"handoff_at=[{','.join(map(str, at))}]"] if at else []

    def targets(self) -> dict[str, int]:
        """Global step each stage ends at: its start (the parent's target, or its branch step)
        plus its own steps."""
        out: dict[str, int] = {}
        for s in self.stages:  # parents come first
            start = s.branch_step if s.branch_step is not None else out[s.parent] if s.parent else 0
            out[s.name] = start + s.steps
        for s in self.stages:
            if s.branch_step is not None:
                lo = out[s.parent] - self[s.parent].steps  # type: ignore[index]
                if not lo < s.branch_step < out[s.parent]:  # type: ignore[index]
                    raise EdiffError(
                        f"schedule {self.name}: stage {s.name}: branch_step {s.branch_step} "
                        f"must lie inside its parent {s.parent}'s run ({lo}, "
                        f"{out[s.parent]}) exclusive"
                    )  # type: ignore[index]
        return out

    def scaled(self, factor: float) -> Schedule:
        """The same schedule with every stage's steps × factor, rounded, at least 1."""
        factor = float(factor)
        if not (math.isfinite(factor) and factor > 0):
            raise EdiffError(f"scale must be a positive number, got {factor}")

        def scale(n: int) -> int:
            return max(1, math.floor(n * factor + 0.5))

        stages = tuple(
            replace(
                s,
                steps=scale(s.steps),
                branch_step=None if s.branch_step is None else scale(s.branch_step),
            )
            for s in self.stages
        )
        return replace(self, stages=stages, scale=self.scale * factor)

    def walk(self) -> Iterator[tuple[str, Stage]]:
        """(tree prefix, stage) depth-first, children in file order."""

        def visit(stage: Stage, lead: str, last: bool, top: bool) -> Iterator[tuple[str, Stage]]:
            yield ("" if top else lead + ("└── " if last else "├── ")), stage
            kids = self.children(stage.name)
            inner = "" if top else lead + ("    " if last else "│   ")
            for i, kid in enumerate(kids):
                yield from visit(kid, inner, i == len(kids) - 1, False)

        for root in self.children(None):
            yield from visit(root, "", True, True)

    def tree(self, notes: bool = True, law: Any = None) -> str:
        """The schedule as a tree: σ interval, steps, global step at the end, source. `law`:
        the noise law the stages train under (default EDM's), whose quantiles the tree nodes'
        σ follow (bands given in σ, such as the Wan2.2 pair, stay where they are)."""
        targets = self.targets()
        rows = [
            (
                prefix + _label(s),
                _sigma(
                    s.node if law is None or s.node.kind == "interval" else replace(s.node, law=law)
                ),
                f"{s.steps:,}",
                f"{targets[s.name]:,}",
                s.source,
            )
            for prefix, s in self.walk()
        ]
        head = ("stage", "σ interval", "steps", "→ step", "where the count comes from")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]

        def line(r: tuple[str, ...]) -> str:
            cells = [
                r[0].ljust(widths[0]),
                r[1].ljust(widths[1]),
                r[2].rjust(widths[2]),
                r[3].rjust(widths[3]),
            ]
            return "  ".join(cells + ([r[4]] if notes else [])).rstrip()

        scale = "" if self.scale == 1 else f" at scale {self.scale:g}"
        out = [f"schedule {self.name}{scale}: {len(self.stages)} stages"]
        if self.description:
            out.append(self.description.strip())
        out += ["", line(head), *map(line, rows)]
        return "\n".join(out)


def _label(stage: Stage) -> str:
    if stage.name == stage.node.name:
        return stage.name
    return (
        f"{stage.name} ({stage.node.name} continued)"
        if stage.continues
        else f"{stage.name} (as {stage.node.name})"
    )


def _sigma(node: Node) -> str:
    def f(x: float) -> str:
        return "∞" if math.isinf(x) else f"{x:.4g}"

    return " ∪ ".join(f"[{f(lo)}, {f(hi)})" for lo, hi in node.sigma_pieces)


def _check_stage(stage: Stage, stages: Mapping[str, Stage]) -> None:
    where = f"stage {stage.name}"
    if not _RUN_NAME.match(stage.name):
        raise EdiffError(f"{where}: name must be a plain directory name (letters, digits, _.+-)")
    if isinstance(stage.steps, bool) or not isinstance(stage.steps, int) or stage.steps < 1:
        raise EdiffError(f"{where}: steps must be a whole number ≥ 1, got {stage.steps!r}")
    if not stage.source.strip():
        raise EdiffError(f"{where}: say where its step count comes from (source: ...)")
    if stage.parent is None:
        if stage.node.parent is not None:
            raise EdiffError(
                f"{where}: node {stage.node.name} starts from a parent's weights; give a parent "
                "stage (only the root E0_0 trains from scratch)"
            )
    elif stage.parent not in stages:
        raise EdiffError(
            f"{where}: its parent {stage.parent!r} is not a stage of this schedule "
            "(add it, or set parent: to one that is)"
        )
    if stage.name != stage.node.name:
        if len(stage.node.pieces) != 1:
            raise EdiffError(
                f"{where}: a stage named apart from its node needs a single-interval node, "
                f"and {stage.node.name} has {len(stage.node.pieces)} pieces"
            )
        if stage.parent is None:
            raise EdiffError(f"{where}: a stage named apart from its node needs a parent stage")
        if _NODE_NAME.match(stage.name):
            raise EdiffError(
                f"{where}: trains node {stage.node.name} but is named like another node; "
                f"pick a run name such as {stage.node.name}_cont"
            )
    if stage.branch_step is not None and (
        isinstance(stage.branch_step, bool)
        or not isinstance(stage.branch_step, int)
        or stage.parent is None
        or stage.continues
    ):
        raise EdiffError(
            f"{where}: branch_step must be a whole number (a tree step of its "
            "parent stage's run), on a child stage, not a continuation"
        )
    if stage.continues:
        parent = stages.get(stage.parent or "")
        if parent is None or parent.node.pieces != stage.node.pieces or stage.name == parent.name:
            raise EdiffError(
                f"{where}: continue: true goes on with its parent stage's run, so it "
                "needs a parent stage of the same node and a name of its own"
            )


def _toposort(stages: tuple[Stage, ...]) -> list[Stage]:
    """Parents before children, otherwise the file's order (so a valid file keeps its order,
    which is also the order jobs are submitted in). Cycles are an error."""
    done: set[str] = set()
    out: list[Stage] = []
    pending = list(stages)
    while pending:
        ready = next((s for s in pending if s.parent is None or s.parent in done), None)
        if ready is None:
            names = ", ".join(f"{s.name} ← {s.parent}" for s in pending)
            raise EdiffError(f"stages form a cycle and none can start: {names}")
        out.append(ready)
        done.add(ready.name)
        pending.remove(ready)
    return out


def stage_from_config(cfg: Mapping[str, Any], index: int = 0) -> Stage:
    """A stage from one `stages:` entry of a schedule file."""
    if not isinstance(cfg, Mapping) or "node" not in cfg:
        raise EdiffError(f"stage #{index + 1} needs at least node: and steps:")
    unknown = sorted(set(cfg) - _STAGE_KEYS)
    if unknown:
        raise EdiffError(
            f"stage #{index + 1} ({cfg['node']}): unknown keys {unknown}; "
            f"allowed: {sorted(_STAGE_KEYS)}"
        )
    node = stage_node(str(cfg["node"]))
    name = str(cfg.get("name") or node.name)
    parent = cfg["parent"] if "parent" in cfg else node.parent
    steps = cfg.get("steps")
    if isinstance(steps, float) and steps.is_integer():
        steps = int(steps)
    return Stage(
        name=name,
        node=node,
        parent=None if parent is None else str(parent),
        steps=steps,  # type: ignore[arg-type]  # checked by the Schedule
        source=str(cfg.get("source") or ""),
        overrides=(
            *model_overrides(cfg.get("model")),
            *(str(o) for o in cfg.get("overrides") or ()),
        ),
        continues=_flag(cfg.get("continue", False), f"stage #{index + 1} ({cfg['node']})"),
        branch_step=cfg.get("branch_step"),
    )


def stage_node(name: str) -> Node:
    """A tree node or complement by name, or an expert spec of conf/expert/ by file name (the
    Wan2.2 pairs: bands given in σ, whose parent is the root), which train.py takes as
    `expert=<name>` just the same."""
    try:
        return parse_node(name)
    except EdiffError:
        spec = CONF_DIR / "expert" / f"{name}.yaml"
        if not (_RUN_NAME.match(name) and spec.is_file()):
            raise
    node = node_from_config(yaml.safe_load(spec.read_text()) or {})
    if node.name != name:
        raise EdiffError(
            f"conf/expert/{name}.yaml names its expert {node.name!r}: a stage's node must be a "
            "spec whose name: is its file name"
        )
    return node


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise EdiffError(f"{where}: continue must be true or false, got {value!r}")
    return value


def schedule_from_config(cfg: Mapping[str, Any], name: str | None = None) -> Schedule:
    """A validated schedule from a loaded `conf/schedule/*.yaml` (or the `schedule:` group)."""
    if hasattr(cfg, "_metadata"):  # an OmegaConf node: plain containers from here on
        cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    name = str(cfg.get("name") or name or "schedule")
    raw = cfg.get("stages")
    if not raw:
        raise EdiffError(f"schedule {name} has no stages")
    try:
        stages = tuple(stage_from_config(s, i) for i, s in enumerate(raw))
    except EdiffError as e:
        raise EdiffError(f"schedule {name}: {e}") from None
    try:
        return Schedule(
            name,
            str(cfg.get("description") or ""),
            stages,
            tuple(str(o) for o in cfg.get("overrides") or ()),
        )
    except EdiffError as e:
        msg = str(e) if str(e).startswith("schedule ") else f"schedule {name}: {e}"
        raise EdiffError(msg) from None


def available() -> list[str]:
    return sorted(p.stem for p in SCHEDULE_DIR.glob("*.yaml"))


def schedule_path(name: str) -> Path:
    """conf/schedule/NAME.yaml, or NAME itself when it is a path to a YAML file."""
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = SCHEDULE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise EdiffError(f"unknown schedule {name!r}: choose from {', '.join(available())}")
    return path


def load_schedule(name: str) -> Schedule:
    """A schedule by name (conf/schedule/NAME.yaml) or by path to a YAML file."""

    path = schedule_path(name)
    return schedule_from_config(yaml.safe_load(path.read_text()) or {}, path.stem)
