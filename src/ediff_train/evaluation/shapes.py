"""metric=shapes: exact caption accuracy per attribute and shapes-FID over a guidance sweep.

The captions are the first `shapes.captions` of the run's held-out set, each with the claims
stored beside it; images are generated exactly as metric=images does (same seeds, same
resumable folders) and read back by the shapes scorer. Besides the eval.json/sweep.csv/
fid_clip.png of metric=images it writes shapes_attributes.png (accuracy per attribute against
guidance, one panel per ensemble) and shapes_grid.png (one row per prompt, one column per
guidance scale, the scorer's reading under each image: green where the caption holds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from PIL import Image, ImageDraw, ImageFont

from ediff_train.data.heldout import validation_source
from ediff_train.data.toys.shapes import shapes_params
from ediff_train.data.toys.shapes_scene import (
    ATTRIBUTES,
    CELLS,
    COLOURS,
    SHAPES,
    SIZES,
    Obj,
    score_claims,
)
from ediff_train.errors import EdiffError
from ediff_train.evaluation.common import run_specs
from ediff_train.evaluation.images import evaluate_images
from ediff_train.metrics.captions import Item, shapes_items
from ediff_train.metrics.generation import image_path, load_images
from ediff_train.metrics.plots import attribute_plot
from ediff_train.metrics.shapes_score import ShapesScorer
from ediff_train.run.weights import load_train_config


def reading(scene: list[Obj]) -> str:
    """A read scene, one object a line: "s red circle TL" (size initial, colour, shape, cell)."""
    if not scene:
        return "(nothing)"
    cell = ["TL", "T", "TR", "L", "C", "R", "BL", "B", "BR"]
    assert len(cell) == len(CELLS)
    return "\n".join(
        f"{SIZES[o.size][0]} {COLOURS[o.colour]} {SHAPES[o.shape]} {cell[o.cell]}" for o in scene
    )


def evaluate_shapes(cfg: DictConfig) -> dict[str, Any] | None:
    """Score the run's ensembles on the shapes benchmark; rank 0 writes the reports."""
    specs = run_specs(cfg)
    train_cfg = load_train_config(specs[0]["dirs"][0])
    root = str(train_cfg.data.root)
    shapes_params(root)  # one line when the run did not train on shapes
    val = validation_source(root, train_cfg.data.get("val_root"))
    if val is None:
        raise EdiffError(f"metric=shapes needs the held-out split: {root} names none")
    s = cfg.shapes
    items = shapes_items(val[0], int(s.captions), int(s.per_caption))
    described = f"shapes held-out captions (first {s.captions}, {s.per_caption} image(s) each)"

    def make_scorer(*_: Any) -> ShapesScorer:
        return ShapesScorer(root, val[0], int(s.reader_steps))

    report = evaluate_images(cfg, (items, described), make_scorer, metric="shapes")
    if report is None:
        return None
    out = Path(str(cfg.out))
    attribute_plot(report["runs"], list(ATTRIBUTES), out / "shapes_attributes.png")
    grid = shapes_grid(out, report, items[: int(s.grid_rows)], make_scorer())
    for run in report["runs"]:
        for row in run["rows"]:
            attrs = ", ".join(
                f"{k} {v}" for k, v in row["attribute_accuracy"].items() if v is not None
            )
            print(f"{run['label']} guidance {row['guidance']:g}: {attrs}")
    print(f"wrote {out / 'shapes_attributes.png'} and {grid}")
    return report


def shapes_grid(out: Path, report: dict[str, Any], items: list[Item], scorer: Any) -> Path:
    """Rows: prompts (written above); columns: the first ensemble's guidance scales; under
    each image the scorer's reading, green where the whole caption holds, red where not."""
    run = report["runs"][0]
    scales = [r["guidance"] for r in run["rows"]]
    up = 3
    font = ImageFont.load_default()
    side = None
    cells: list[list[tuple[Image.Image, str, bool]]] = []
    for it in items:
        row = []
        for g in scales:
            path = image_path(out / run["label"] / f"guidance_{g:g}", it)
            image = load_images([path])
            seen = scorer.read(image)[0]
            ok = bool(score_claims(it.claims, seen)["caption"])
            pic = Image.open(path).convert("RGB")
            side = pic.width * up
            row.append((pic.resize((side, side), Image.NEAREST), reading(seen), ok))
        cells.append(row)
    assert side is not None
    font_h, lines = 11, 3
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max(
        probe.textlength(line, font=font)
        for row in cells
        for _, t, _ in row
        for line in t.split("\n")
    )
    col_w = int(max(side, widest) + 8)
    width = int(
        max(col_w * len(scales), max(probe.textlength(it.caption, font=font) for it in items) + 8)
    )
    row_h = font_h + 2 + side + font_h * lines + 6
    canvas = Image.new("RGB", (width, font_h + 4 + row_h * len(items)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, g in enumerate(scales):
        draw.text((c * col_w + 4, 2), f"guidance {g:g}", fill=(0, 0, 0), font=font)
    for r, (it, row) in enumerate(zip(items, cells)):
        y = font_h + 4 + r * row_h
        draw.text((4, y), it.caption, fill=(0, 0, 0), font=font)
        for c, (pic, text, ok) in enumerate(row):
            canvas.paste(pic, (c * col_w + 4, y + font_h + 2))
            colour = (0, 128, 0) if ok else (200, 0, 0)
            draw.multiline_text(
                (c * col_w + 4, y + font_h + 2 + side + 1), text, fill=colour, font=font, spacing=1
            )
    path = out / "shapes_grid.png"
    canvas.save(path)
    return path
