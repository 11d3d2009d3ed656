"""Parity of our DiT + adapter with diffusers' CosmosTransformer3DModel + AnimaTextConditioner (docs/model.md#verification).

Both are loaded from OUR saved state dict through the key mapping of docs/model.md#keys, every tensor randomized, float64, batch 2,
non-square latents, masks of different lengths including an empty caption.
"""

from __future__ import annotations

import types

import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers import transformer_cosmos

from anima_ft.model import AdapterConfig, AnimaConfig, build_anima

_DIT_RENAMES = [  # order matters (docs/model.md#keys)
    ("t_embedder.1", "time_embed.t_embedder"),
    ("t_embedding_norm", "time_embed.norm"),
    ("blocks", "transformer_blocks"),
    ("adaln_modulation_self_attn.1", "norm1.linear_1"),
    ("adaln_modulation_self_attn.2", "norm1.linear_2"),
    ("adaln_modulation_cross_attn.1", "norm2.linear_1"),
    ("adaln_modulation_cross_attn.2", "norm2.linear_2"),
    ("adaln_modulation_mlp.1", "norm3.linear_1"),
    ("adaln_modulation_mlp.2", "norm3.linear_2"),
    ("self_attn", "attn1"),
    ("cross_attn", "attn2"),
    ("q_proj", "to_q"),
    ("k_proj", "to_k"),
    ("v_proj", "to_v"),
    ("output_proj", "to_out.0"),
    ("q_norm", "norm_q"),
    ("k_norm", "norm_k"),
    ("mlp.layer1", "ff.net.0.proj"),
    ("mlp.layer2", "ff.net.2"),
    ("x_embedder.proj.1", "patch_embed.proj"),
    ("final_layer.adaln_modulation.1", "norm_out.linear_1"),
    ("final_layer.adaln_modulation.2", "norm_out.linear_2"),
    ("final_layer.linear", "proj_out"),
]


def to_diffusers(official: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split an official ``net.`` state dict into diffusers transformer and text-conditioner state dicts."""
    dit, adapter = {}, {}
    for key, t in official.items():
        name = key.removeprefix("net.")
        if name.startswith("llm_adapter."):
            adapter[name.removeprefix("llm_adapter.")] = t
            continue
        for old, new in _DIT_RENAMES:
            name = name.replace(old, new)
        dit[name] = t
    return dit, adapter


def _nearest_resize_shim(monkeypatch):
    """torchvision may be absent on CPU: give the reference side's padding-mask resize a plain-torch stand-in."""

    def resize(img, size, interpolation=None):
        return F.interpolate(img, size=tuple(size), mode="nearest")

    shim = types.SimpleNamespace(
        functional=types.SimpleNamespace(resize=resize), InterpolationMode=types.SimpleNamespace(NEAREST="nearest")
    )
    monkeypatch.setattr(transformer_cosmos, "transforms", shim, raising=False)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * (0.5 / max(p.shape[-1], 1) ** 0.5 + 0.05))


@pytest.fixture(scope="module")
def models():
    cfg = AnimaConfig(
        model_channels=96, num_blocks=2, num_heads=4, crossattn_emb_channels=32, adaln_lora_dim=16, context_tokens=16,
        adapter=AdapterConfig(source_dim=24, model_dim=32, num_layers=2, num_heads=2, mlp_hidden=128, vocab_size=64),
    )
    ours = build_anima(cfg, dtype=torch.float64)
    _randomize(ours, 0)
    official = {"net." + k: v.clone() for k, v in ours.state_dict().items()}
    dit_sd, adapter_sd = to_diffusers(official)
    ref_dit = diffusers.CosmosTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=24, num_layers=2, mlp_ratio=4.0,
        text_embed_dim=32, adaln_lora_dim=16, patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0),
        concat_padding_mask=True, extra_pos_embed_type=None,
    ).double()
    ref_adapter = diffusers.AnimaTextConditioner(
        source_dim=24, target_dim=32, model_dim=32, num_layers=2, num_attention_heads=2, target_vocab_size=64,
        min_sequence_length=16,
    ).double()
    ref_dit.load_state_dict(dit_sd, strict=True)
    ref_adapter.load_state_dict(adapter_sd, strict=True)
    for m in ref_dit.modules():  # diffusers builds the qk-norms with eps 1e-5; the original uses 1e-6 (docs/model.md#pitfall-10)
        for name in ("norm_q", "norm_k"):
            if hasattr(m, name) and hasattr(getattr(m, name), "eps"):
                getattr(m, name).eps = 1e-6
    return ours.eval(), ref_dit.eval(), ref_adapter.eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    B, S, L = 3, 9, 7
    qwen = torch.randn(B, S, 24, generator=g, dtype=torch.float64)
    qmask = torch.zeros(B, S, dtype=torch.bool)
    qmask[0, :9] = True
    qmask[1, :4] = True  # row 2: empty caption, Qwen fully masked
    ids = torch.randint(2, 64, (B, L), generator=g)
    tmask = torch.zeros(B, L, dtype=torch.bool)
    tmask[0, :7] = True
    tmask[1, :3] = True
    tmask[2, :1] = True
    ids[~tmask] = 0
    ids[2, 0] = 1  # empty caption: T5 ids [</s>, 0, ...]
    qwen = qwen * qmask[..., None]
    return qwen, qmask, ids, tmask


def test_adapter_matches_diffusers(models):
    ours, _, ref_adapter = models
    qwen, qmask, ids, tmask = _inputs()
    with torch.no_grad():
        got = ours.encode_context(qwen, qmask, ids, tmask)
        want = ref_adapter(qwen, ids, target_attention_mask=tmask, source_attention_mask=qmask)
    assert got.shape == want.shape == (3, 16, 32)
    assert torch.isfinite(got).all()
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-6 * scale
    # rows past each caption's T5 length are exactly zero (zeroed before padding, docs/model.md#pitfall-2)
    assert (got[1, 3:] == 0).all() and (got[2, 1:] == 0).all()


def test_dit_matches_diffusers(models, monkeypatch):
    _nearest_resize_shim(monkeypatch)
    ours, ref_dit, _ = models
    qwen, qmask, ids, tmask = _inputs()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, 1, 12, 20, generator=g, dtype=torch.float64)  # non-square latent
    t = torch.tensor([0.1, 0.5, 0.93], dtype=torch.float64)
    with torch.no_grad():
        ctx = ours.encode_context(qwen, qmask, ids, tmask)
        got = ours.denoise(x, t, ctx)
        want = ref_dit(hidden_states=x, timestep=t, encoder_hidden_states=ctx,
                       padding_mask=torch.zeros(1, 1, 12 * 8, 20 * 8, dtype=torch.float64), return_dict=False)[0]
    assert got.shape == want.shape == x.shape
    scale = want.abs().max()
    assert scale > 0.1
    assert (got - want).abs().max() <= 1e-6 * scale
