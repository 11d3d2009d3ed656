"""One vocabulary of tensor-name groups (anima_ft/model/groups.py): LR groups and drift groups agree."""

from __future__ import annotations

import pytest

from anima_ft.config.schema import PARAM_GROUPS
from anima_ft.model import AnimaConfig, build_anima
from anima_ft.model.groups import drift_group, lr_group, lr_group_of_drift_group, strip_prefix


def test_drift_group_names():
    cases = {
        "net.blocks.7.self_attn.q_proj.weight": "blocks.7.self_attn",
        "blocks.7.cross_attn.k_norm.weight": "blocks.7.cross_attn",
        "model.diffusion_model.blocks.12.mlp.layer2.weight": "blocks.12.mlp",
        "blocks.0.adaln_modulation_cross_attn.2.weight": "blocks.0.mod",
        "x_embedder.proj.1.weight": "embedders",
        "t_embedder.1.linear_2.weight": "embedders",
        "t_embedding_norm.weight": "embedders",
        "final_layer.adaln_modulation.1.weight": "final_layer.mod",
        "final_layer.linear.weight": "final_layer.linear",
        "net.llm_adapter.blocks.3.cross_attn.o_proj.weight": "llm_adapter.blocks.3",
        "llm_adapter.embed.weight": "llm_adapter.embed",
        "llm_adapter.out_proj.bias": "llm_adapter.out",
    }
    for name, group in cases.items():
        assert drift_group(name) == group, name
    assert strip_prefix("module.net.blocks.0.mlp.layer1.weight") == "blocks.0.mlp.layer1.weight"


@pytest.mark.parametrize("cfg", [AnimaConfig.tiny(), AnimaConfig()], ids=["tiny", "full_size"])
def test_every_drift_group_lies_in_the_lr_group_of_each_of_its_tensors(cfg):
    """Property over every tensor of the tiny and the full-size model (built on the meta device): summing drift
    groups into LR groups gives exactly the per-tensor LR grouping the optimizer uses, and all six LR groups occur."""
    names = [n for n, _ in build_anima(cfg, device="meta").named_parameters()]
    for n in names:
        assert lr_group_of_drift_group(drift_group(n)) == lr_group(n), n
    assert {lr_group(n) for n in names} == set(PARAM_GROUPS)
    assert "other" not in {drift_group(n) for n in names}
