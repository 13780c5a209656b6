"""Rendering scenes to pixels (uint8 HWC) and per-pixel object masks, and the ground-truth object at
every patch of any patch grid, so that heatmaps over patches can be scored."""

from __future__ import annotations

from functools import cache

import numpy as np

from vlmscope.data.scene import RADIUS, Scene

RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 200), "orange": (245, 140, 30),
}


@cache
def stencil(shape: str, radius: int) -> np.ndarray:
    """Boolean (2r+1, 2r+1) footprint of a shape centred on the middle pixel."""
    d = np.arange(-radius, radius + 1, dtype=np.float32)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    r = float(radius)
    if shape == "circle":
        m = dx**2 + dy**2 <= r * r + r * 0.5
    elif shape == "square":
        m = np.maximum(np.abs(dx), np.abs(dy)) <= round(0.8 * r)
    elif shape == "diamond":
        m = np.abs(dx) + np.abs(dy) <= r
    elif shape == "triangle":  # apex up, base at 0.8 r
        m = (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)
    elif shape == "cross":
        arm = round(r / 3)
        m = ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    m.setflags(write=False)
    return m


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 background of the scene's domain."""
    n = scene.size
    img = np.full((n, n, 3), float(scene.grey), dtype=np.float32)
    if scene.domain == "textured":  # low-contrast stripes of random period and orientation
        yy, xx = np.mgrid[0:n, 0:n]
        period, angle = rng.integers(4, 9), rng.uniform(0, np.pi)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
        img += (18.0 * np.sign(np.sin(phase)))[..., None]
    elif scene.domain != "plain" and scene.domain != "noisy":
        raise ValueError(f"unknown domain {scene.domain!r}; valid: plain, textured, noisy")
    return img


def render_with_mask(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) uint8 and object mask (H, W) int16: object index, -1 for background."""
    rng = np.random.default_rng(scene.seed)
    img = _background(scene, rng)
    mask = np.full((scene.size, scene.size), -1, dtype=np.int16)
    for i, o in enumerate(scene.objects):
        r = RADIUS[o.size]
        st = stencil(o.shape, r)
        ys, xs = slice(o.y - r, o.y + r + 1), slice(o.x - r, o.x + r + 1)
        img[ys, xs][st] = RGB[o.colour]
        mask[ys, xs][st] = i
    if scene.domain == "noisy":
        img += rng.normal(0.0, 14.0, size=img.shape).astype(np.float32)
    else:
        img += rng.normal(0.0, 3.0, size=img.shape).astype(np.float32)  # light sensor noise everywhere
    return np.clip(img, 0, 255).astype(np.uint8), mask


def render(scene: Scene) -> np.ndarray:
    """The scene's image, (H, W, 3) uint8."""
    return render_with_mask(scene)[0]


def object_mask(scene: Scene) -> np.ndarray:
    """The scene's per-pixel object index, (H, W) int16, -1 for background (no noise is drawn)."""
    mask = np.full((scene.size, scene.size), -1, dtype=np.int16)
    for i, o in enumerate(scene.objects):
        r = RADIUS[o.size]
        mask[o.y - r : o.y + r + 1, o.x - r : o.x + r + 1][stencil(o.shape, r)] = i
    return mask


def patch_objects(scene_or_mask: Scene | np.ndarray, grid: int | tuple[int, int],
                  min_fraction: float = 0.1) -> np.ndarray:
    """Object index at every patch of a (rows, cols) patch grid, (rows, cols) int64, -1 for none.

    Rule: a patch belongs to the object covering the most of its pixels (ties: lower index), provided
    that object covers at least `min_fraction` of the patch; otherwise -1. Patch edges are
    round(k * H / rows), so grids that do not divide the image size work too."""
    mask = object_mask(scene_or_mask) if isinstance(scene_or_mask, Scene) else np.asarray(scene_or_mask)
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    h, w = mask.shape
    ry = np.searchsorted(np.round(np.arange(1, rows) * h / rows), np.arange(h), side="right")
    cx = np.searchsorted(np.round(np.arange(1, cols) * w / cols), np.arange(w), side="right")
    patch = ry[:, None] * cols + cx[None, :]  # (H, W) patch id of every pixel
    k = int(mask.max()) + 2  # labels -1..max -> 0..k-1
    counts = np.bincount((patch * k + mask + 1).ravel(), minlength=rows * cols * k).reshape(rows * cols, k)
    area = np.bincount(patch.ravel(), minlength=rows * cols)
    obj_counts = counts[:, 1:]
    if obj_counts.shape[1] == 0:
        return np.full((rows, cols), -1, dtype=np.int64)
    best = obj_counts.argmax(axis=1)
    ok = obj_counts[np.arange(rows * cols), best] >= np.maximum(min_fraction * area, 1e-9)
    return np.where(ok, best, -1).reshape(rows, cols).astype(np.int64)
