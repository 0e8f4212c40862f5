"""Pictures of samples: image grids (outputs in [-1, 1]) and 2-D scatter plots, as PNG."""

from __future__ import annotations

import os

import numpy as np


def to_uint8(x):
    """(N, H, W, C) floats in [-1, 1] to uint8 0..255 (clipped)."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images, cols=None, pad=1):
    """Tiles (N, H, W, C) uint8 images into one (rows*(H+pad)-pad, cols*(W+pad)-pad, C) image."""
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        out[r * (h + pad): r * (h + pad) + h, k * (w + pad): k * (w + pad) + w] = img
    return out


def save_scatter(path, points, size=256, extent=3.0):
    """Writes 2-D points (N, 2) as black dots on a white size x size PNG spanning +-extent."""
    from PIL import Image

    img = np.full((size, size), 255, np.uint8)
    ij = np.round((np.asarray(points)[:, :2] / extent + 1) / 2 * (size - 1)).astype(int)
    ok = np.all((ij >= 0) & (ij < size), axis=1)
    img[size - 1 - ij[ok, 1], ij[ok, 0]] = 0
    _save(path, Image.fromarray(img))


def save_grid(path, x, cols=None, scale=1):
    """Writes samples x (N, H, W, C) in [-1, 1] as a PNG grid, upscaled by `scale` (nearest)."""
    from PIL import Image

    g = grid(to_uint8(x), cols)
    if scale > 1:
        g = g.repeat(scale, axis=0).repeat(scale, axis=1)
    _save(path, Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g))


def _save(path, image):
    write_atomically(path, image.save)


def write_atomically(path, write):
    """Calls `write(tmp)` on a temporary name beside `path` (same extension, so writers that
    infer the format from it still do), then renames it to `path`: a crash or kill never leaves
    a half-written file under the final name, nor destroys the previous one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    write(tmp)
    os.replace(tmp, path)
