"""A digit classifier to score the lab's samples: does a sample for "a handwritten digit seven" look like a seven?

Multinomial logistic regression (scikit-learn) on 8x8 ink maps, fitted on the lab's training images. Every image,
training or sampled, goes through the same :func:`ink_8x8`: RGB in ``[-1, 1]`` -> gray -> 8x8 box average -> ink in
``[0, 16]`` (the scale of the original scans). The report gives its accuracy on the held-out probe images after the
codec round trip as the reference a perfect generator would reach, and chance is 10%.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def ink_8x8(images_B_3_H_W: torch.Tensor) -> np.ndarray:
    """Images in ``[-1, 1]`` (H, W multiples of 8) -> float64 ``[B, 64]`` ink maps (0 = paper, 16 = full ink)."""
    gray = images_B_3_H_W.double().clamp(-1, 1).mean(dim=1, keepdim=True)  # [B, 1, H, W]
    small = F.adaptive_avg_pool2d(gray, 8)  # [B, 1, 8, 8]
    return ((1.0 - small) * 8.0).flatten(1).numpy()  # -1 (ink) -> 16, +1 (paper) -> 0


class DigitClassifier:
    """Logistic regression over :func:`ink_8x8` features; deterministic (lbfgs, fixed iterations)."""

    def __init__(self, images_B_3_H_W: torch.Tensor, labels: list[int]):
        from sklearn.linear_model import LogisticRegression

        if len(set(labels)) != 10:
            raise ValueError(f"the classifier needs training images of all ten digits, got {sorted(set(labels))}")
        self.model = LogisticRegression(max_iter=2000, C=1.0).fit(ink_8x8(images_B_3_H_W), np.asarray(labels))

    def predict(self, images_B_3_H_W: torch.Tensor) -> np.ndarray:
        """Predicted digit per image ``[B]``."""
        return self.model.predict(ink_8x8(images_B_3_H_W))

    def accuracy(self, images_B_3_H_W: torch.Tensor, labels: list[int]) -> float:
        """Share of images predicted as their label."""
        return float(np.mean(self.predict(images_B_3_H_W) == np.asarray(labels)))


def gray_16x16(images_B_3_H_W: torch.Tensor) -> np.ndarray:
    """Images in ``[-1, 1]`` (H, W multiples of 16) -> float64 ``[B, 256]`` gray maps (-1 = black, 1 = white)."""
    gray = images_B_3_H_W.double().clamp(-1, 1).mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(gray, 16).flatten(1).numpy()


class StyleClassifier:
    """Reads (style, digit) from an image: logistic regression over :func:`gray_16x16` with one class per pair
    (style index 0 = plain, 1.. = the named styles), so a mirrored three and a plain three are told apart by shape.
    Deterministic (lbfgs, fixed iterations)."""

    def __init__(self, images_B_3_H_W: torch.Tensor, styles: list[int], digits: list[int]):
        from sklearn.linear_model import LogisticRegression

        if len(styles) != len(digits) or len(styles) != images_B_3_H_W.shape[0]:
            raise ValueError(f"{images_B_3_H_W.shape[0]} images, {len(styles)} styles, {len(digits)} digits: "
                             "give one style and one digit per image")
        pairs = np.asarray(styles) * 10 + np.asarray(digits)
        self.model = LogisticRegression(max_iter=3000, C=1.0).fit(gray_16x16(images_B_3_H_W), pairs)

    def predict(self, images_B_3_H_W: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``(style index [B], digit [B])`` per image."""
        pairs = self.model.predict(gray_16x16(images_B_3_H_W))
        return pairs // 10, pairs % 10
