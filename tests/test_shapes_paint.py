"""metric=paint and metric=switch on shapes (issue 31, item 4): what is placed where is read
from the exact reader's scenes. Known answers on hand-made scenes; the metrics end to end are
commands (docs/shapes.md)."""

from __future__ import annotations

import torch

from ediff_train.data.toys.shapes_scene import Obj
from ediff_train.evaluation.shapes_paint import column_masks, object_pairs, phrase, placement

RED_CIRCLE, BLUE_SQUARE = (0, 0), (1, 2)  # (shape, colour)


def test_columns_are_the_grids_outer_thirds() -> None:
    left, right = column_masks(32)
    assert left[:, :10].eq(1).all() and left[:, 10:].eq(0).all()
    assert right[:, 22:].eq(1).all() and right[:, :22].eq(0).all()


def test_placement_counts_what_the_scenes_show() -> None:
    scenes = [
        [Obj(0, 0, 1, 3), Obj(1, 2, 0, 8)],  # red circle left (cell 3), blue square right (8)
        [Obj(0, 0, 1, 4), Obj(1, 2, 0, 2)],  # red circle centre, blue square top right
        [Obj(1, 2, 0, 0)],  # only the blue square, on the left
    ]
    # red circle painted left, blue square right: 2 + 1 phrases placed, 1 sample with both,
    # 5 of 6 phrases drawn at all
    assert placement(scenes, RED_CIRCLE, BLUE_SQUARE, swap=False).tolist() == [3, 1, 5]
    # swapped: red circle right (none), blue square left (sample 3)
    assert placement(scenes, RED_CIRCLE, BLUE_SQUARE, swap=True).tolist() == [1, 0, 5]


def test_pairs_are_distinct_kinds_with_phrases_in_the_vocabulary() -> None:
    from ediff_train.data.toys.shapes_scene import vocabulary

    pairs = object_pairs(50, torch.Generator().manual_seed(0))
    assert len(pairs) == 50 and all(a != b for a, b in pairs)
    words = {w for a, b in pairs for w in f"a {phrase(a)} and a {phrase(b)}".split()}
    assert words <= vocabulary()
    assert phrase(RED_CIRCLE) == "red circle"


def test_switch_pairs_differ_everywhere_and_follows_reads_each_attribute() -> None:
    from ediff_train.data.toys.shapes_scene import vocabulary
    from ediff_train.evaluation.shapes_switch import follows, prompt, switch_pairs

    pairs = switch_pairs(30, torch.Generator().manual_seed(1))
    for a, b in pairs:
        assert a.shape != b.shape and a.colour != b.colour and a.cell != b.cell
        assert set(prompt(a).split()) <= vocabulary()
    a, b = Obj(0, 0, 0, 0), Obj(1, 2, 0, 8)
    assert prompt(a) == "a red circle at the top left"
    # drawn: A's place with B's colour and shape
    got = follows([Obj(1, 2, 1, 0)], a, b)
    assert got == {"position": (True, False), "colour": (False, True), "shape": (False, True)}
    assert follows([], a, b)["position"] == (False, False)
