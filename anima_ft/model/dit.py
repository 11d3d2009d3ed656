"""The Cosmos-Predict2 DiT ("MiniTrainDIT") with the LLM adapter as a child: the whole Anima network.

Parameter names equal the official checkpoint's keys without the ``net.`` prefix (docs/model.md#keys), so
``state_dict()`` is the official layout. Shape legend: B batch, C latent channels, T frames (1 for images), H/W
latent height/width, Hp/Wp = H/p, W/p, L = T*Hp*Wp image tokens, D width, N context tokens, Cc context width.

Forward (docs/model.md#patchify to #adaln), with t = sigma in [0, 1]:

    x17   = cat(x, zeros)                                  # padding-mask channel, index 16
    h     = Linear(patchify(x17))                          # feature index c*p*p + m*p + n
    s     = cat(cos(t f), sin(t f)),  f_k = 10000^(-k/(D/2))
    lora  = linear_2(SiLU(linear_1(s)))                    # [B, 3D] added to every block's modulation
    emb   = RMSNorm(s)                                     # the adaLN conditioning vector
    block: x += g_sa  * SelfAttn(LN(x)(1+s_sa)+b_sa)       # q/k RMSNorm, 3D RoPE, no mask
           x += g_ca  * CrossAttn(LN(x)(1+s_ca)+b_ca, ctx) # q/k RMSNorm, no RoPE, no mask
           x += g_mlp * MLP(LN(x)(1+s_mlp)+b_mlp)          # exact GELU, no bias
    out   = unpatchify(Linear(LN(x)(1+scale)+shift))       # feature index (p1*p+p2)*C + c
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import AnimaConfig
from .layers import QKNormAttention, RMSNorm, get_ops
from .llm_adapter import LLMAdapter
from .rope import rope3d_table


def patchify(x_B_C_T_H_W: torch.Tensor, p: int) -> torch.Tensor:
    """``b c t (h m) (w n) -> b t h w (c m n)``: the channel index varies slowest."""
    B, C, T, H, W = x_B_C_T_H_W.shape
    x = x_B_C_T_H_W.view(B, C, T, H // p, p, W // p, p)
    return x.permute(0, 2, 3, 5, 1, 4, 6).reshape(B, T, H // p, W // p, C * p * p)


def unpatchify(y_B_T_Hp_Wp_F: torch.Tensor, p: int, out_channels: int) -> torch.Tensor:
    """``b t h w (m n c) -> b c t (h m) (w n)``: the channel index varies fastest (asymmetric to patchify)."""
    B, T, Hp, Wp, _ = y_B_T_Hp_Wp_F.shape
    y = y_B_T_Hp_Wp_F.view(B, T, Hp, Wp, p, p, out_channels)
    return y.permute(0, 6, 1, 2, 4, 3, 5).reshape(B, out_channels, T, Hp * p, Wp * p)


def timestep_sinusoid(t_B: torch.Tensor, dim: int) -> torch.Tensor:
    """``cat(cos(t f), sin(t f))`` with ``f_k = exp(-ln(10000) k / (dim/2))``, in (at least) fp32."""
    half = dim // 2
    dtype = torch.promote_types(t_B.dtype, torch.float32)
    k = torch.arange(half, dtype=dtype, device=t_B.device)
    freqs = torch.exp(-math.log(10000.0) * k / half)
    angles = t_B.to(dtype)[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class PatchEmbed(nn.Module):
    """``proj.1`` is the Linear (index 0 is the parameter-free rearrange in the official layout)."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Identity(), nn.Linear(in_features, dim, bias=False))


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear; with adaLN-LoRA its output is the 3D-wide LoRA term, not the condition."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.linear_2 = nn.Linear(dim, out_dim, bias=False)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(s)))


def _modulation(dim: int, lora_dim: int, chunks: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, lora_dim, bias=False), nn.Linear(lora_dim, chunks * dim, bias=False))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(F.gelu(self.layer1(x)))


class Block(nn.Module):
    """One DiT block: adaLN-modulated self-attention, cross-attention and MLP with raw gates."""

    def __init__(self, cfg: AnimaConfig):
        super().__init__()
        d = cfg.model_channels
        self.eps = cfg.eps
        self.self_attn = QKNormAttention(d, d, cfg.num_heads, eps=cfg.eps)
        self.cross_attn = QKNormAttention(d, cfg.crossattn_emb_channels, cfg.num_heads, eps=cfg.eps)
        self.mlp = MLP(d, cfg.mlp_hidden)
        self.adaln_modulation_self_attn = _modulation(d, cfg.adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = _modulation(d, cfg.adaln_lora_dim, 3)
        self.adaln_modulation_mlp = _modulation(d, cfg.adaln_lora_dim, 3)
        self.ops = get_ops("sdpa")

    def forward(self, x_B_L_D, emb_B_1_D, lora_B_1_3D, ctx_B_N_Cc, rope):
        shift_sa, scale_sa, gate_sa = (self.adaln_modulation_self_attn(emb_B_1_D) + lora_B_1_3D).chunk(3, dim=-1)
        shift_ca, scale_ca, gate_ca = (self.adaln_modulation_cross_attn(emb_B_1_D) + lora_B_1_3D).chunk(3, dim=-1)
        shift_mlp, scale_mlp, gate_mlp = (self.adaln_modulation_mlp(emb_B_1_D) + lora_B_1_3D).chunk(3, dim=-1)
        ops = self.ops
        h = ops.modulated_layer_norm(x_B_L_D, shift_sa, scale_sa, self.eps)
        y = self.self_attn(h, rope_q=rope, rope_k=rope)
        x_B_L_D, h = ops.gated_residual_modulated_layer_norm(x_B_L_D, gate_sa, y, shift_ca, scale_ca, self.eps)
        y = self.cross_attn(h, ctx_B_N_Cc)
        x_B_L_D, h = ops.gated_residual_modulated_layer_norm(x_B_L_D, gate_ca, y, shift_mlp, scale_mlp, self.eps)
        return x_B_L_D + gate_mlp * self.mlp(h)


class FinalLayer(nn.Module):
    def __init__(self, cfg: AnimaConfig):
        super().__init__()
        d, p = cfg.model_channels, cfg.patch_spatial
        self.eps = cfg.eps
        self.adaln_modulation = _modulation(d, cfg.adaln_lora_dim, 2)
        self.linear = nn.Linear(d, p * p * cfg.out_channels, bias=False)
        self.ops = get_ops("sdpa")

    def forward(self, x_B_L_D, emb_B_1_D, lora_B_1_3D):
        d = x_B_L_D.shape[-1]
        shift, scale = (self.adaln_modulation(emb_B_1_D) + lora_B_1_3D[..., : 2 * d]).chunk(2, dim=-1)
        return self.linear(self.ops.modulated_layer_norm(x_B_L_D, shift, scale, self.eps))


class Anima(nn.Module):
    """Cosmos-Predict2 DiT + LLM adapter. ``forward`` = ``denoise(x_t, t, encode_context(...))``."""

    def __init__(self, cfg: AnimaConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, p = cfg.model_channels, cfg.patch_spatial
        self.x_embedder = PatchEmbed((cfg.in_channels + 1) * p * p, d)
        self.t_embedder = nn.Sequential(nn.Identity(), TimestepEmbedding(d, 3 * d))
        self.t_embedding_norm = RMSNorm(d, cfg.eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.final_layer = FinalLayer(cfg)
        self.llm_adapter = LLMAdapter(cfg.adapter) if cfg.adapter is not None else None
        self.attention_backend = "sdpa"
        self.checkpoint_blocks: list[bool] = [False] * cfg.num_blocks

    def set_attention_backend(self, backend: str) -> None:
        """Route every attention and adaLN op through ``backend`` (``sdpa``, ``reference`` or ``triton``)."""
        ops = get_ops(backend)  # raises ValueError for an unknown backend
        for m in self.modules():
            if hasattr(m, "ops"):
                m.ops = ops
        self.attention_backend = backend

    def set_activation_checkpointing(self, fraction: float) -> None:
        """Recompute the first ``round(fraction * num_blocks)`` blocks in backward (0 = off, 1 = all)."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"activation checkpointing fraction must be in [0, 1], got {fraction}")
        n = round(fraction * self.cfg.num_blocks)
        self.checkpoint_blocks = [i < n for i in range(self.cfg.num_blocks)]

    def external_parameter_uses(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """``(module, parameter)`` pairs where ``module.forward`` reads a parameter of a child it never calls.

        The q/k RMSNorm weights are handed to the fused attention op instead of running ``q_norm``/``k_norm``
        themselves. ZeRO-3 gathers a parameter only when its owner's forward runs, so the trainer registers these
        pairs (``deepspeed.zero.register_external_parameter``) before sharding.
        """
        return [
            (m, norm.weight)
            for m in self.modules()
            if isinstance(m, QKNormAttention)
            for norm in (m.q_norm, m.k_norm)
        ]

    def encode_context(self, qwen_states_B_S_Cs, qwen_mask_B_S, t5_ids_B_L, t5_mask_B_L) -> torch.Tensor:
        """The adapter's context ``[B, max(L, context_tokens), Cc]``, zero past each caption's T5 length."""
        if self.llm_adapter is None:
            raise ValueError("this model has no LLM adapter; pass a precomputed context to denoise()")
        return self.llm_adapter(qwen_states_B_S_Cs, qwen_mask_B_S, t5_ids_B_L, t5_mask_B_L, self.cfg.context_tokens)

    def denoise(self, x_B_C_T_H_W: torch.Tensor, t_B: torch.Tensor, ctx_B_N_Cc: torch.Tensor) -> torch.Tensor:
        """Predicted velocity (eps - x0) for latents ``x_t`` at time ``t`` (sigma in [0, 1], NOT x1000)."""
        cfg = self.cfg
        p = cfg.patch_spatial
        B, C, T, H, W = x_B_C_T_H_W.shape
        if C != cfg.in_channels or H % p or W % p:
            raise ValueError(f"latents must be [B, {cfg.in_channels}, T, H, W] with H, W divisible by {p}; "
                             f"got {list(x_B_C_T_H_W.shape)}")
        if T != 1:
            raise ValueError(f"only single-frame latents (T=1) are supported, got T={T}")
        dtype = self.x_embedder.proj[1].weight.dtype
        ctx = ctx_B_N_Cc.to(dtype)
        if ctx.shape[1] < cfg.context_tokens:  # always attend over >= 512 zero-padded tokens (docs/model.md#context)
            ctx = F.pad(ctx, (0, 0, 0, cfg.context_tokens - ctx.shape[1]))
        x17 = torch.cat([x_B_C_T_H_W, x_B_C_T_H_W.new_zeros(B, 1, T, H, W)], dim=1).to(dtype)
        x_B_L_D = self.x_embedder.proj[1](patchify(x17, p)).flatten(1, 3)
        s_B_1_D = timestep_sinusoid(t_B.reshape(B), cfg.model_channels)[:, None, :].to(dtype)
        lora_B_1_3D = self.t_embedder[1](s_B_1_D)
        emb_B_1_D = self.t_embedding_norm(s_B_1_D)
        rope = rope3d_table(T, H // p, W // p, cfg.head_dim, cfg.rope_extrapolation, device=x_B_L_D.device)
        for block, ckpt in zip(self.blocks, self.checkpoint_blocks, strict=True):
            if ckpt and self.training and torch.is_grad_enabled():
                x_B_L_D = checkpoint(block, x_B_L_D, emb_B_1_D, lora_B_1_3D, ctx, rope, use_reentrant=False)
            else:
                x_B_L_D = block(x_B_L_D, emb_B_1_D, lora_B_1_3D, ctx, rope)
        y = self.final_layer(x_B_L_D, emb_B_1_D, lora_B_1_3D)
        return unpatchify(y.view(B, T, H // p, W // p, -1), p, cfg.out_channels)

    def forward(self, x_t, t, qwen_states, qwen_mask, t5_ids, t5_mask) -> torch.Tensor:
        """``denoise(x_t, t, encode_context(qwen_states, qwen_mask, t5_ids, t5_mask))``."""
        return self.denoise(x_t, t, self.encode_context(qwen_states, qwen_mask, t5_ids, t5_mask))
