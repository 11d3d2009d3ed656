"""float64 formula tests of the DiT's building blocks against the closed forms of docs/model.md (#patchify to #adaln)."""

from __future__ import annotations

import math

import torch

from anima_ft.model import AnimaConfig, build_anima
from anima_ft.model.dit import patchify, timestep_sinusoid, unpatchify
from anima_ft.model.rope import rope1d_table, rope3d_split, rope3d_table


def test_rope3d_split_and_thetas_full_size():
    assert rope3d_split(128) == (44, 42, 42)
    h_theta = 10000 * 4.0 ** (42 / 40)
    assert math.isclose(h_theta, 42870.9385, rel_tol=1e-8)
    cos, sin = rope3d_table(1, 3, 5, 128)
    assert cos.shape == sin.shape == (15, 128)
    # token (t=0, h=2, w=3) is index 2*5+3; angle index 22+i is h*f_h[i], 22+21+i is w*f_w[i], first 22 are t*f_t=0
    tok = 2 * 5 + 3
    i = torch.arange(21, dtype=torch.float64)
    f_h = h_theta ** -(2 * i / 42)
    expected = torch.cat([torch.zeros(22, dtype=torch.float64), 2 * f_h, 3 * f_h])
    expected = torch.cat([expected, expected])
    torch.testing.assert_close(cos[tok].double(), expected.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[tok].double(), expected.sin(), atol=1e-6, rtol=0)


def test_rope3d_temporal_theta_is_plain_10000():
    cos, sin = rope3d_table(3, 1, 1, 128)
    j = torch.arange(22, dtype=torch.float64)
    f_t = 10000.0 ** -(2 * j / 44)  # t ratio 1.0 -> no NTK change
    torch.testing.assert_close(sin[2, :22].double(), (2 * f_t).sin(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[2, 64:86].double(), (2 * f_t).sin(), atol=1e-6, rtol=0)


def test_rope1d_is_hf_style():
    cos, sin = rope1d_table(4, 8, 10000.0)
    inv = 10000.0 ** -(torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    ang = 3 * inv
    torch.testing.assert_close(cos[3].double(), torch.cat([ang, ang]).cos(), atol=1e-7, rtol=0)


def test_patchify_feature_order_channel_slowest():
    B, C, H, W, p = 1, 17, 4, 6, 2
    x = torch.arange(B * C * H * W, dtype=torch.float64).view(B, C, 1, H, W)
    y = patchify(x, p)
    assert y.shape == (1, 1, 2, 3, 68)
    for c, m, n, hp, wp in [(0, 0, 0, 0, 0), (16, 1, 1, 1, 2), (5, 1, 0, 0, 1), (9, 0, 1, 1, 0)]:
        assert y[0, 0, hp, wp, c * 4 + m * 2 + n] == x[0, c, 0, hp * 2 + m, wp * 2 + n]


def test_unpatchify_feature_order_channel_fastest():
    C, p, Hp, Wp = 16, 2, 2, 3
    y = torch.arange(Hp * Wp * p * p * C, dtype=torch.float64).view(1, 1, Hp, Wp, p * p * C)
    out = unpatchify(y, p, C)
    assert out.shape == (1, 16, 1, 4, 6)
    for c, p1, p2, hp, wp in [(0, 0, 0, 0, 0), (15, 1, 1, 1, 2), (3, 0, 1, 1, 0), (7, 1, 0, 0, 1)]:
        assert out[0, c, 0, hp * 2 + p1, wp * 2 + p2] == y[0, 0, hp, wp, (p1 * 2 + p2) * 16 + c]


def test_timestep_sinusoid_cos_first():
    t = torch.tensor([0.0, 0.37], dtype=torch.float64)
    s = timestep_sinusoid(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4, dtype=torch.float64) / 4)
    torch.testing.assert_close(s[1], torch.cat([(0.37 * freqs).cos(), (0.37 * freqs).sin()]), atol=1e-15, rtol=0)
    torch.testing.assert_close(s[0], torch.cat([torch.ones(4), torch.zeros(4)]).double())


def _tiny(seed=0):
    model = build_anima(AnimaConfig.tiny(), dtype=torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # randomize everything so zero-init cannot hide a broken path
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model


def _empty_caption(B, S=6, L=5):
    qwen = torch.zeros(B, S, 32, dtype=torch.float64)
    qmask = torch.zeros(B, S, dtype=torch.bool)
    ids = torch.zeros(B, L, dtype=torch.long)
    ids[:, 0] = 1
    tmask = torch.zeros(B, L, dtype=torch.bool)
    tmask[:, 0] = True
    return qwen, qmask, ids, tmask


def test_empty_caption_context_is_finite_and_follows_convention():
    model = _tiny()
    ctx = model.encode_context(*_empty_caption(2))
    assert ctx.shape == (2, 512, 32)
    assert torch.isfinite(ctx).all()
    assert (ctx[:, 1:] == 0).all() and (ctx[:, 0] != 0).any()
    # Fully masked cross-attention rows contribute exactly 0: the result equals the adapter run with the
    # cross-attention branch removed (o_proj of the cross-attention zeroed).
    ref = _tiny()
    with torch.no_grad():
        for blk in ref.llm_adapter.blocks:
            blk.cross_attn.o_proj.weight.zero_()
    torch.testing.assert_close(ctx, ref.encode_context(*_empty_caption(2)), atol=1e-12, rtol=0)


def test_padding_length_does_not_change_valid_rows():
    model = _tiny()
    g = torch.Generator().manual_seed(3)
    qwen = torch.randn(1, 4, 32, generator=g, dtype=torch.float64)
    ids = torch.randint(2, 1000, (1, 3), generator=g)
    short = model.encode_context(qwen, torch.ones(1, 4, dtype=torch.bool), ids, torch.ones(1, 3, dtype=torch.bool))
    qpad = torch.cat([qwen, torch.randn(1, 5, 32, generator=g, dtype=torch.float64)], 1)  # garbage past the mask
    qm = torch.zeros(1, 9, dtype=torch.bool)
    qm[0, :4] = True
    ipad = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    tm = torch.zeros(1, 7, dtype=torch.bool)
    tm[0, :3] = True
    long = model.encode_context(qpad, qm, ipad, tm)
    torch.testing.assert_close(short, long, atol=1e-12, rtol=0)


def test_gradients_reach_every_parameter_including_empty_captions():
    model = _tiny()
    g = torch.Generator().manual_seed(4)
    qwen, qmask, ids, tmask = _empty_caption(2)
    qwen[1, :3] = torch.randn(3, 32, generator=g, dtype=torch.float64)
    qmask[1, :3] = True
    ids[1, :3] = torch.tensor([55, 66, 1])
    tmask[1, :3] = True
    x = torch.randn(2, 16, 1, 8, 6, generator=g, dtype=torch.float64)
    v = model(x, torch.tensor([0.3, 0.8], dtype=torch.float64), qwen, qmask, ids, tmask)
    assert torch.isfinite(v).all()
    v.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "llm_adapter.embed.weight":
            assert p.grad.abs().sum() > 0, name
    used = model.llm_adapter.embed.weight.grad[[1, 55, 66]]
    assert (used.abs().sum(-1) > 0).all()
