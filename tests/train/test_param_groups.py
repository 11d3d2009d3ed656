"""Parameter groups (train/param_groups.py): the six LR groups, weight decay, frozen groups."""

from __future__ import annotations

import pytest
import torch

from anima_ft.config.schema import PARAM_GROUPS
from anima_ft.model import AnimaConfig, build_anima
from anima_ft.train.param_groups import apply_trainable, build_param_groups, decays, group_of


def _diffusion_pipe_group(name: str) -> str:
    """diffusion-pipe's substring rule (docs/training.md#lr-groups), written independently as the reference."""
    if "llm_adapter" in name:
        return "llm_adapter"
    for key, group in ((".self_attn", "self_attn"), (".cross_attn", "cross_attn"), (".mlp", "mlp"),
                       (".adaln_modulation", "mod")):
        if key in name:
            return group
    if "adaln_modulation" in name:
        return "mod"
    return "base"


@pytest.fixture(scope="module")
def tiny():
    return build_anima(AnimaConfig.tiny(), seed=0)


def test_groups_match_reference_rule(tiny):
    names = [n for n, _ in tiny.named_parameters()]
    assert {group_of(n) for n in names} == set(PARAM_GROUPS)
    for n in names:
        assert group_of(n) == _diffusion_pipe_group(n), n
    assert group_of("blocks.3.adaln_modulation_self_attn.1.weight") == "mod"
    assert group_of("blocks.3.self_attn.q_norm.weight") == "self_attn"
    assert group_of("final_layer.adaln_modulation.2.weight") == "mod"
    assert group_of("t_embedding_norm.weight") == "base"


def test_no_decay_for_norms_embeddings_biases(tiny):
    params = dict(tiny.named_parameters())
    assert not decays("t_embedding_norm.weight", params["t_embedding_norm.weight"])
    assert not decays("x_embedder.proj.1.weight", params["x_embedder.proj.1.weight"])
    assert not decays("llm_adapter.embed.weight", params["llm_adapter.embed.weight"])
    assert not decays("llm_adapter.blocks.0.mlp.0.bias", params["llm_adapter.blocks.0.mlp.0.bias"])
    assert decays("blocks.0.mlp.layer1.weight", params["blocks.0.mlp.layer1.weight"])
    partitioned = torch.nn.Parameter(torch.empty(0))  # a ZeRO-3 shard: flat local data, full shape in ds_shape
    partitioned.ds_shape = torch.Size([8, 4])
    assert decays("blocks.0.mlp.layer1.weight", partitioned)


def test_frozen_group_gets_no_grad_and_no_optimizer_entry(tiny):
    lrs = {g: 1e-4 for g in PARAM_GROUPS} | {"llm_adapter": 0.0, "mod": 2e-5}
    apply_trainable(tiny, lrs)
    groups = build_param_groups(tiny.named_parameters(), lrs, weight_decay=0.1)
    in_opt = {id(p) for g in groups for p in g["params"]}
    for n, p in tiny.named_parameters():
        frozen = group_of(n) == "llm_adapter"
        assert p.requires_grad is not frozen, n
        assert (id(p) in in_opt) is not frozen, n
    for g in groups:
        assert g["lr"] == lrs[g["group"]]
        assert g["weight_decay"] == (0.1 if g["name"].endswith("/decay") else 0.0)
    apply_trainable(tiny, {g: 1.0 for g in PARAM_GROUPS})
