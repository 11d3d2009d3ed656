"""Official checkpoint I/O: config inference from shapes, prefixes, separate adapter, round trip, bad files."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from anima_ft.model import AnimaConfig, build_anima, infer_config, load_anima, read_safetensors_header, save_anima
from anima_ft.model.state_dict import CONFIG_METADATA_KEY

FULL_TENSORS = 685
FULL_PARAMS = 2_091_068_928


def _official_shapes(num_blocks: int = 28) -> dict[str, list[int]]:
    """The header of a full-size official file, with the derived RoPE buffers older files carry."""
    model = build_anima(AnimaConfig(num_blocks=num_blocks), device="meta")
    shapes = {"net." + k: list(v.shape) for k, v in model.state_dict().items()}
    shapes.update({"net.pos_embedder.seq": [256], "net.pos_embedder.dim_spatial_range": [21],
                   "net.pos_embedder.dim_temporal_range": [22]})
    return shapes


def _write_header_only(path, shapes: dict[str, list[int]], dtype="BF16"):
    """A safetensors file whose header is the official one but whose data area is absent (a meta checkpoint)."""
    header, off = {}, 0
    for k, s in shapes.items():
        n = 2
        for d in s:
            n *= d
        header[k] = {"dtype": dtype, "shape": s, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_full_size_header_is_recognized():
    shapes = _official_shapes()
    stripped = {k.removeprefix("net."): v for k, v in shapes.items() if "pos_embedder" not in k}
    cfg = infer_config(stripped)
    assert cfg == AnimaConfig()
    meta = build_anima(cfg, device="meta")
    sd = meta.state_dict()
    assert len(sd) == FULL_TENSORS
    assert sum(t.numel() for t in sd.values()) == FULL_PARAMS
    assert {k: list(v.shape) for k, v in sd.items()} == stripped


@pytest.mark.parametrize("blocks", [40, 52])
def test_community_block_counts_are_counted(blocks):
    shapes = {k.removeprefix("net."): v for k, v in _official_shapes(blocks).items() if "pos_embedder" not in k}
    assert infer_config(shapes) == AnimaConfig(num_blocks=blocks)


def test_header_only_file_reports_truncation(tmp_path):
    path = tmp_path / "anima-meta.safetensors"
    _write_header_only(path, _official_shapes())
    with pytest.raises(ValueError, match="truncated"):
        load_anima(path)


@pytest.fixture()
def tiny_model():
    model = build_anima(AnimaConfig.tiny(), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_save_load_save_round_trip_is_bit_identical(tmp_path, tiny_model):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_anima(tiny_model, a)
    loaded = load_anima(a)
    save_anima(loaded, b)
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    assert all(k.startswith("net.") for k in ta)
    assert all(v.dtype == torch.bfloat16 for v in ta.values())
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    from safetensors import safe_open

    with safe_open(str(a), framework="pt") as f:
        assert AnimaConfig.from_dict(json.loads(f.metadata()[CONFIG_METADATA_KEY])) == tiny_model.cfg


@pytest.mark.parametrize("prefix", ["net.", "model.diffusion_model.", ""])
def test_prefixes_and_derived_buffers(tmp_path, tiny_model, prefix):
    sd = {prefix + k: v.to(torch.bfloat16).contiguous() for k, v in tiny_model.state_dict().items()}
    sd[prefix + "pos_embedder.dim_spatial_range"] = torch.arange(21, dtype=torch.float32)
    sd[prefix + "accum_iteration"] = torch.tensor([3])
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    loaded = load_anima(path)
    assert loaded.cfg == tiny_model.cfg
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, tiny_model.state_dict()[k].to(torch.bfloat16)), k


def test_separate_adapter_file(tmp_path, tiny_model):
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in tiny_model.state_dict().items()}
    dit = {"net." + k: v for k, v in sd.items() if not k.startswith("llm_adapter.")}
    adapter = {k.removeprefix("llm_adapter."): v for k, v in sd.items() if k.startswith("llm_adapter.")}
    save_file(dit, str(tmp_path / "dit.safetensors"))
    save_file(adapter, str(tmp_path / "adapter.safetensors"))
    loaded = load_anima(tmp_path / "dit.safetensors", adapter_path=tmp_path / "adapter.safetensors")
    assert set(loaded.state_dict()) == set(sd)
    assert torch.equal(loaded.llm_adapter.embed.weight, sd["llm_adapter.embed.weight"])


def test_wrong_shape_and_missing_and_unexpected_are_listed(tmp_path, tiny_model):
    sd = {"net." + k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    sd["net.blocks.0.mlp.layer1.weight"] = torch.zeros(255, 64)
    del sd["net.blocks.1.self_attn.q_proj.weight"]
    sd["net.blocks.0.extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError) as err:
        load_anima(path, cfg=tiny_model.cfg)
    msg = str(err.value)
    assert "blocks.1.self_attn.q_proj.weight" in msg and "missing" in msg
    assert "blocks.0.extra.weight" in msg and "unexpected" in msg
    assert "blocks.0.mlp.layer1.weight (found [255, 64], expected [256, 64])" in msg


def test_truncated_and_garbage_files(tmp_path, tiny_model):
    good = tmp_path / "good.safetensors"
    save_anima(tiny_model, good)
    raw = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ValueError, match="truncated"):
        load_anima(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors_header(junk)
    with pytest.raises(FileNotFoundError):
        load_anima(tmp_path / "nope.safetensors")
