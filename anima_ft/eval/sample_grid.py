"""Sample grids during training: fixed prompts x fixed seeds, Euler + CFG, decoded by the VAE, saved as one PNG.

Row ``r`` is prompt ``r``, column ``c`` is seed ``c``; the starting noise of a column is ``randn`` from a CPU
generator seeded with that seed, so a column shows how one noise evolves across prompts and steps. The negative
prompt is the empty caption (docs/model.md#empty-caption: Qwen mask all False, T5 ids ``[1]``).
Sampling follows :func:`anima_ft.diffusion.sampler.euler_sample` with its shifted sigma schedule.

Distributed: call :meth:`SampleGridRunner.run` on every rank. The grid cells are split over ranks (cell ``i`` on
rank ``i % world``); every rank runs the same number of sampling passes (ZeRO-3 gathers parameters inside each
forward), then rank 0 gathers the images and writes ``<out_dir>/samples/step_<step>.png`` (and logs it to wandb when
a wandb run is active). Without a VAE the runner logs one clear warning and does nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

from anima_ft.runtime import world_and_rank

logger = logging.getLogger(__name__)


def compose_grid(images: torch.Tensor, row_labels: Sequence[str], col_labels: Sequence[str],
                 label_height: int = 14, label_width: int = 160) -> Image.Image:
    """Paste ``images`` uint8 ``[R, C, H, W, 3]`` into one PIL image with a label column and a label row.

    Cell ``(r, c)`` sits at ``x = label_width + c * W``, ``y = label_height + r * H``.
    """
    R, C, H, W, _ = images.shape
    grid = Image.new("RGB", (label_width + C * W, label_height + R * H), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(col_labels):
        draw.text((label_width + c * W + 2, 1), str(text), fill="black")
    for r, text in enumerate(row_labels):
        text = str(text)
        lines = [text[i:i + 24] for i in range(0, min(len(text), 24 * max(1, H // 12)), 24)]
        draw.multiline_text((2, label_height + r * H + 2), "\n".join(lines), fill="black")
        for c in range(C):
            grid.paste(Image.fromarray(images[r, c].numpy()), (label_width + c * W, label_height + r * H))
    return grid


def encode_prompts(text_encoder, prompts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(qwen_states [S, Cq], t5_ids [L])]`` per prompt on the CPU, from ``TextEncoder.encode_unpadded``.

    Run once when the runner is built; the text encoder can then be freed.
    """
    return [(e.qwen_states.float().cpu(), e.t5_ids.cpu()) for e in text_encoder.encode_unpadded(list(prompts))]


class SampleGridRunner:
    """Fixed prompts x seeds sample grid every ``every_steps`` steps (see the module docstring).

    ``conditions[r] = (qwen_states [S, Cq], t5_ids [L])`` is the encoded prompt ``r`` (encode once, up front, with
    the frozen text encoder; :func:`encode_prompts` does it). ``latent_size = (h, w)`` in latent pixels (image size /
    8, multiples of 2). ``vae=None`` disables the runner with a warning.
    """

    def __init__(self, prompts: Sequence[str], conditions: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 seeds: Sequence[int], vae, out_dir: str | Path, every_steps: int = 0, num_steps: int = 30,
                 guidance_scale: float = 4.0, shift: float = 3.0, latent_size: tuple[int, int] = (128, 128),
                 log_wandb: bool = True) -> None:
        if len(prompts) != len(conditions) or not prompts:
            raise ValueError(f"{len(prompts)} prompts but {len(conditions)} encoded conditions; give one per prompt")
        if not seeds:
            raise ValueError("sample grid seeds are empty; give at least one, e.g. [0, 1]")
        if latent_size[0] % 2 or latent_size[1] % 2:
            raise ValueError(f"latent_size={latent_size} must be even (image size a multiple of 16)")
        self.prompts, self.conditions, self.seeds = list(prompts), list(conditions), list(seeds)
        self.vae = vae
        self.out_dir = Path(out_dir)
        self.every_steps, self.num_steps = every_steps, num_steps
        self.guidance_scale, self.shift = guidance_scale, shift
        self.latent_size = tuple(latent_size)
        self.log_wandb = log_wandb
        self._warned = False

    def should_run(self, step: int) -> bool:
        """True every ``every_steps`` steps (``every_steps <= 0``: never)."""
        return self.every_steps > 0 and step % self.every_steps == 0

    @staticmethod
    def _inputs(qwen: torch.Tensor, t5: torch.Tensor, device, dtype) -> tuple[torch.Tensor, ...]:
        """Batch-of-one ``(qwen_states, qwen_mask, t5_ids, t5_mask)``; an empty caption gets one masked zero row."""
        s = qwen.shape[0]
        q = torch.zeros(1, max(s, 1), qwen.shape[1], device=device, dtype=dtype)
        q[0, :s] = qwen.to(device=device, dtype=dtype)
        qmask = (torch.arange(max(s, 1), device=device) < s)[None]
        ids = t5.to(device=device, dtype=torch.long)[None]
        return q, qmask, ids, torch.ones_like(ids, dtype=torch.bool)

    @torch.no_grad()
    def sample_cell(self, model: torch.nn.Module, row: int, col: int) -> torch.Tensor:
        """Latents ``[1, 16, 1, h, w]`` (float32) of prompt ``row`` with seed ``col``."""
        from anima_ft.diffusion.sampler import euler_sample, sigma_schedule

        core = getattr(model, "module", model)
        p = next(core.parameters())
        device, dtype = p.device, p.dtype
        qwen, t5 = self.conditions[row]
        gen = torch.Generator().manual_seed(int(self.seeds[col]))
        noise = torch.randn(1, 16, 1, *self.latent_size, generator=gen).to(device=device, dtype=dtype)
        sigmas = sigma_schedule(self.num_steps, self.shift)
        empty = (qwen.new_zeros(0, qwen.shape[1]), torch.tensor([1]))
        if hasattr(p, "ds_tensor"):
            # ZeRO-3 gathers some parameters only inside the root forward (see probe.sample_losses), so every
            # velocity goes through model(x, t, qwen, qmask, t5, t5mask); the adapter then reruns each step.
            cond = self._inputs(qwen, t5, device, dtype)
            uncond = self._inputs(*empty, device, dtype)
            return euler_sample(lambda x, t, c: model(x, t, *c), noise, sigmas, cond, uncond, self.guidance_scale)
        cond = core.encode_context(*self._inputs(qwen, t5, device, dtype))
        uncond = core.encode_context(*self._inputs(*empty, device, dtype))
        return euler_sample(core.denoise, noise, sigmas, cond, uncond, self.guidance_scale)

    @torch.no_grad()
    def sample_images(self, model: torch.nn.Module) -> torch.Tensor | None:
        """All cells as uint8 ``[R, C, H, W, 3]`` on rank 0 (None on other ranks); every rank must call."""
        world, rank = world_and_rank()
        cells = [(r, c) for r in range(len(self.prompts)) for c in range(len(self.seeds))]
        mine: dict[int, torch.Tensor] = {}
        was_training = model.training
        model.eval()
        try:
            for k in range(math.ceil(len(cells) / world)):
                i = k * world + rank
                r, c = cells[i] if i < len(cells) else cells[0]  # padding pass keeps ZeRO-3 ranks in step
                latents = self.sample_cell(model, r, c)
                if i < len(cells):
                    pixels = self.vae.decode(latents.float())[0]  # [3, H, W] in [-1, 1]
                    mine[i] = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu()
        finally:
            model.train(was_training)
        if world > 1:
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(mine, gathered, dst=0)
            if rank != 0:
                return None
            mine = {i: img for part in gathered for i, img in part.items()}
        images = torch.stack([mine[i] for i in range(len(cells))])
        return images.view(len(self.prompts), len(self.seeds), *images.shape[1:])

    def run(self, model: torch.nn.Module, step: int) -> dict[str, str]:
        """Sample, save ``samples/step_<step>.png`` on rank 0 and log it to wandb; returns ``{"samples/path": ...}``."""
        if self.vae is None:
            if not self._warned:
                logger.warning("sample grids skipped: no VAE is configured (set the VAE path in the config to get "
                               "a %dx%d grid every %d steps)", len(self.prompts), len(self.seeds), self.every_steps)
                self._warned = True
            return {}
        images = self.sample_images(model)
        if images is None:
            return {}
        path = self.out_dir / "samples" / f"step_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        compose_grid(images, self.prompts, [f"seed {s}" for s in self.seeds]).save(path)
        logger.info("sample grid for step %d written to %s", step, path)
        if self.log_wandb:
            self._to_wandb(path, step)
        return {"samples/path": str(path)}

    @staticmethod
    def _to_wandb(path: Path, step: int) -> None:
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is not None:
            wandb.log({"samples/grid": wandb.Image(str(path), caption=f"step {step}")}, step=step)
