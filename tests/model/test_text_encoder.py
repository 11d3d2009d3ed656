"""Text path: real tokenizers (the example ids of docs/model.md#text, truncation, empty caption), padding/masking against unpadded
float64 Qwen3 runs, single-file / HF-directory loading, fingerprints."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from anima_ft.model.text_encoder import (
    EncodedCaption,
    TextEncoder,
    apply_caption_dropout,
    collate_captions,
    load_qwen3,
    tiny_qwen3,
)
from anima_ft.model.tokenizers import load_tokenizers, tokenize_captions, tokenizer_identity

EXAMPLE = "1girl, solo, @artist name, smiling"
EXAMPLE_T5 = [209, 18722, 6, 6729, 6, 3320, 1408, 343, 564, 6, 20770, 1]  # docs/model.md#text
LONG = ", ".join(f"tag{i} blue hair" for i in range(300))  # > 512 tokens for both tokenizers


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dir):
    return load_tokenizers(tokenizer_dir / "qwen3_06b", tokenizer_dir / "t5_old")


@pytest.fixture(scope="module")
def qwen64():
    return tiny_qwen3(seed=0).double()


@pytest.fixture
def encoder(tokenizers, qwen64):
    return TextEncoder(qwen64, *tokenizers)


def test_spec_example_ids(tokenizers):
    (tok,) = tokenize_captions(*tokenizers, [EXAMPLE])
    assert tok.qwen_ids[:3] == [16, 28552, 11]
    assert tok.t5_ids == EXAMPLE_T5
    assert not tok.truncated


def test_tokenizer_conventions(tokenizers):
    qwen, t5 = tokenizers
    assert qwen.pad_token_id == 151643 and qwen.bos_token_id is None
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2) and len(t5) == 32100


@pytest.mark.parametrize("max_length", [8, 512])
def test_truncation_matches_tokenizer_truncation(tokenizers, max_length):
    qwen, t5 = tokenizers
    (tok,) = tokenize_captions(qwen, t5, [LONG], max_length=max_length)
    assert tok.truncated and tok.num_qwen_tokens > 512 and tok.num_t5_tokens > 512
    assert tok.qwen_ids == qwen(LONG, truncation=True, max_length=max_length)["input_ids"]
    assert tok.t5_ids == t5(LONG, truncation=True, max_length=max_length)["input_ids"]
    assert len(tok.t5_ids) == max_length and tok.t5_ids[-1] == 1


def test_truncation_is_counted_and_warned(encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="anima_ft.model.text_encoder"):
        out = encoder.encode_unpadded([EXAMPLE, LONG, LONG[:20] + " again " + LONG])
    assert [e.truncated for e in out] == [False, True, True]
    assert encoder.truncation_count == 2
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 2 and "tag0 blue hair" in warnings[0]
    assert out[1].qwen_states.shape[0] == 512 and out[1].t5_ids.shape[0] == 512


def test_padded_batch_matches_unpadded_reference(encoder, tokenizers, qwen64):
    captions = [EXAMPLE, "a cat", "", "masterpiece, 2girls, long hair, red eyes, outdoors"]
    batch = encoder.encode(captions)
    qwen, t5 = tokenizers
    qwen_ids = [qwen(c)["input_ids"] for c in captions]
    t5_ids = [t5(c)["input_ids"] for c in captions]
    S, L = max(map(len, qwen_ids)), max(map(len, t5_ids))
    assert batch["qwen_states"].shape == (4, S, 32) and batch["t5_ids"].shape == (4, L)
    assert batch["qwen_mask"].dtype == torch.bool and batch["t5_mask"].dtype == torch.bool
    for b, (q_ids, t_ids) in enumerate(zip(qwen_ids, t5_ids)):
        n, m = len(q_ids), len(t_ids)
        assert batch["qwen_mask"][b].tolist() == [True] * n + [False] * (S - n)
        assert batch["t5_mask"][b].tolist() == [True] * m + [False] * (L - m)
        assert batch["t5_ids"][b].tolist() == t_ids + [0] * (L - m)
        assert torch.all(batch["qwen_states"][b, n:] == 0)
        if n:  # reference: the caption alone, no padding, no mask
            ref = qwen64(input_ids=torch.tensor([q_ids])).last_hidden_state[0]
            torch.testing.assert_close(batch["qwen_states"][b, :n], ref, rtol=0, atol=1e-10)


def test_empty_caption_convention(encoder):
    batch = encoder.encode(["", EXAMPLE])
    assert not batch["qwen_mask"][0].any() and torch.all(batch["qwen_states"][0] == 0)
    assert batch["t5_ids"][0].tolist() == [1] + [0] * (len(EXAMPLE_T5) - 1)
    assert batch["t5_mask"][0].tolist() == [True] + [False] * (len(EXAMPLE_T5) - 1)
    only_empty = encoder.encode([""])
    assert only_empty["qwen_states"].shape == (1, 1, 32) and not only_empty["qwen_mask"].any()
    assert only_empty["t5_ids"].tolist() == [[1]] and only_empty["t5_mask"].tolist() == [[True]]
    (unpadded,) = encoder.encode_unpadded([""])
    empty = encoder.empty_caption()
    assert unpadded.qwen_states.shape == empty.qwen_states.shape == (0, 32)
    assert torch.equal(unpadded.t5_ids, empty.t5_ids) and empty.t5_ids.tolist() == [1]


def test_caption_dropout_equals_encoding_empty(encoder):
    captions = [EXAMPLE, "a cat", "blue sky"]
    batch = encoder.encode(captions)
    dropped = apply_caption_dropout(batch, torch.tensor([False, True, False]))
    S, L = batch["qwen_states"].shape[1], batch["t5_ids"].shape[1]
    assert not dropped["qwen_mask"][1].any() and torch.all(dropped["qwen_states"][1] == 0)
    assert dropped["t5_ids"][1].tolist() == [1] + [0] * (L - 1)
    assert dropped["t5_mask"][1].tolist() == [True] + [False] * (L - 1)
    for key in batch:  # other rows untouched
        assert torch.equal(dropped[key][[0, 2]], batch[key][[0, 2]])
    assert dropped["qwen_states"].shape[1] == S


def test_collate_pads_to_longest():
    a = EncodedCaption(torch.ones(3, 4), torch.tensor([5, 6, 1]))
    b = EncodedCaption(torch.ones(0, 4), torch.tensor([1]))
    out = collate_captions([a, b])
    assert out["qwen_states"].shape == (2, 3, 4) and out["t5_ids"].tolist() == [[5, 6, 1], [1, 0, 0]]
    assert out["qwen_mask"].tolist() == [[True] * 3, [False] * 3]


def test_single_file_and_hf_dir_loading(tmp_path, qwen64):
    model = tiny_qwen3(seed=1)
    ids = torch.tensor([[16, 28552, 11, 500, 7]])
    ref = model(input_ids=ids).last_hidden_state
    state = {"model." + k: v.contiguous() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = model.embed_tokens.weight.detach().clone()  # a tied copy some files carry
    save_file(state, str(tmp_path / "qwen_3_06b_base.safetensors"))
    model.config.to_json_file(str(tmp_path / "cfg.json"))
    loaded = load_qwen3(tmp_path / "qwen_3_06b_base.safetensors", qwen_config_path=tmp_path / "cfg.json",
                        dtype=torch.float32)  # fmt: skip
    torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, ref, rtol=0, atol=0)
    from transformers import Qwen3ForCausalLM  # an HF checkpoint directory as published: "model." keys + lm_head

    causal_lm = Qwen3ForCausalLM(model.config)
    causal_lm.model.load_state_dict(model.state_dict())
    causal_lm.save_pretrained(str(tmp_path / "hf"))
    from_dir = load_qwen3(tmp_path / "hf", dtype=torch.float32)
    torch.testing.assert_close(from_dir(input_ids=ids).last_hidden_state, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="config.json"):
        load_qwen3(tmp_path / "qwen_3_06b_base.safetensors", qwen_tokenizer_dir=tmp_path / "none")


def test_from_pretrained_single_file(tmp_path, tokenizer_dir):
    model = tiny_qwen3(seed=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "q.safetensors"))
    model.config.to_json_file(str(tmp_path / "config.json"))  # found beside the file
    enc = TextEncoder.from_pretrained(tmp_path / "q.safetensors", tokenizer_dir / "qwen3_06b",
                                      tokenizer_dir / "t5_old", dtype=torch.float32)  # fmt: skip
    assert enc.fingerprint() == TextEncoder(model, enc.qwen_tokenizer, enc.t5_tokenizer).fingerprint()
    with pytest.raises(ValueError, match="vocab.json"):
        TextEncoder.from_pretrained(tmp_path / "q.safetensors", tmp_path, tokenizer_dir / "t5_old")


def test_fingerprint_tracks_weights_length_and_tokenizer(tokenizers):
    base = TextEncoder(tiny_qwen3(seed=0), *tokenizers).fingerprint()
    assert base == TextEncoder(tiny_qwen3(seed=0), *tokenizers).fingerprint()
    assert base != TextEncoder(tiny_qwen3(seed=1), *tokenizers).fingerprint()
    assert base != TextEncoder(tiny_qwen3(seed=0), *tokenizers, max_length=256).fingerprint()
    assert base != TextEncoder(tiny_qwen3(seed=0), tokenizers[0], tokenizers[0]).fingerprint()


def test_tokenizer_identity_is_stable_across_processes(tokenizers, tokenizer_dir):
    code = ("import sys; from anima_ft.model.tokenizers import load_tokenizers, tokenizer_identity as f; "
            f"q, t = load_tokenizers({str(tokenizer_dir / 'qwen3_06b')!r}, {str(tokenizer_dir / 't5_old')!r}); "
            "print(f(q)); print(f(t))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [tokenizer_identity(tokenizers[0]), tokenizer_identity(tokenizers[1])]


def test_real_qwen3_config_gives_spec_parameter_count(tokenizer_dir):
    """Qwen3-0.6B-Base from the shipped config.json: 596,049,920 parameters with tied embeddings (docs/model.md#sizes)."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config.from_json_file(str(tokenizer_dir / "qwen3_06b" / "config.json"))
    with torch.device("meta"):
        model = Qwen3Model(config)
    assert sum(p.numel() for p in model.parameters()) == 596_049_920
    assert model.embed_tokens.weight.shape == (151936, 1024) and len(model.layers) == 28
    assert "norm.weight" in model.state_dict() and "lm_head.weight" not in model.state_dict()
