"""Rendering the shapes benchmark's scenes: signed distances, analytic anti-aliasing, numpy only.

Each object's signed distance (in pixels, negative inside) gives its coverage of a pixel as
clip(0.5 − d, 0, 1), a one-pixel ramp across the edge: anti-aliased at any size and exactly
reproducible (float64 numpy, then rounded to uint8), so the same (seed, index) gives the same
bytes on every machine. The background is a gradient between two muted colours, so an object's
colour never has one fixed surround. Everything a render varies besides the scene itself (the
jitter inside the cell, the background) comes from the same per-index generator as the scene.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np

from ediff_train.data.toys.shapes_scene import Obj, sample_scene

RGB = {  # COLOURS' order
    "red": (0.86, 0.16, 0.16),
    "green": (0.18, 0.72, 0.25),
    "blue": (0.22, 0.36, 0.96),
    "yellow": (0.95, 0.86, 0.15),
    "purple": (0.64, 0.26, 0.86),
    "white": (0.95, 0.95, 0.95),
}
PALETTE = np.array(list(RGB.values()))
RADIUS = (0.3, 0.44)  # small, large: the shape's radius as a fraction of a cell's side


def _sdf(shape: int, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed distance to shape `shape` of radius r centred at the origin (image axes, y down)."""
    if shape == 0:  # circle
        return np.hypot(x, y) - r
    if shape == 1:  # square, half side 0.85 r (about a circle's area)
        h = 0.85 * r
        qx, qy = np.abs(x) - h, np.abs(y) - h
        return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
    if shape == 2:  # equilateral triangle pointing up, half side 1.05 r
        h = 1.05 * r
        k = np.sqrt(3.0)
        px, py = np.abs(x) - h, -y + h / k  # flip y: up in the image
        fold = px + k * py > 0
        px, py = (np.where(fold, (px - k * py) / 2, px), np.where(fold, (-k * px - py) / 2, py))
        px = px - np.clip(px, -2 * h, 0)
        return -np.hypot(px, py) * np.sign(py)
    # diamond: a square turned 45°, half diagonal 1.15 r
    return (np.abs(x) + np.abs(y) - 1.15 * r) / np.sqrt(2.0)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """[S, S, 3] in [0, 1]: a linear gradient between two dark, weakly saturated colours."""
    ends = [
        colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.1, 0.38))
        for _ in range(2)
    ]
    angle = rng.uniform(0, 2 * np.pi)
    c = (np.arange(size) + 0.5) / size - 0.5
    t = np.clip(0.5 + np.cos(angle) * c[None, :] + np.sin(angle) * c[:, None], 0, 1)[..., None]
    return (1 - t) * np.array(ends[0]) + t * np.array(ends[1])


def render(scene: Sequence[Obj], size: int, rng: np.random.Generator) -> np.ndarray:
    """One scene as uint8 [S, S, 3]; `rng` supplies the background and each object's jitter."""
    img = _background(rng, size)
    cell = size / 3
    c = np.arange(size) + 0.5
    for o in scene:
        r = RADIUS[o.size] * cell
        slack = 0.8 * (0.5 - RADIUS[o.size]) * cell
        cx = (o.cell % 3 + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (o.cell // 3 + 0.5) * cell + rng.uniform(-slack, slack)
        d = _sdf(o.shape, c[None, :] - cx, c[:, None] - cy, r)
        alpha = np.clip(0.5 - d, 0.0, 1.0)[..., None]
        img = img * (1 - alpha) + PALETTE[o.colour] * alpha
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of image `index` of a stream (0: training, 1: held out, 2+: the scorer's
    renders): disjoint streams, so no held-out scene is drawn from a training index."""
    return np.random.default_rng([int(seed), int(stream), int(index)])


def draw(seed: int, stream: int, index: int, size: int) -> tuple[list[Obj], np.ndarray]:
    """(scene, image) of one index: everything from (seed, stream, index) alone."""
    rng = scene_rng(seed, stream, index)
    scene = sample_scene(rng)
    return scene, render(scene, size, rng)


def draw_many(
    seed: int, stream: int, start: int, count: int, size: int
) -> tuple[list[list[Obj]], np.ndarray]:
    """Scenes and uint8 [N, S, S, 3] images of indices start .. start+count-1."""
    scenes, images = [], np.empty((count, size, size, 3), dtype=np.uint8)
    for k in range(count):
        s, images[k] = draw(seed, stream, start + k, size)
        scenes.append(s)
    return scenes, images
