"""Property tests of load_config + validate: random values for every numeric field, random YAML text, random
override strings and random schema-shaped trees. Each input is either a valid config or a one-line ValueError
(naming the drawn key where there is one); never another exception type. Seeded (derandomized) and reproducible."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml
from config_helpers import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anima_ft.config import load_config, validate
from anima_ft.config.fields import numeric_fields

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def base_config(shard_dir, tmp_path_factory) -> Path:
    """tiny_cpu plus one stage, two real shard sources, a probe set and distillation on: every list field has an
    item, so every numeric field of the schema is reachable by a dotted key."""
    tree = yaml.safe_load(TINY.read_text())
    tree["data"]["sources"] = [{"name": "target", "shards": [str(shard_dir)]},
                               {"name": "replay", "shards": [f"{shard_dir}/*.tar"]}]
    tree["stages"] = [{"name": "s0", "num_steps": 10}]
    tree["eval"] = {"sets": [{"name": "replay", "path": str(shard_dir)}], "probe_every_steps": 5}
    tree["distill"] = {"enabled": True, "stages": [{"losses": [{"source": "replay", "kind": "distill", "weight": 1.0}]}]}
    path = tmp_path_factory.mktemp("fuzz_base") / "base.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def numeric_keys(base_config) -> list[tuple[str, type, object]]:
    cfg = load_config(base_config)
    validate(cfg, world_size=1)  # the base is valid
    keys = numeric_fields(cfg)
    assert len(keys) > 60 and "optim.eps" in {k for k, _, _ in keys}
    return keys


def _yaml_number(x) -> str:
    if isinstance(x, float) and math.isnan(x):
        return ".nan"
    if isinstance(x, float) and math.isinf(x):
        return ".inf" if x > 0 else "-.inf"
    return yaml.safe_dump(x).splitlines()[0]  # a YAML float / int literal


NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2, 0.5, 1.0, -1.0, 1e-12, 2**32, 2**32 - 1, 16, 17]),
)


def _check(base: Path, overrides: list[str], keys: list[str]) -> None:
    try:
        validate(load_config(base, overrides), world_size=1)
    except ValueError as exc:
        msg = str(exc)
        assert "\n" not in msg, msg
        assert any(k in msg for k in keys), (keys, msg)


@settings(SETTINGS, max_examples=40)
@given(data=st.data())
def test_random_numeric_values_are_valid_or_name_the_key(data, base_config, numeric_keys):
    picks = data.draw(st.lists(st.sampled_from(numeric_keys), min_size=1, max_size=3, unique_by=lambda k: k[0]))
    values = [data.draw(NUMBERS) for _ in picks]
    overrides = [f"{k}={_yaml_number(v)}" for (k, _, _), v in zip(picks, values)]
    _check(base_config, overrides, [k for k, _, _ in picks])
    (key, tp, _), v = picks[0], values[0]
    if len(picks) == 1 and tp is float and isinstance(v, float) and not math.isfinite(v):  # never accepted
        with pytest.raises(ValueError, match=re.escape(key) + "=.* is not a finite number"):
            validate(load_config(base_config, overrides), world_size=1)


@SETTINGS
@given(text=st.text(max_size=200))
def test_random_yaml_text_is_valid_or_value_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        validate(load_config(path), world_size=1)
    except ValueError as exc:
        assert "\n" not in str(exc) and str(exc)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8))


@settings(SETTINGS, max_examples=50)
@given(data=st.data())
def test_random_overrides_are_valid_or_name_the_key(data, numeric_keys):
    all_keys = sorted({k for k, _, _ in numeric_keys} | {
        "run.dir", "model.size", "model.init_path", "optim.lr", "optim.betas", "stages", "data.sources",
        "dist.deepspeed_overrides", "dist.deepspeed_overrides.train_batch_size", "eval.sets", "distill.losses"})
    key = data.draw(st.one_of(st.sampled_from(all_keys), st.text(max_size=12)))
    raw = data.draw(st.one_of(st.text(max_size=20), SCALARS.map(lambda v: yaml.safe_dump(v).splitlines()[0]),
                              st.sampled_from(["[1,", "{a: 1}", "[]", "{}", "- x", ": :", "!!python/none", "'"])))
    override = f"{key}={raw}"
    try:
        validate(load_config(TINY, [override]), world_size=1)
    except ValueError as exc:
        msg = str(exc)
        assert "\n" not in msg, msg
        if "=" not in key and key.strip():
            assert key.strip().lstrip("+").split(".")[0] in msg or "override" in msg, msg


def _trees():
    leaf = SCALARS | st.lists(SCALARS, max_size=3)
    names = st.sampled_from(["run", "dir", "optim", "lr", "mlp", "eps", "betas", "stages", "num_steps", "data",
                             "sources", "name", "shards", "weight", "batch", "micro_batch_size", "dist",
                             "deepspeed_overrides", "train_batch_size", "zero_stage", "eval", "sigmas", "distill",
                             "losses", "x"])
    return st.recursive(leaf, lambda kids: st.dictionaries(names, kids, max_size=4) | st.lists(kids, max_size=2),
                        max_leaves=12)


@SETTINGS
@given(tree=st.dictionaries(st.sampled_from(["run", "optim", "stages", "data", "batch", "dist", "eval", "distill",
                                             "num_steps", "model"]), _trees(), max_size=4))
def test_random_schema_shaped_yaml_is_valid_or_value_error(tmp_path_factory, tree):
    path = tmp_path_factory.mktemp("tree") / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        validate(load_config(path), world_size=1)
    except ValueError as exc:
        assert "\n" not in str(exc) and str(exc)
