"""The recipes in configs/distill load against the schema (its ``distill`` section) in OmegaConf struct mode and
pass ``validate``; an unknown distill key is refused with a suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest

from anima_ft.config import load_config, validate
from anima_ft.config.loader import check_keys
from anima_ft.config.schema import Config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs" / "distill").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_validates(path):
    cfg = load_config(path)
    # the checkpoints and shards named by the recipes do not exist on a test machine
    validate(cfg, world_size=8 if "h100x8" in path.name else 2, check_files=False)
    assert cfg.distill.enabled


def test_unknown_distill_key_is_rejected():
    with pytest.raises(ValueError, match="did you mean 'distill.adapter_source'"):
        check_keys({"distill": {"adapter_sources": "own"}}, Config)
