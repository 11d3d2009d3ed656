"""Sample grids for the lab: one row per digit class, one column per fixed noise, decoded by the PCA patch codec.

Every checkpoint is sampled from the same noises (a CPU generator seeded by ``seed``) and the same captions, so
grids of different checkpoints differ only by the weights. Sampling is ``euler_sample`` (``anima_ft.diffusion``) with
classifier-free guidance against the empty caption (Qwen mask all False, T5 ids ``[1]``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from anima_ft.diffusion.sampler import euler_sample, sigma_schedule
from anima_ft.eval.eval_sets import EvalSample, collate_condition
from anima_ft.lab.codec import PCAPatchCodec


def _context(model, text_encoder, captions: list[str]) -> torch.Tensor:
    """Adapter context ``[B, 512, D]`` of captions encoded one at a time (zero-padded Qwen rows are masked)."""
    ctxs = []
    for enc in text_encoder.encode_unpadded(captions):
        sample = EvalSample(key="grid", latents=torch.zeros(1, 1, 1), qwen_states=enc.qwen_states, t5_ids=enc.t5_ids)
        cond = collate_condition(sample, "cpu", torch.float32)
        ctxs.append(model.encode_context(cond["qwen_states"], cond["qwen_mask"], cond["t5_ids"], cond["t5_mask"]))
    return torch.cat(ctxs)


@torch.no_grad()
def sample_digits(
    model,
    text_encoder,
    codec: PCAPatchCodec,
    captions: list[str],
    num_per_caption: int,
    latent_size: int,
    seed: int = 0,
    num_steps: int = 20,
    guidance_scale: float = 3.0,
    shift: float = 1.0,
) -> torch.Tensor:
    """Decoded images ``[len(captions), num_per_caption, 3, H, W]`` in ``[-1, 1]`` (clamped), float32."""
    model.eval()
    cond = _context(model, text_encoder, captions).repeat_interleave(num_per_caption, dim=0)
    uncond = _context(model, text_encoder, [""])
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_per_caption, codec.latent_channels, 1, latent_size, latent_size, generator=gen)
    noise = noise.repeat(len(captions), 1, 1, 1, 1)  # the same noises in every row
    x0 = euler_sample(model.denoise, noise, sigma_schedule(num_steps, shift), cond, uncond, guidance_scale)
    images = codec.decode(x0[:, :, 0]).clamp(-1, 1)
    return images.view(len(captions), num_per_caption, *images.shape[1:])


def save_grid(images: torch.Tensor, path: str | Path, row_labels: list[str] | None = None, zoom: int = 2,
              label_width: int = 28) -> Path:
    """Tile ``[rows, cols, 3, H, W]`` images in ``[-1, 1]`` into one PNG (optional text label, ``label_width``
    pixels wide, left of each row)."""
    rows, cols, _, H, W = images.shape
    label_w = label_width if row_labels else 0
    pad = 2
    canvas = Image.new("RGB", (label_w + cols * (W * zoom + pad) + pad, rows * (H * zoom + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    for r in range(rows):
        y = pad + r * (H * zoom + pad)
        if row_labels:
            draw.text((4, y + H * zoom // 2 - 5), row_labels[r], fill="black")
        for c in range(cols):
            tile = Image.fromarray(np.ascontiguousarray(arr[r, c])).resize((W * zoom, H * zoom), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + c * (W * zoom + pad), y))
    path = Path(path)
    canvas.save(path)
    return path
