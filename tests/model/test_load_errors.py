"""Damaged checkpoint files: ``load_anima`` either loads the pristine model bitwise or raises one ValueError that
names every damaged tensor (exactly the set damaged) or the file; never another exception.

Damage is built from a tiny randomized model: tensors removed, reshaped along a random dim, flattened, cast to an
integer dtype (any mix), the config stored in the metadata edited, header bytes overwritten, the file truncated or
extended. Seeded, derandomized hypothesis runs, so a failure reproduces.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from anima_ft.model import AnimaConfig, build_anima, infer_config, load_anima, save_anima
from anima_ft.model.config import AdapterConfig, expected_shapes, layout_dims
from anima_ft.model.state_dict import CONFIG_METADATA_KEY

CFG = AnimaConfig(model_channels=64, num_blocks=2, num_heads=4, crossattn_emb_channels=32, adaln_lora_dim=16,
                  adapter=AdapterConfig(source_dim=24, model_dim=32, num_layers=2, num_heads=2, mlp_hidden=128,
                                        vocab_size=96))
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)
_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ = settings(max_examples=50, **_SETTINGS)
FUZZ_MANY = settings(max_examples=1000, **_SETTINGS)


def fuzz_tests(body, **strategies):
    """The property ``body`` as a default-suite test (50 cases) and a slow one (1000 cases), both seeded."""
    return FUZZ(given(**strategies)(body)), pytest.mark.slow(FUZZ_MANY(given(**strategies)(body)))


def _pristine() -> dict[str, torch.Tensor]:
    model = build_anima(CFG, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


PRISTINE = _pristine()
NAMES = sorted(PRISTINE)
METADATA = {CONFIG_METADATA_KEY: json.dumps(CFG.to_dict()), "format": "pt"}


def named(message: str) -> set[str]:
    """The pristine tensor names in ``message``, as whole names (``llm_adapter.blocks.0.x`` is no ``blocks.0.x``)."""
    return {n for n in NAMES if re.search(rf"(?<![\w.]){re.escape(n)}(?![\w.])", message)}


def write(path, tensors, metadata=None) -> None:
    save_file({"net." + k: v for k, v in tensors.items()}, str(path), metadata=metadata)


def assert_pristine(model) -> None:
    sd = model.state_dict()
    assert sd.keys() == PRISTINE.keys()
    for k, v in PRISTINE.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k


def test_layout_table_equals_the_model():
    """The shape table the checks use is the model's own state dict, for several architectures."""
    for cfg in (CFG, AnimaConfig.tiny(with_adapter=False)):  # full size: test_checkpoint_io
        model = {k: tuple(v.shape) for k, v in build_anima(cfg, device="meta").state_dict().items()}
        assert expected_shapes(cfg) == model
        assert infer_config(model) == cfg


def test_pristine_loads_bitwise_with_and_without_metadata(tmp_path):
    for meta in (METADATA, None):
        write(tmp_path / "p.safetensors", PRISTINE, meta)
        loaded = load_anima(tmp_path / "p.safetensors")
        assert loaded.cfg == CFG
        assert_pristine(loaded)


# --- the cases named in the issue ----------------------------------------------------------------------------------


def _load_error(tmp_path, tensors, metadata=None) -> str:
    path = tmp_path / "bad.safetensors"
    write(path, tensors, metadata)
    with pytest.raises(ValueError) as err:
        load_anima(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("metadata", [None, METADATA], ids=["no_metadata", "metadata"])
def test_issue_cases_name_exactly_the_damaged_tensors(tmp_path, metadata):
    two = {k: v for k, v in PRISTINE.items() if k not in ("blocks.0.mlp.layer1.weight", "x_embedder.proj.1.weight")}
    msg = _load_error(tmp_path, two, metadata)
    assert named(msg) == {"blocks.0.mlp.layer1.weight", "x_embedder.proj.1.weight"} and "2 missing" in msg

    mlp = dict(PRISTINE, **{"llm_adapter.blocks.0.mlp.0.weight": torch.zeros(64, 32, dtype=torch.bfloat16)})
    msg = _load_error(tmp_path, mlp, metadata)
    assert named(msg) == {"llm_adapter.blocks.0.mlp.0.weight"}
    assert "llm_adapter.blocks.0.mlp.0.weight (found [64, 32], expected [128, 32])" in msg

    q = dict(PRISTINE, **{"blocks.0.self_attn.q_norm.weight": torch.ones(8, dtype=torch.bfloat16)})
    msg = _load_error(tmp_path, q, metadata)
    assert named(msg) == {"blocks.0.self_attn.q_norm.weight"} and "(found [8], expected [16])" in msg

    ints = dict(PRISTINE, **{"blocks.1.mlp.layer2.weight": PRISTINE["blocks.1.mlp.layer2.weight"].to(torch.int32)})
    msg = _load_error(tmp_path, ints, metadata)
    assert named(msg) == {"blocks.1.mlp.layer2.weight"} and "found I32, expected one of F16, BF16, F32, F64" in msg


def test_consistent_but_invalid_head_dim_names_the_norm_tensors(tmp_path):
    """Every q/k norm halved: the shapes agree on head dim 8, which 3D RoPE cannot split; the tensor is named."""
    halved = {k: (torch.ones(8, dtype=torch.bfloat16) if k.startswith("blocks.") and "_norm." in k else v)
              for k, v in PRISTINE.items()}
    msg = _load_error(tmp_path, halved)
    assert "head dim 8" in msg and "blocks.0.self_attn.q_norm.weight" in msg


def test_metadata_config_mismatch_lists_the_fields(tmp_path):
    edited = dict(CFG.to_dict(), num_heads=2, adaln_lora_dim=8)
    msg = _load_error(tmp_path, PRISTINE, {CONFIG_METADATA_KEY: json.dumps(edited)})
    assert "num_heads (metadata 2, tensors 4)" in msg and "adaln_lora_dim (metadata 8, tensors 16)" in msg


def test_more_than_fifty_problems_are_counted(tmp_path):
    dropped = set(NAMES[:60])
    msg = _load_error(tmp_path, {k: v for k, v in PRISTINE.items() if k not in dropped}, METADATA)
    assert "60 missing" in msg and "(+10 more)" in msg and len(named(msg) & dropped) == 50


def test_from_dict_names_bad_keys_and_types():
    d = CFG.to_dict()
    for bad, key in ((dict(d, num_blocks="2"), "num_blocks"), (dict(d, mlp_ratio=True), "mlp_ratio"),
                     (dict(d, adapter=dict(d["adapter"], vocab_size=9.5)), "adapter.vocab_size"),
                     (dict(d, bogus=1), "bogus"), (dict(d, rope_extrapolation=[1, 2]), "rope_extrapolation")):
        with pytest.raises(ValueError, match=re.escape(key)):
            AnimaConfig.from_dict(bad)
    for bad, key in ((dict(d, num_heads=0), "num_heads"), (dict(d, eps=-1.0), "eps"),
                     (dict(d, mlp_ratio=0.001), "mlp")):
        with pytest.raises(ValueError, match=key):
            AnimaConfig.from_dict(bad).validate()


# --- fuzz: tensor damage -------------------------------------------------------------------------------------------


@st.composite
def tensor_damage(draw):
    """``{name: ("remove",) | ("reshape", axis, new_size) | ("flatten",) | ("int", dtype)}`` for 1-12 tensors.

    Reshaped sizes are ``old + 1 + i`` or ``old - 1 - i`` for the i-th damaged tensor, so no two damaged tensors share a
    wrong size (and none keeps the right one).
    """
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=12, unique=True))
    plan = {}
    for i, name in enumerate(names):
        shape = PRISTINE[name].shape
        kind = draw(st.sampled_from(("remove", "reshape", "flatten", "int")))
        if kind == "reshape":
            axis = draw(st.integers(0, len(shape) - 1))
            grow = draw(st.booleans()) or shape[axis] - 1 - i < 1
            plan[name] = ("reshape", axis, shape[axis] + 1 + i if grow else shape[axis] - 1 - i)
        elif kind == "int":
            plan[name] = ("int", draw(st.sampled_from(INT_DTYPES)))
        else:
            plan[name] = (kind,)
    return plan


def apply_damage(plan) -> dict[str, torch.Tensor]:
    out = dict(PRISTINE)
    for name, action in plan.items():
        t = PRISTINE[name]
        if action[0] == "remove":
            del out[name]
        elif action[0] == "reshape":
            shape = list(t.shape)
            shape[action[1]] = action[2]
            out[name] = torch.randn(shape).to(t.dtype)
        elif action[0] == "flatten":
            out[name] = t.reshape(-1) if t.dim() > 1 else t[None]
        else:
            out[name] = t.to(action[1])
    return out


def votes_survive(plan) -> bool:
    """Whether, without a stored config, the shapes still single out CFG: each hyperparameter keeps two undamaged
    carrier dims (one if none of its carriers is damaged), and the last DiT block, the last adapter block and so the
    adapter keep at least one tensor (else the file is a self-consistent checkpoint of a smaller model)."""
    intact, wrong = Counter(), Counter()
    for name, dims in layout_dims(CFG.num_blocks, CFG.adapter.num_layers).items():
        action = plan.get(name, ("int",))
        for axis, (factor, symbol) in enumerate(dims):
            if factor != 1 or action[0] in ("remove", "flatten"):
                continue
            if action[0] == "reshape" and action[1] == axis:
                wrong[symbol] += 1
            else:
                intact[symbol] += 1
    symbols = set(intact) | set(wrong)
    if not all(intact[s] >= 2 or (intact[s] == 1 and wrong[s] == 0) for s in symbols):
        return False
    kept = [n for n in NAMES if plan.get(n, ("kept",))[0] != "remove"]
    return (any(n.startswith(f"blocks.{CFG.num_blocks - 1}.") for n in kept)
            and any(n.startswith(f"llm_adapter.blocks.{CFG.adapter.num_layers - 1}.") for n in kept))


def _fuzz_damage_with_stored_config(tmp_path, plan):
    path = tmp_path / "damaged.safetensors"
    write(path, apply_damage(plan), METADATA)
    with pytest.raises(ValueError) as err:
        load_anima(path)
    assert named(str(err.value)) == set(plan), str(err.value)
    assert str(path) in str(err.value)


test_fuzz_damage_with_stored_config, test_fuzz_damage_with_stored_config_many = fuzz_tests(
    _fuzz_damage_with_stored_config, plan=tensor_damage())


def _fuzz_damage_without_stored_config(tmp_path, plan):
    path = tmp_path / "damaged.safetensors"
    damaged = apply_damage(plan)
    write(path, damaged)
    try:
        model = load_anima(path)
    except ValueError as exc:
        assert str(path) in str(exc)
        if votes_survive(plan):
            assert named(str(exc)) == set(plan), str(exc)
        return
    # Only possible when the damage leaves a self-consistent checkpoint of another architecture (e.g. the last
    # block removed whole); it must then load exactly what the file holds.
    assert not votes_survive(plan) and model.cfg != CFG
    sd = model.state_dict()
    assert sd.keys() == damaged.keys() and all(torch.equal(sd[k], damaged[k]) for k in damaged)


test_fuzz_damage_without_stored_config, test_fuzz_damage_without_stored_config_many = fuzz_tests(
    _fuzz_damage_without_stored_config, plan=tensor_damage())


# --- fuzz: metadata config edits -----------------------------------------------------------------------------------

SHAPE_EDITS = ("model_channels", "num_blocks", "num_heads", "in_channels", "out_channels", "crossattn_emb_channels",
               "adaln_lora_dim", "adapter.source_dim", "adapter.model_dim", "adapter.num_layers", "adapter.num_heads",
               "adapter.mlp_hidden", "adapter.vocab_size")


@st.composite
def metadata_edit(draw):
    """``(field, config dict)``: a shape field set to another integer, mlp_ratio changed, the adapter dropped, or a
    value of the wrong type."""
    d = json.loads(json.dumps(CFG.to_dict()))
    what = draw(st.sampled_from(("int", "int", "int", "mlp_ratio", "no_adapter", "type")))
    if what == "mlp_ratio":
        ratio = draw(st.sampled_from((-1.0, 0.0, 0.5, 2.0, 3.9, 4.5, 1e9, float("nan"))))
        d["mlp_ratio"] = ratio
        return "mlp_ratio", d
    if what == "no_adapter":
        d["adapter"] = None
        return "adapter", d
    field = draw(st.sampled_from(SHAPE_EDITS))
    scope, key = (d["adapter"], field.split(".")[1]) if field.startswith("adapter.") else (d, field)
    if what == "type":
        scope[key] = draw(st.sampled_from((str(scope[key]), float(scope[key]) + 0.5, None, [scope[key]], True)))
    else:
        scope[key] = draw(st.integers(-2, 10**12).filter(lambda v, old=scope[key]: v != old))
    return field, d


def _fuzz_metadata_edits(tmp_path, edit):
    field, d = edit
    path = tmp_path / "edited.safetensors"
    write(path, PRISTINE, {CONFIG_METADATA_KEY: json.dumps(d)})
    with pytest.raises(ValueError) as err:
        load_anima(path)
    msg = str(err.value)
    assert str(path) in msg and field.split(".")[-1] in msg, msg
    listed = set(re.findall(r"([\w.]+) \(metadata ", msg))
    if listed:  # a valid config that disagrees with the tensors: exactly the edited field is listed
        assert listed == {field}, msg


test_fuzz_metadata_edits, test_fuzz_metadata_edits_many = fuzz_tests(
    _fuzz_metadata_edits, edit=metadata_edit())


@pytest.mark.parametrize("edit", [{"eps": 1e-5}, {"context_tokens": 77}, {"rope_extrapolation": [1.0, 2.0, 2.0]}])
def test_metadata_fields_no_shape_carries_are_used(tmp_path, edit):
    path = tmp_path / "m.safetensors"
    write(path, PRISTINE, {CONFIG_METADATA_KEY: json.dumps(dict(CFG.to_dict(), **edit))})
    model = load_anima(path)
    assert model.cfg == AnimaConfig.from_dict(dict(CFG.to_dict(), **edit))
    assert_pristine(model)


def test_malformed_metadata_json_names_file_and_key(tmp_path):
    msg = _load_error(tmp_path, PRISTINE, {CONFIG_METADATA_KEY: json.dumps(CFG.to_dict())[:-5]})
    assert CONFIG_METADATA_KEY in msg


# --- fuzz: header bytes, truncation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("pristine") / "p.safetensors"
    model = build_anima(CFG, device="meta")
    model.load_state_dict(PRISTINE, assign=True)
    save_anima(model, path)
    return path.read_bytes()


def _load_or_value_error(path):
    try:
        return load_anima(path)
    except ValueError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc), str(exc)
        return None


def _fuzz_header_bytes(tmp_path, saved_bytes, data):
    header_end = 8 + int.from_bytes(saved_bytes[:8], "little")
    raw = bytearray(saved_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, header_end - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(bytes(raw))
    model = _load_or_value_error(path)
    if model is not None:  # a harmless change (e.g. the "format" metadata value, or a non-shape config field)
        assert_pristine(model)
        assert expected_shapes(model.cfg) == expected_shapes(CFG)


test_fuzz_header_bytes, test_fuzz_header_bytes_many = fuzz_tests(
    _fuzz_header_bytes, data=st.data())


def _fuzz_truncated_or_extended(tmp_path, saved_bytes, data):
    path = tmp_path / "cut.safetensors"
    if data.draw(st.booleans()):
        path.write_bytes(saved_bytes[: data.draw(st.integers(0, len(saved_bytes) - 1))])
    else:
        path.write_bytes(saved_bytes + bytes(data.draw(st.integers(1, 64))))
    assert _load_or_value_error(path) is None


test_fuzz_truncated_or_extended, test_fuzz_truncated_or_extended_many = fuzz_tests(
    _fuzz_truncated_or_extended, data=st.data())


def test_missing_file_and_separate_adapter_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_anima(tmp_path / "nope.safetensors")
    dit = {k: v for k, v in PRISTINE.items() if not k.startswith("llm_adapter.")}
    write(tmp_path / "dit.safetensors", dit)
    with pytest.raises(FileNotFoundError, match="adapter.safetensors"):
        load_anima(tmp_path / "dit.safetensors", adapter_path=tmp_path / "adapter.safetensors")
    adapter = {k.removeprefix("llm_adapter."): v for k, v in PRISTINE.items() if k.startswith("llm_adapter.")}
    adapter["blocks.1.mlp.2.bias"] = adapter["blocks.1.mlp.2.bias"].to(torch.int64)
    save_file(adapter, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(ValueError) as err:
        load_anima(tmp_path / "dit.safetensors", adapter_path=tmp_path / "adapter.safetensors")
    assert named(str(err.value)) == {"llm_adapter.blocks.1.mlp.2.bias"} and "adapter.safetensors" in str(err.value)


# --- the commands that read model files: one stderr line, exit 2 ---------------------------------------------------


def test_reports_input_errors_folds_to_one_line_and_keeps_other_errors(capsys):
    from anima_ft.command_errors import reports_input_errors

    @reports_input_errors("anima-ft demo")
    def main(argv):
        raise {"value": ValueError("bad\nvalue  x"), "missing": FileNotFoundError("f.st"), "bug": KeyError}[argv[0]]

    assert main(["value"]) == 2 and capsys.readouterr().err == "anima-ft demo: error: bad value x\n"
    assert main(["missing"]) == 2 and capsys.readouterr().err == "anima-ft demo: error: f.st\n"
    with pytest.raises(KeyError):
        main(["bug"])


def test_swap_command_on_damaged_files(tmp_path, saved_bytes, capsys):
    from anima_ft import cli

    good, cut, ints = (tmp_path / f"{n}.safetensors" for n in ("good", "cut", "ints"))
    good.write_bytes(saved_bytes)
    cut.write_bytes(saved_bytes[: len(saved_bytes) // 2])
    write(ints, dict(PRISTINE, **{"blocks.0.mlp.layer1.weight": PRISTINE["blocks.0.mlp.layer1.weight"].to(torch.int8)}))
    out = tmp_path / "out.safetensors"
    for args, named_thing in ((["--dit", cut, "--adapter", good], cut), (["--dit", good, "--adapter", cut], cut),
                              (["--dit", ints, "--adapter", good], "blocks.0.mlp.layer1.weight"),
                              (["--dit", tmp_path / "nope.st", "--adapter", "init"], "nope.st")):
        assert cli.main(["swap", *map(str, args), str(out)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("anima-ft swap: error: ") and str(named_thing) in lines[0]
        assert not out.exists()
