"""Aspect-ratio buckets near a target pixel area, and the resize + center crop that maps an image onto one.

A bucket is ``(W, H)`` in pixels, both multiples of ``multiple`` (16 = VAE 8x times patch 2, docs/model.md#vae).
Widths step by ``width_step`` between ``sqrt(area * min_ar)`` and ``sqrt(area * max_ar)`` (``ar = W / H``); each
width gets the height (a multiple of ``multiple``) whose area is nearest ``area``; the square bucket is always there.
An image goes to the bucket with the nearest log aspect ratio, is scaled (bicubic) to cover it, and is center
cropped; the crop's top-left corner in the scaled image is recorded.
"""

from __future__ import annotations

import math

from PIL import Image


def make_buckets(
    area: int = 1024 * 1024, multiple: int = 16, width_step: int = 64, min_ar: float = 0.5, max_ar: float = 2.0
) -> list[tuple[int, int]]:
    """All ``(W, H)`` buckets, sorted by aspect ratio ``W / H``."""
    if area < multiple * multiple or multiple <= 0 or width_step % multiple:
        raise ValueError(f"bucket area {area} / multiple {multiple} / width_step {width_step}: need area >= "
                         "multiple^2 and width_step a multiple of `multiple`")
    if not 0 < min_ar <= 1 <= max_ar:
        raise ValueError(f"bucket aspect range [{min_ar}, {max_ar}] must contain 1")

    def height_for(w: int) -> int:
        return max(multiple, round(area / w / multiple) * multiple)

    side = max(multiple, round(math.sqrt(area) / multiple) * multiple)
    buckets = {(side, side)}
    w_lo, w_hi = math.sqrt(area * min_ar), math.sqrt(area * max_ar)
    w = math.ceil(w_lo / width_step) * width_step
    while w <= w_hi:
        h = height_for(w)
        if min_ar <= w / h <= max_ar:
            buckets.add((w, h))
        w += width_step
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose log aspect ratio is closest to the image's (ties: the first, i.e. the narrower)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} must be positive")
    log_ar = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - log_ar))


def resize_and_crop(image: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, dict]:
    """Scale ``image`` to cover ``bucket`` and center crop it to exactly ``bucket``.

    Returns the cropped RGB image and ``{"original_size": [w, h], "resized_size": [w, h], "crop": [left, top]}``.
    """
    W, H = bucket
    w, h = image.size
    scale = max(W / w, H / h)
    rw, rh = max(W, round(w * scale)), max(H, round(h * scale))
    resized = image.resize((rw, rh), Image.Resampling.BICUBIC) if (rw, rh) != (w, h) else image
    left, top = (rw - W) // 2, (rh - H) // 2
    cropped = resized.crop((left, top, left + W, top + H))
    return cropped, {"original_size": [w, h], "resized_size": [rw, rh], "crop": [left, top]}
