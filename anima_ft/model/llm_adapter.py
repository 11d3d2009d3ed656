"""The LLM adapter (`net.llm_adapter.*`): T5 token ids cross-attend to Qwen3 hidden states (docs/model.md#adapter).

Shape legend: B batch, L T5 length (queries, "target"), S Qwen3 length (keys, "source"), C adapter width.

    x = embed[t5_ids]
    for each block:
        x += o_proj(attn(RMSNorm(x); RoPE_t on q and k; key mask = t5_mask))
        x += o_proj(attn(q = RMSNorm(x) with RoPE_t, k/v = qwen states with k RoPE_s; key mask = qwen_mask))
        x += mlp(RMSNorm(x))                     # Linear(+bias) -> exact GELU -> Linear(+bias)
    out = RMSNorm(out_proj(x)); out[~t5_mask] = 0; zero-pad to `min_tokens` rows

Query and key positions live in separate index spaces (docs/model.md#pitfall-8). A caption whose Qwen mask is
all False (the empty caption) gives fully masked cross-attention rows, which return 0 (docs/model.md#pitfall-3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig
from .layers import QKNormAttention, RMSNorm
from .rope import rope1d_table


class AdapterBlock(nn.Module):
    """Self-attention over T5 embeddings, cross-attention to Qwen3 states, MLP; all pre-RMSNorm residual."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        c = cfg.model_dim
        self.norm_self_attn = RMSNorm(c, cfg.eps)
        self.self_attn = QKNormAttention(c, c, cfg.num_heads, out_name="o_proj", eps=cfg.eps)
        self.norm_cross_attn = RMSNorm(c, cfg.eps)
        self.cross_attn = QKNormAttention(c, cfg.source_dim, cfg.num_heads, out_name="o_proj", eps=cfg.eps)
        self.norm_mlp = RMSNorm(c, cfg.eps)
        self.mlp = nn.Sequential(nn.Linear(c, cfg.mlp_hidden), nn.GELU(), nn.Linear(cfg.mlp_hidden, c))

    def forward(self, x_B_L_C, source_B_S_Cs, t5_mask_B_L, source_mask_B_S, rope_t, rope_s):
        x_B_L_C = x_B_L_C + self.self_attn(
            self.norm_self_attn(x_B_L_C), rope_q=rope_t, rope_k=rope_t, key_mask_B_Lk=t5_mask_B_L
        )
        x_B_L_C = x_B_L_C + self.cross_attn(
            self.norm_cross_attn(x_B_L_C), source_B_S_Cs, rope_q=rope_t, rope_k=rope_s, key_mask_B_Lk=source_mask_B_S
        )
        return x_B_L_C + self.mlp(self.norm_mlp(x_B_L_C))


class LLMAdapter(nn.Module):
    """Turns Qwen3 hidden states + T5 ids into the DiT's T5-like cross-attention context."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.blocks = nn.ModuleList(AdapterBlock(cfg) for _ in range(cfg.num_layers))
        self.out_proj = nn.Linear(cfg.model_dim, cfg.model_dim)
        self.norm = RMSNorm(cfg.model_dim, cfg.eps)

    def forward(
        self,
        source_B_S_Cs: torch.Tensor,
        source_mask_B_S: torch.Tensor,
        t5_ids_B_L: torch.Tensor,
        t5_mask_B_L: torch.Tensor,
        min_tokens: int = 512,
    ) -> torch.Tensor:
        """Context ``[B, max(L, min_tokens), C]``: rows past each caption's T5 length are exactly zero."""
        t5_mask = t5_mask_B_L.bool()
        source_mask = source_mask_B_S.bool()
        x = self.embed(t5_ids_B_L)
        # Padded Qwen rows must be zero (docs/model.md#pitfall-1); they are also masked out as keys below.
        source = source_B_S_Cs.to(x.dtype) * source_mask[..., None].to(x.dtype)
        rope_t = rope1d_table(t5_ids_B_L.shape[1], self.cfg.head_dim, self.cfg.rope_theta, x.device)
        rope_s = rope1d_table(source.shape[1], self.cfg.head_dim, self.cfg.rope_theta, x.device)
        for block in self.blocks:
            x = block(x, source, t5_mask, source_mask, rope_t, rope_s)
        out = self.norm(self.out_proj(x))
        out = out * t5_mask[..., None].to(out.dtype)
        if out.shape[1] < min_tokens:
            out = F.pad(out, (0, 0, 0, min_tokens - out.shape[1]))
        return out
