"""Pictures people look at: labelled sample grids and side-by-side comparisons (PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def to_uint8(images) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 (C = 1 or 3)."""
    x = np.clip((np.asarray(images, dtype=np.float32) + 1) * 127.5, 0, 255).round().astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def sample_grid(images, labels, *, title: str | None = None, scale: int | None = None, max_per_row: int = 16):
    """A PIL image: one row per class (in order of first appearance), labelled on the left."""
    from PIL import Image, ImageDraw

    pix = to_uint8(images)
    h, w = pix.shape[1:3]
    scale = scale or max(1, 48 // max(h, w))
    labels = [int(v) for v in np.asarray(labels)]
    classes = list(dict.fromkeys(labels))
    rows = {c: [i for i, v in enumerate(labels) if v == c][:max_per_row] for c in classes}
    cols = max(len(r) for r in rows.values())
    cell, pad, left, top = h * scale, 2, 56, 18 if title else 0
    canvas = Image.new("RGB", (left + cols * (w * scale + pad), top + len(classes) * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill="black")
    for r, c in enumerate(classes):
        y0 = top + r * (cell + pad)
        draw.text((4, y0 + cell // 2 - 6), f"class {c}", fill="black")
        for k, i in enumerate(rows[c]):
            tile = Image.fromarray(pix[i].squeeze(-1) if pix.shape[-1] == 1 else pix[i])
            tile = tile.convert("RGB").resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (left + k * (w * scale + pad), y0))
    return canvas


def side_by_side(grids: list, titles: list[str] | None = None):
    """Grids placed left to right on one white canvas."""
    from PIL import Image

    gap = 16
    width = sum(g.width for g in grids) + gap * (len(grids) - 1)
    out = Image.new("RGB", (width, max(g.height for g in grids)), "white")
    x = 0
    for g in grids:
        out.paste(g, (x, 0))
        x += g.width + gap
    return out


def save_png(image, path: Path) -> Path:
    from ditrt.contracts.files import atomic_write

    return atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))
