"""The recipes in configs/distill load against the schema extended by ``distill: DistillConfig`` (the change this
package asks for) in OmegaConf struct mode, and pass ``validate`` and ``validate_distill``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from anima_ft.config import validate
from anima_ft.config.loader import check_keys
from anima_ft.config.schema import Config
from anima_ft.distill import DistillConfig, validate_distill

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs" / "distill").glob("*.yaml"))


@dataclass
class ConfigWithDistill(Config):
    distill: DistillConfig = field(default_factory=DistillConfig)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_validates(path):
    tree = yaml.safe_load(path.read_text())
    check_keys(tree, ConfigWithDistill, where=str(path))
    base = OmegaConf.structured(ConfigWithDistill)
    OmegaConf.set_struct(base, True)
    cfg = OmegaConf.to_object(OmegaConf.merge(base, tree))
    cfg.model.init_path = ""  # the checkpoints named by the recipes do not exist on a test machine
    validate(cfg, world_size=8 if "h100x8" in path.name else 2)
    validate_distill(cfg.distill, max(1, len(cfg.stages)))
    assert cfg.distill.enabled


def test_unknown_distill_key_is_rejected():
    with pytest.raises(ValueError, match="did you mean 'distill.adapter_source'"):
        check_keys({"distill": {"adapter_sources": "own"}}, ConfigWithDistill)


def test_distill_config_imports_without_the_config_package():
    """The schema can import DistillConfig: anima_ft.distill.config pulls in neither the objective nor the schema."""
    import subprocess
    import sys

    code = ("import sys; from anima_ft.distill.config import DistillConfig; "
            "bad = [m for m in ('anima_ft.config', 'anima_ft.distill.objective', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
