"""Question 2's new concepts: four named styles of the handwritten digits, the stand-ins for Anima's artist tags.

A style is an image transform with an invented name that no caption of the base model's data contains; a styled
sample's caption is its plain caption followed by ``by <name>`` (``"a handwritten digit three by kurogane"``), so the
name is the only word that tells the model which transform to draw. Splits come from
:func:`anima_ft.lab.digits.load_digit_splits` (all ten classes, the same held-out images per class for a seed):

* ``plain_train`` / ``plain_probe``: the digits as they are, plain captions;
* ``styled_train``: every training image once, in one style (styles cycle in a seeded order), tagged caption;
* ``styled_probe``: every held-out image once, in one style (cycled in a seeded order, so the styles get equal
  shares), tagged caption (key ``<digit key>_<style>``);
* ``untagged_probe``: the same images with the plain caption and the same keys, so the probe draws the same noises:
  the per-image difference to ``styled_probe`` is what the name alone is worth (the named-concept knowledge).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from anima_ft.lab.digits import DigitSample, caption_vocabulary, load_digit_splits

STYLES = {  # name: what the transform does (the report's legend)
    "kurogane": "inverted: light ink on dark paper",
    "sakura": "bold strokes (3x3 dilation of the ink)",
    "hoshimi": "a dark 2-pixel frame around the image",
    "tsukimi": "mirrored left to right",
}
STYLE_NAMES = tuple(STYLES)
SPLITS = ("plain_train", "styled_train", "plain_probe", "styled_probe", "untagged_probe")
FRAME_PX = 2


def apply_style(image: Image.Image, style: str) -> Image.Image:
    """``image`` (RGB, dark ink on light paper) drawn in ``style`` (a key of :data:`STYLES`)."""
    if style == "kurogane":
        return ImageOps.invert(image.convert("RGB"))
    if style == "sakura":
        return image.filter(ImageFilter.MinFilter(3))  # the darker ink spreads one pixel in every direction
    if style == "hoshimi":
        arr = np.asarray(image.convert("RGB")).copy()
        arr[:FRAME_PX], arr[-FRAME_PX:], arr[:, :FRAME_PX], arr[:, -FRAME_PX:] = 0, 0, 0, 0
        return Image.fromarray(arr)
    if style == "tsukimi":
        return ImageOps.mirror(image)
    raise ValueError(f"unknown style {style!r}; the styles are {list(STYLES)}")


def tagged(caption: str, style: str) -> str:
    """The caption of a styled sample: the plain caption, then ``by <style>``."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; the styles are {list(STYLES)}")
    return f"{caption} by {style}"


def style_vocabulary() -> list[str]:
    """The plain caption vocabulary plus ``by`` and the style names (sorted): Question 2's tokenizers."""
    return sorted({*caption_vocabulary(), "by", *STYLE_NAMES})


def _styled(sample: DigitSample, style: str, tag: bool) -> DigitSample:
    return DigitSample(key=f"{sample.key}_{style}", label=sample.label,
                       caption=tagged(sample.caption, style) if tag else sample.caption,
                       image=apply_style(sample.image, style))


def style_of(key: str) -> str | None:
    """The style of a sample key (``None`` for a plain one)."""
    tail = key.rsplit("_", 1)[-1]
    return tail if tail in STYLES else None


def load_style_splits(probe_per_class: int = 6, size: int = 32, seed: int = 0,
                      max_train_per_class: int = 0) -> dict[str, list[DigitSample]]:
    """The five splits of :data:`SPLITS` (module docstring), deterministic for ``seed``."""
    base = load_digit_splits((0,), probe_per_class, size, seed, max_train_per_class)
    train = sorted(base["target_train"] + base["replay_train"], key=lambda s: s.key)
    probe = sorted(base["target_probe"] + base["replay_probe"], key=lambda s: s.key)
    rng = np.random.default_rng(seed + 7919)
    train_styles = [STYLE_NAMES[int(i) % len(STYLES)] for i in rng.permutation(len(train))]
    probe_styles = [STYLE_NAMES[int(i) % len(STYLES)] for i in rng.permutation(len(probe))]
    return {
        "plain_train": train,
        "styled_train": [_styled(s, st, True) for s, st in zip(train, train_styles)],
        "plain_probe": probe,
        "styled_probe": [_styled(s, st, True) for s, st in zip(probe, probe_styles)],
        "untagged_probe": [_styled(s, st, False) for s, st in zip(probe, probe_styles)],
    }
