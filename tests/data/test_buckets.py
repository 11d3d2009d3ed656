"""Aspect buckets and the resize + center crop, against their defining formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from anima_ft.data.buckets import make_buckets, nearest_bucket, resize_and_crop


@pytest.mark.parametrize("area,step", [(1024 * 1024, 64), (512 * 512, 32), (64 * 64, 16)])
def test_buckets_are_multiples_of_16_near_the_area(area, step):
    buckets = make_buckets(area, 16, step)
    side = round(math.sqrt(area) / 16) * 16
    assert (side, side) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert 0.5 <= w / h <= 2.0
        assert abs(w * h - area) <= 8 * w + 16  # nearest multiple of 16 for h: |h - area/w| <= 8
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


def test_one_megapixel_buckets_match_the_known_landscape():
    buckets = make_buckets()
    assert (1024, 1024) in buckets and len(buckets) >= 10
    assert nearest_bucket(3000, 2000, buckets)[0] > nearest_bucket(3000, 2000, buckets)[1]
    with pytest.raises(ValueError, match="aspect range"):
        make_buckets(min_ar=1.5)


@settings(max_examples=60, deadline=None)
@given(st.integers(8, 300), st.integers(8, 300))
def test_resize_and_crop_geometry(w, h):
    """Covers the bucket, keeps the aspect within rounding, crop centered; pixels = crop of the resized image."""
    buckets = make_buckets(64 * 64, 16, 16)
    bucket = nearest_bucket(w, h, buckets)
    assert all(abs(math.log(bucket[0] / bucket[1]) - math.log(w / h)) <= abs(math.log(b[0] / b[1]) - math.log(w / h))
               for b in buckets)
    rng = np.random.default_rng(w * 1000 + h)
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    out, geo = resize_and_crop(image, bucket)
    rw, rh = geo["resized_size"]
    assert out.size == bucket and geo["original_size"] == [w, h]
    assert rw >= bucket[0] and rh >= bucket[1] and min(rw - bucket[0], rh - bucket[1]) <= 1
    assert geo["crop"] == [(rw - bucket[0]) // 2, (rh - bucket[1]) // 2]
    ref = image.resize((rw, rh), Image.Resampling.BICUBIC) if (rw, rh) != (w, h) else image
    left, top = geo["crop"]
    assert np.array_equal(np.asarray(out), np.asarray(ref)[top : top + bucket[1], left : left + bucket[0]])
