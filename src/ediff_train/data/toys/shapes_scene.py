"""The shapes benchmark's world: scenes, their captions, and the exact check of a caption.

A scene is 1–3 objects, each a shape, a colour, a size and a cell of a 3×3 grid (one object per
cell), drawn from (seed, index) alone. Its caption is one of several wordings; beside it the
build stores the caption's *claims* (the structured label: which objects, with which attributes,
which relation), so scoring compares structures and never parses text. Every wording mentions
every object, so the number of objects is always a claim.

Cells are numbered row-major from the top left: cell c is row c // 3, column c % 3.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ediff_train.errors import EdiffError

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SIZES = ("small", "large")
CELLS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = ("one", "two", "three")
WORDINGS = ("attributes", "colours", "positions", "relation", "count")
ATTRIBUTES = ("colour", "shape", "size", "position", "count", "relation")
MAX_OBJECTS = 3
SAME_AS_BEFORE = 0.35  # chance an object repeats an earlier one's shape and colour (counts)


@dataclass(frozen=True)
class Obj:
    """One object: indices into SHAPES, COLOURS, SIZES and the cell 0..8."""

    shape: int
    colour: int
    size: int
    cell: int

    def describe(self, size: bool = False) -> str:
        words = ([SIZES[self.size]] if size else []) + [COLOURS[self.colour], SHAPES[self.shape]]
        return " ".join(words)


def sample_scene(rng: np.random.Generator) -> list[Obj]:
    """1–3 objects in distinct cells; some repeat an earlier shape and colour (for counts)."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(9, size=n, replace=False)
    objs: list[Obj] = []
    for cell in cells:
        if objs and rng.random() < SAME_AS_BEFORE:
            src = objs[int(rng.integers(len(objs)))]
            shape, colour = src.shape, src.colour
        else:
            shape, colour = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS)))
        objs.append(Obj(shape, colour, int(rng.integers(len(SIZES))), int(cell)))
    return objs


def relation(a: Obj, b: Obj) -> str:
    """How a lies relative to b: left/right when their columns differ, else above/below."""
    if a.cell % 3 != b.cell % 3:
        return "left of" if a.cell % 3 < b.cell % 3 else "right of"
    return "above" if a.cell // 3 < b.cell // 3 else "below"


def holds(rel: str, a: int, b: int) -> bool:
    """Whether cell a is `rel` cell b (a relation may hold besides the one a caption names)."""
    ra, ca, rb, cb = a // 3, a % 3, b // 3, b % 3
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[rel]


def _article(phrase: str) -> str:
    return "a " + phrase


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _at(cell: int) -> str:
    return "in the center" if cell == 4 else f"at the {CELLS[cell]}"


def wordings_for(scene: Sequence[Obj]) -> tuple[str, ...]:
    """The wordings a scene can be captioned with (a relation needs two objects)."""
    return tuple(w for w in WORDINGS if w != "relation" or len(scene) >= 2)


def caption(scene: Sequence[Obj], wording: str) -> tuple[str, dict[str, Any]]:
    """(caption text, its claims) of `scene` in `wording`.

    claims: {"objects": [{"shape", "colour", "size"?, "cell"?}, ...] (indices; every object of
    the scene), "relation": [i, name, j] or None (objects i and j of that list), "wording"}."""
    if wording not in wordings_for(scene):
        raise EdiffError(f"wording {wording!r} does not fit a scene of {len(scene)} objects")
    keys = {"attributes": ("size",), "colours": (), "positions": ("cell",), "count": ()}
    extra = keys.get(wording, ())
    objects = [
        {"shape": o.shape, "colour": o.colour, **{k: getattr(o, k) for k in extra}} for o in scene
    ]
    rel = None
    if wording == "attributes":
        text = _join([_article(o.describe(size=True)) for o in scene])
    elif wording == "colours":
        text = _join([_article(o.describe()) for o in scene])
    elif wording == "positions":
        text = _join([f"{_article(o.describe())} {_at(o.cell)}" for o in scene])
    elif wording == "relation":
        a, b = scene[0], scene[1]
        rel = [0, relation(a, b), 1]
        text = f"{_article(a.describe())} {rel[1]} {_article(b.describe())}"
        if len(scene) > 2:
            text += f" and {_article(scene[2].describe())}"
    else:  # count: objects grouped by shape and colour, in order of first appearance
        groups: dict[tuple[int, int], int] = {}
        for o in scene:
            groups[(o.shape, o.colour)] = groups.get((o.shape, o.colour), 0) + 1
        parts = [
            f"{NUMBERS[n - 1]} {COLOURS[c]} {SHAPES[s]}{'s' if n > 1 else ''}"
            for (s, c), n in groups.items()
        ]
        text = _join(parts)
        order = sorted(range(len(scene)), key=lambda i: list(groups).index(_sc(scene[i])))
        objects = [objects[i] for i in order]
    return text, {"objects": objects, "relation": rel, "wording": wording}


def _sc(o: Obj) -> tuple[int, int]:
    return (o.shape, o.colour)


def scene_json(scene: Sequence[Obj]) -> list[dict[str, int]]:
    return [asdict(o) for o in scene]


def scene_from_json(rows: Sequence[dict[str, int]]) -> list[Obj]:
    return [Obj(int(r["shape"]), int(r["colour"]), int(r["size"]), int(r["cell"])) for r in rows]


# ------------------------------------------------------------------------ vocabulary


def vocabulary() -> frozenset[str]:
    """Every word any caption can use (prompts outside it are refused: the tiny encoders were
    trained on these captions only)."""
    words = {"a", "and", "at", "the", "in", *NUMBERS}
    for phrase in (*SHAPES, *COLOURS, *SIZES, *CELLS, *RELATIONS):
        words.update(phrase.split())
    words.update(s + "s" for s in SHAPES)
    return frozenset(words)


# ------------------------------------------------------------------------ the exact check


def _agree(claim: dict[str, Any], o: Obj) -> dict[str, bool]:
    out = {"shape": claim["shape"] == o.shape, "colour": claim["colour"] == o.colour}
    if "size" in claim:
        out["size"] = claim["size"] == o.size
    if "cell" in claim:
        out["position"] = claim["cell"] == o.cell
    return out


def score_claims(claims: dict[str, Any], seen: Sequence[Obj]) -> dict[str, bool | None]:
    """Which of a caption's claims the objects `seen` in an image satisfy.

    The caption's objects are matched one-to-one to seen objects by the assignment that
    satisfies most attribute claims (all assignments are tried: at most 3 of at most 9).
    Returns, per attribute of ATTRIBUTES, True/False (all such claims held or not) or None
    (the caption makes no such claim), and "caption": every claim held."""
    want = claims["objects"]
    out: dict[str, bool | None] = {a: None for a in ATTRIBUTES}
    out["count"] = len(seen) == len(want)
    best: tuple[int, dict[str, bool]] | None = None
    slots = list(range(len(seen))) + [None] * len(want)  # None: a claimed object not there
    for pick in itertools.permutations(slots, len(want)):
        if any(p is not None and pick.count(p) > 1 for p in pick):
            continue
        ok: dict[str, bool] = {}
        for claim, p in zip(want, pick):
            agree = (
                _agree(claim, seen[p])
                if p is not None
                else {k: False for k in _agree(claim, Obj(0, 0, 0, 0))}
            )
            for k, v in agree.items():
                ok[k] = ok.get(k, True) and v
        if claims.get("relation"):
            i, rel, j = claims["relation"]
            pi, pj = pick[i], pick[j]
            ok["relation"] = (
                pi is not None and pj is not None and holds(rel, seen[pi].cell, seen[pj].cell)
            )
        total = sum(ok.values())
        if best is None or total > best[0]:
            best = (total, ok)
    assert best is not None
    out.update(best[1])
    out["caption"] = all(v for v in out.values() if v is not None)
    return out


def canonical(claims: dict[str, Any]) -> str:
    """A string equal for equal claims (grouping captions with the same meaning)."""
    objs = sorted(tuple(sorted(o.items())) for o in claims["objects"])
    return repr((objs, claims.get("relation")))
