"""Pre-flight checks (anima_ft/data/preflight.py): model files readable, shards present, model and data agree on
latent channels and Qwen width; each failure a ValueError naming the key."""

from __future__ import annotations

import pytest
from config_helpers import TINY

from anima_ft.config import load_config, validate
from anima_ft.data.preflight import check_inputs


def checked(cfg):
    validate(cfg, world_size=1)
    check_inputs(cfg)


@pytest.mark.parametrize("which", ["text", "truncated"])
def test_init_path_must_be_safetensors(checkpoints, which):
    with pytest.raises(ValueError, match="model.init_path=.* is not a readable safetensors file"):
        checked(load_config(TINY, [f"model.init_path={checkpoints[which]}"]))


def test_model_channels_must_match_the_data(checkpoints, shard_dir):
    """A 17-channel checkpoint is refused at start for synthetic and for shard data; the 16-channel one passes."""
    shards = f"data.sources=[{{name: target, shards: ['{shard_dir}']}}]"
    checked(load_config(TINY, [f"model.init_path={checkpoints['tiny16']}", shards]))
    for data in ([], [shards]):
        with pytest.raises(ValueError, match="model.init_path=.* takes 17 latent channels but .* has 16"):
            checked(load_config(TINY, [f"model.init_path={checkpoints['tiny17']}", *data]))


def test_model_qwen_width_must_match_the_shards(shard_dir, wide_qwen_shard_dir):
    checked(load_config(TINY, [f"data.sources=[{{name: target, shards: ['{shard_dir}/*.tar']}}]"]))
    with pytest.raises(ValueError, match="model.size=tiny: the LLM adapter reads 32-wide Qwen states but shard .* "
                                         r"\(data.sources.0.shards\) holds 8-wide"):
        checked(load_config(TINY, [f"data.sources=[{{name: target, shards: ['{wide_qwen_shard_dir}']}}]"]))


def test_a_directory_without_tars_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"data.sources.0.shards.0=.* matches no .tar shards"):
        checked(load_config(TINY, [f"data.sources=[{{name: target, shards: ['{tmp_path / 'empty'}']}}]"]))
