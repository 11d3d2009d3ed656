"""The mini-lab's real images: scikit-learn's handwritten digits (1,797 scans of 8x8 pixels, shipped inside the
scikit-learn wheel, so no download), upscaled, turned into dark ink on light paper, and captioned from their labels.

Splits are deterministic for a seed: per class, a shuffled order puts the first ``probe_per_class`` images into the
held-out probe set (never trained on) and the rest into the training set. Classes in ``target_classes`` form the
fine-tuning target; the others are the replay classes (whose forgetting the probe measures).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {word} written by hand",
    "a scanned handwritten {digit}",
    "a small grayscale picture of the digit {word}",
    "handwritten {word} in dark ink on light paper",
    "the digit {digit}, handwritten",
)


@dataclass
class DigitSample:
    """One captioned digit: ``key`` (unique, no dots), class ``label``, ``caption`` and the RGB ``image``."""

    key: str
    label: int
    caption: str
    image: Image.Image


def caption_for(label: int, variant: int) -> str:
    """Caption ``variant`` (any int, taken modulo the template count) of a digit class."""
    if not 0 <= label <= 9:
        raise ValueError(f"digit label {label} is outside 0..9")
    template = CAPTION_TEMPLATES[variant % len(CAPTION_TEMPLATES)]
    return template.format(word=DIGIT_WORDS[label], digit=label)


def caption_vocabulary() -> list[str]:
    """Every lower-case word (and digit) any caption can contain, sorted: the tiny tokenizers' vocabulary."""
    words = set()
    for label in range(10):
        for v in range(len(CAPTION_TEMPLATES)):
            words.update(caption_for(label, v).replace(",", " ,").split())
    return sorted(words)


def digit_image(pixels_8x8: np.ndarray, size: int) -> Image.Image:
    """An 8x8 scan (ink 0..16) -> ``size x size`` RGB image, dark ink (0) on light paper (255), bicubic upscale."""
    gray = (255.0 - np.asarray(pixels_8x8, dtype=np.float64) * (255.0 / 16.0)).round().astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def load_digit_splits(
    target_classes: tuple[int, ...] = (0, 1, 2),
    probe_per_class: int = 8,
    size: int = 32,
    seed: int = 0,
    max_train_per_class: int = 0,
) -> dict[str, list[DigitSample]]:
    """The four lab splits: ``target_train``, ``replay_train``, ``target_probe``, ``replay_probe``.

    ``max_train_per_class`` > 0 caps the training images per class (the ``--quick`` run); 0 keeps all.
    Captions cycle through the templates in a seeded order, so every template appears in every class.
    """
    from sklearn.datasets import load_digits

    bad = [c for c in target_classes if not 0 <= c <= 9]
    if bad or not target_classes or len(set(target_classes)) == 10:
        raise ValueError(f"target_classes={target_classes}: pick a proper, non-empty subset of 0..9")
    if size % 16:
        raise ValueError(f"image size {size} must be a multiple of 16 (codec patch 8 x DiT patch 2)")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    splits: dict[str, list[DigitSample]] = {k: [] for k in ("target_train", "replay_train", "target_probe",
                                                              "replay_probe")}
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        idx = idx[rng.permutation(len(idx))]
        if len(idx) <= probe_per_class:
            raise ValueError(f"class {label} has {len(idx)} images; probe_per_class={probe_per_class} leaves none")
        variants = rng.permutation(len(idx))
        group = "target" if label in target_classes else "replay"
        for pos, (i, var) in enumerate(zip(idx, variants)):
            split = "probe" if pos < probe_per_class else "train"
            if split == "train" and max_train_per_class and pos - probe_per_class >= max_train_per_class:
                break
            splits[f"{group}_{split}"].append(DigitSample(
                key=f"digit{label}_{int(i):04d}",
                label=label,
                caption=caption_for(label, int(var)),
                image=digit_image(digits.images[i], size),
            ))
    return splits


def write_image_folder(samples: list[DigitSample], folder: str | Path) -> Path:
    """Write ``KEY.png`` + ``KEY.txt`` (caption) per sample: the layout ``anima-ft prepare`` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for s in samples:
        s.image.save(folder / f"{s.key}.png")
        (folder / f"{s.key}.txt").write_text(s.caption + "\n", encoding="utf-8")
    return folder


def pixels_from_images(images: list[Image.Image]) -> np.ndarray:
    """RGB PIL images -> float32 array ``[B, 3, H, W]`` in ``[-1, 1]``."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])  # [B, H, W, 3]
    return (arr.transpose(0, 3, 1, 2) / 127.5 - 1.0).astype(np.float32)
