"""Model configuration: the DiT and LLM-adapter hyperparameters, inferred from checkpoint tensor shapes.

Defaults are full-size Anima (Cosmos-Predict2-2B + 6-layer adapter), see docs/model.md#sizes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass
class AdapterConfig:
    """The LLM adapter (`net.llm_adapter.*`): T5 ids (queries) cross-attending to Qwen3 hidden states."""

    source_dim: int = 1024
    """Width of the Qwen3 hidden states (the cross-attention key/value input)."""
    model_dim: int = 1024
    """Adapter width; equals the output (T5-like context) width, so there is no `in_proj`."""
    num_layers: int = 6
    """Number of adapter transformer blocks."""
    num_heads: int = 16
    """Attention heads (head dim = model_dim / num_heads = 64 for Anima)."""
    mlp_hidden: int = 4096
    """Hidden width of each block's MLP (mlp.0 / mlp.2)."""
    vocab_size: int = 32128
    """Rows of the T5 token embedding table."""
    rope_theta: float = 10000.0
    """Base of the 1D RoPE applied in both attentions (separate position spaces for source and target)."""
    eps: float = 1e-6
    """Epsilon of every RMSNorm in the adapter."""

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads


@dataclass
class AnimaConfig:
    """The Cosmos-Predict2 DiT ("MiniTrainDIT") plus an optional LLM adapter."""

    model_channels: int = 2048
    """DiT width D."""
    num_blocks: int = 28
    """Number of DiT blocks (28 for Anima; community variants have 40 or 52)."""
    num_heads: int = 16
    """Attention heads (head dim D / num_heads = 128)."""
    in_channels: int = 16
    """Latent channels (the padding-mask channel is added on top: patch-embed input is (in+1)*p*p)."""
    out_channels: int = 16
    """Predicted velocity channels."""
    patch_spatial: int = 2
    """Spatial patch size p (patch_temporal is fixed at 1)."""
    crossattn_emb_channels: int = 1024
    """Context width (the adapter's output width)."""
    mlp_ratio: float = 4.0
    """MLP hidden = mlp_ratio * D."""
    adaln_lora_dim: int = 256
    """Rank of the adaLN-LoRA modulation."""
    rope_extrapolation: tuple[float, float, float] = (1.0, 4.0, 4.0)
    """NTK extrapolation ratios (t, h, w) of the 3D RoPE."""
    context_tokens: int = 512
    """The context is zero-padded to at least this many tokens (never masked, docs/model.md#context)."""
    eps: float = 1e-6
    """Epsilon of the LayerNorms and RMSNorms."""
    adapter: AdapterConfig | None = field(default_factory=AdapterConfig)
    """The LLM adapter; None for a bare DiT."""

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.model_channels * self.mlp_ratio)

    def validate(self) -> None:
        """Raise ValueError on inconsistent hyperparameters."""
        if self.model_channels % self.num_heads:
            raise ValueError(f"model_channels={self.model_channels} is not divisible by num_heads={self.num_heads}")
        hd = self.head_dim
        dim_hw = hd // 6 * 2
        if dim_hw % 2 or (hd - 2 * dim_hw) % 2 or dim_hw <= 2:
            raise ValueError(f"head dim {hd} cannot be split into even 3D-RoPE parts (h=w={dim_hw}, t={hd - 2 * dim_hw})")
        if self.adapter is not None:
            a = self.adapter
            if a.model_dim != self.crossattn_emb_channels:
                raise ValueError(
                    f"adapter.model_dim={a.model_dim} must equal crossattn_emb_channels={self.crossattn_emb_channels}"
                )
            if a.model_dim % a.num_heads or a.head_dim % 2:
                raise ValueError(f"adapter model_dim={a.model_dim} / num_heads={a.num_heads} must give an even head dim")

    def to_dict(self) -> dict:
        """Plain-dict form (for checkpoint metadata)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> AnimaConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        d = dict(d)
        adapter = d.pop("adapter", None)
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown AnimaConfig keys {bad}; valid keys: {sorted(known)}")
        if "rope_extrapolation" in d:
            d["rope_extrapolation"] = tuple(d["rope_extrapolation"])
        return cls(**d, adapter=None if adapter is None else AdapterConfig(**adapter))

    @classmethod
    def tiny(cls, num_blocks: int = 2, with_adapter: bool = True) -> AnimaConfig:
        """A tiny Anima-shaped config for tests and the CPU demo (real T5 vocabulary, 512 context tokens)."""
        return cls(
            model_channels=64,
            num_blocks=num_blocks,
            num_heads=4,
            crossattn_emb_channels=32,
            adaln_lora_dim=16,
            adapter=AdapterConfig(source_dim=32, model_dim=32, num_layers=2, num_heads=2, mlp_hidden=128)
            if with_adapter
            else None,
        )


_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_ADAPTER_BLOCK_RE = re.compile(r"^llm_adapter\.blocks\.(\d+)\.")


def _need(shapes: Mapping[str, Sequence[int]], key: str) -> Sequence[int]:
    if key not in shapes:
        raise ValueError(f"cannot infer the Anima config: tensor {key!r} is missing from the checkpoint")
    return shapes[key]


def infer_config(shapes: Mapping[str, Sequence[int]]) -> AnimaConfig:
    """Infer an :class:`AnimaConfig` from ``{name: shape}`` with names WITHOUT the ``net.`` prefix.

    Block counts are counted from the keys (28, 40 or 52 DiT blocks all work); head counts come from the q-norm
    width (the head dim).
    """
    x_emb = _need(shapes, "x_embedder.proj.1.weight")
    d = int(x_emb[0])
    p = 2
    in_channels = int(x_emb[1]) // (p * p) - 1
    out_channels = int(_need(shapes, "final_layer.linear.weight")[0]) // (p * p)
    num_blocks = len({int(m.group(1)) for k in shapes if (m := _BLOCK_RE.match(k))})
    if num_blocks == 0:
        raise ValueError("cannot infer the Anima config: no `blocks.N.` tensors in the checkpoint")
    head_dim = int(_need(shapes, "blocks.0.self_attn.q_norm.weight")[0])
    cfg = AnimaConfig(
        model_channels=d,
        num_blocks=num_blocks,
        num_heads=d // head_dim,
        in_channels=in_channels,
        out_channels=out_channels,
        patch_spatial=p,
        crossattn_emb_channels=int(_need(shapes, "blocks.0.cross_attn.k_proj.weight")[1]),
        mlp_ratio=int(_need(shapes, "blocks.0.mlp.layer1.weight")[0]) / d,
        adaln_lora_dim=int(_need(shapes, "blocks.0.adaln_modulation_self_attn.1.weight")[0]),
        adapter=None,
    )
    if "llm_adapter.embed.weight" in shapes:
        vocab, model_dim = (int(s) for s in shapes["llm_adapter.embed.weight"])
        a_head = int(_need(shapes, "llm_adapter.blocks.0.self_attn.q_norm.weight")[0])
        cfg.adapter = AdapterConfig(
            source_dim=int(_need(shapes, "llm_adapter.blocks.0.cross_attn.k_proj.weight")[1]),
            model_dim=model_dim,
            num_layers=len({int(m.group(1)) for k in shapes if (m := _ADAPTER_BLOCK_RE.match(k))}),
            num_heads=model_dim // a_head,
            mlp_hidden=int(_need(shapes, "llm_adapter.blocks.0.mlp.0.weight")[0]),
            vocab_size=vocab,
        )
    cfg.validate()
    return cfg
