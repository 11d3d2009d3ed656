"""The frozen encoders of the data path (Qwen-Image VAE, Qwen3 text encoder + tokenizers), built from file paths.

Shared by ``anima-ft prepare`` and by the image-folder eval sets of ``anima-ft probe`` / ``swap`` / ``distill``: each
command turns its flags into an :class:`EncoderSpec`, and :func:`build_encoders` loads what it names.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
ENCODER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EncoderSpec:
    """Where the encoders come from. ``tiny_seed`` set: tiny random encoders (demos and tests only)."""

    qwen_tokenizer: str
    t5_tokenizer: str
    vae: str | None = None  # official single .safetensors file or a diffusers directory
    qwen: str | None = None  # single .safetensors file (+ qwen_config) or an HF directory
    qwen_config: str | None = None
    tiny_seed: int | None = None
    vae_dtype: str = "fp32"
    qwen_dtype: str = "bf16"

    @classmethod
    def from_namespace(cls, args) -> EncoderSpec:
        """From parsed ``--vae --qwen --qwen-config --qwen-tokenizer --t5-tokenizer --tiny-encoders --vae-dtype
        --qwen-dtype`` flags (the names every command uses)."""
        return cls(qwen_tokenizer=args.qwen_tokenizer, t5_tokenizer=args.t5_tokenizer, vae=args.vae, qwen=args.qwen,
                   qwen_config=getattr(args, "qwen_config", None), tiny_seed=args.tiny_encoders,
                   vae_dtype=args.vae_dtype, qwen_dtype=args.qwen_dtype)


def _dtype(name: str, what: str) -> torch.dtype:
    if name not in ENCODER_DTYPES:
        raise ValueError(f"{what} {name!r} is not one of {sorted(ENCODER_DTYPES)}")
    return ENCODER_DTYPES[name]


def build_encoders(spec: EncoderSpec, device: str):
    """``(vae, text_encoder)`` named by ``spec`` on ``device``; ``ValueError`` when the paths are missing."""
    from anima_ft.model.text_encoder import TextEncoder, tiny_qwen3
    from anima_ft.model.tokenizers import load_tokenizers
    from anima_ft.model.vae import AnimaVAE, tiny_vae

    vae_dtype, qwen_dtype = _dtype(spec.vae_dtype, "vae dtype"), _dtype(spec.qwen_dtype, "qwen dtype")
    if not (spec.qwen_tokenizer and spec.t5_tokenizer):
        raise ValueError("the text encoder needs --qwen-tokenizer and --t5-tokenizer directories")
    if spec.tiny_seed is not None:
        log.warning("tiny random encoders (seed %d): for demos and tests only", spec.tiny_seed)
        qwen_tok, t5_tok = load_tokenizers(spec.qwen_tokenizer, spec.t5_tokenizer)
        vae = AnimaVAE(tiny_vae(seed=spec.tiny_seed).to(device, vae_dtype))
        qwen = tiny_qwen3(seed=spec.tiny_seed).to(device, qwen_dtype)
        return vae, TextEncoder(qwen, qwen_tok, t5_tok)
    if not spec.vae or not spec.qwen:
        raise ValueError("--vae and --qwen are required (or --tiny-encoders SEED for a demo)")
    if os.path.isdir(spec.vae):
        vae = AnimaVAE.from_pretrained(spec.vae, device=device, dtype=vae_dtype)
    else:
        vae = AnimaVAE.from_single_file(spec.vae, device=device, dtype=vae_dtype)
    text = TextEncoder.from_pretrained(spec.qwen, spec.qwen_tokenizer, spec.t5_tokenizer,
                                       qwen_config_path=spec.qwen_config, device=device, dtype=qwen_dtype)
    return vae, text
