"""Anima's frozen text path: Qwen3-0.6B hidden states plus T5 token ids (docs/model.md#text).

For each caption the DiT's LLM adapter needs:

    qwen_states [S, 1024]: ``Qwen3Model(...).last_hidden_state`` (after the final RMSNorm) of the raw caption
    t5_ids      [L]:       T5 ids with ``</s>`` appended

Batches are right-padded to the batch's longest sequence (at most 512): ``qwen_mask`` / ``t5_mask`` are True on
valid tokens, Qwen states are exactly 0 at padded positions, T5 ids are padded with 0. The empty caption (caption
dropout, the CFG negative) has no Qwen token (all-False mask, zero states) and T5 ids ``[1, 0, ...]`` with mask
``[1, 0, ...]``. Right padding plus causal attention makes the valid states independent of the padding.

Legend: B batch, S Qwen tokens, L T5 tokens, C Qwen hidden size (1024).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from anima_ft.model.tokenizers import (
    MAX_LENGTH,
    T5_EOS_ID,
    T5_PAD_ID,
    check_tokenizers,
    load_tokenizers,
    tokenize_captions,
    tokenizer_identity,
)

logger = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1
# Config fields that do not change what the encoder computes.
_CONFIG_IGNORED = {"transformers_version", "dtype", "torch_dtype", "architectures", "use_cache", "output_attentions",
                   "output_hidden_states", "return_dict", "attn_implementation", "bos_token_id", "eos_token_id"}  # fmt: skip


@dataclass
class EncodedCaption:
    """One encoded caption, unpadded (what shards store). qwen_states [S, C] holds valid rows only (S may be 0);
    t5_ids [L] long includes the appended ``</s>``; truncated: the caption was cut at max_length."""

    qwen_states: torch.Tensor
    t5_ids: torch.Tensor
    truncated: bool = False


def collate_captions(encoded: list[EncodedCaption]) -> dict[str, torch.Tensor]:
    """Pad encoded captions to the batch's longest -> qwen_states [B,S,C] (0 at pads), qwen_mask bool [B,S],
    t5_ids long [B,L] (0 at pads), t5_mask bool [B,L]. S is at least 1 so an all-empty batch keeps its shape."""
    if not encoded:
        raise ValueError("collate_captions got no captions")
    hidden = encoded[0].qwen_states.shape[-1]
    dtype, device = encoded[0].qwen_states.dtype, encoded[0].qwen_states.device
    seq = max(1, max(e.qwen_states.shape[0] for e in encoded))
    length = max(e.t5_ids.shape[0] for e in encoded)
    states_B_S_C = torch.zeros(len(encoded), seq, hidden, dtype=dtype, device=device)
    qwen_mask = torch.zeros(len(encoded), seq, dtype=torch.bool, device=device)
    t5_ids = torch.full((len(encoded), length), T5_PAD_ID, dtype=torch.long, device=device)
    t5_mask = torch.zeros(len(encoded), length, dtype=torch.bool, device=device)
    for b, e in enumerate(encoded):
        s, n = e.qwen_states.shape[0], e.t5_ids.shape[0]
        states_B_S_C[b, :s] = e.qwen_states.to(device=device, dtype=dtype)
        qwen_mask[b, :s] = True
        t5_ids[b, :n] = e.t5_ids.to(device)
        t5_mask[b, :n] = True
    return {"qwen_states": states_B_S_C, "qwen_mask": qwen_mask, "t5_ids": t5_ids, "t5_mask": t5_mask}


def apply_caption_dropout(batch: dict[str, torch.Tensor], drop_B: torch.Tensor) -> dict[str, torch.Tensor]:
    """Replace the rows where ``drop_B`` (bool [B]) is True by the empty caption (docs/model.md#empty-caption):
    Qwen mask all False and states 0; T5 ids ``[1, 0, ...]`` with mask ``[1, 0, ...]``. Returns a new dict."""
    drop = drop_B.to(batch["qwen_mask"].device, torch.bool)
    keep_S = (~drop).view(-1, 1)
    out = dict(batch)
    out["qwen_mask"] = batch["qwen_mask"] & keep_S
    out["qwen_states"] = batch["qwen_states"] * out["qwen_mask"].unsqueeze(-1).to(batch["qwen_states"].dtype)
    empty_ids = torch.full_like(batch["t5_ids"], T5_PAD_ID)
    empty_ids[:, 0] = T5_EOS_ID
    empty_mask = torch.zeros_like(batch["t5_mask"])
    empty_mask[:, 0] = True
    out["t5_ids"] = torch.where(keep_S, batch["t5_ids"], empty_ids)
    out["t5_mask"] = torch.where(keep_S, batch["t5_mask"], empty_mask)
    return out


def tiny_qwen3(hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
               head_dim: int = 8, intermediate_size: int = 64, vocab_size: int = 151936, seed: int = 0):  # fmt: skip
    """A small random ``Qwen3Model`` (seeded) with the real vocabulary size by default, for tests and demos."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         head_dim=head_dim, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                         max_position_embeddings=4096)  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        return Qwen3Model(config).eval()


def _find_config(qwen_path: Path, qwen_config_path, qwen_tokenizer_dir) -> Path:
    """config.json for a single-file Qwen3: explicit path, else beside the file, else in the tokenizer dir."""
    candidates = [Path(qwen_config_path)] if qwen_config_path is not None else []
    candidates += [qwen_path.parent / "config.json", Path(qwen_tokenizer_dir) / "config.json"]
    for cand in candidates:
        cand = cand / "config.json" if cand.is_dir() else cand
        if cand.is_file():
            return cand
    raise ValueError(
        f"no Qwen3 config.json found for {qwen_path} (tried {[str(c) for c in candidates]}); pass "
        "qwen_config_path= (diffusion-pipe's configs/qwen3_06b/config.json describes Qwen3-0.6B-Base)"
    )


def load_qwen3(qwen_path, qwen_config_path=None, qwen_tokenizer_dir=".", device="cpu", dtype=torch.bfloat16):
    """Qwen3Model from a local HF directory or the official single safetensors file (+ config.json).

    Single-file keys may carry a ``model.`` prefix; a tied ``lm_head.weight`` copy is dropped.
    """
    from transformers import Qwen3Config, Qwen3Model
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    path = Path(qwen_path)
    if path.is_dir():
        return Qwen3Model.from_pretrained(str(path), dtype=dtype, local_files_only=True).to(device).eval()
    if not path.is_file():
        raise ValueError(f"qwen_path={path} does not exist; pass an HF Qwen3 directory or qwen_3_06b_base.safetensors")
    from safetensors.torch import load_file

    config = Qwen3Config.from_json_file(str(_find_config(path, qwen_config_path, qwen_tokenizer_dir)))
    state = load_file(str(path))
    state = {k.removeprefix("model."): v for k, v in state.items() if k != "lm_head.weight"}
    with torch.device("meta"):
        model = Qwen3Model(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path} does not match Qwen3Model({config.num_hidden_layers} layers): missing "
                         f"{missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")  # fmt: skip
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    model.rotary_emb = Qwen3RotaryEmbedding(config=config).to(device)  # non-persistent buffers stay on meta
    return model.eval()


class TextEncoder:
    """Frozen Qwen3 + the two tokenizers: captions -> the adapter's inputs, with Anima's conventions."""

    def __init__(self, qwen_model, qwen_tokenizer, t5_tokenizer, max_length: int = MAX_LENGTH):
        """Wrap an already built ``Qwen3Model`` and tokenizers (``tiny_qwen3`` + real tokenizers in tests)."""
        check_tokenizers(qwen_tokenizer, t5_tokenizer)
        self.qwen = qwen_model.eval().requires_grad_(False)
        self.qwen_tokenizer, self.t5_tokenizer = qwen_tokenizer, t5_tokenizer
        self.max_length = max_length
        self.truncation_count = 0
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(cls, qwen_path, qwen_tokenizer_dir, t5_tokenizer_dir, *, qwen_config_path=None,
                        device="cpu", dtype=torch.bfloat16, max_length: int = MAX_LENGTH) -> TextEncoder:  # fmt: skip
        """Load Qwen3 (HF directory, or single file + config.json) and both tokenizers from local paths."""
        qwen_tok, t5_tok = load_tokenizers(qwen_tokenizer_dir, t5_tokenizer_dir)
        model = load_qwen3(qwen_path, qwen_config_path, qwen_tokenizer_dir, device=device, dtype=dtype)
        return cls(model, qwen_tok, t5_tok, max_length=max_length)

    @property
    def hidden_size(self) -> int:
        """Width C of the Qwen states (1024 for Qwen3-0.6B)."""
        return int(self.qwen.config.hidden_size)

    @property
    def device(self) -> torch.device:
        """Device of the Qwen weights (inputs are moved there)."""
        return self.qwen.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the Qwen weights, and of the returned states."""
        return self.qwen.get_input_embeddings().weight.dtype

    @torch.no_grad()
    def _qwen_states(self, ids: list[list[int]]) -> list[torch.Tensor]:
        """Run Qwen3 on the non-empty id lists (right-padded together) -> per caption [S_i, C] valid rows."""
        out = [torch.zeros(0, self.hidden_size, dtype=self.dtype, device=self.device) for _ in ids]
        rows = [i for i, x in enumerate(ids) if x]  # empty captions never reach the model (no fully masked rows)
        if not rows:
            return out
        seq = max(len(ids[i]) for i in rows)
        pad = self.qwen_tokenizer.pad_token_id
        input_ids = torch.tensor([ids[i] + [pad] * (seq - len(ids[i])) for i in rows], device=self.device)
        mask = torch.tensor([[1] * len(ids[i]) + [0] * (seq - len(ids[i])) for i in rows], device=self.device)
        hidden_R_S_C = self.qwen(input_ids=input_ids, attention_mask=mask).last_hidden_state
        for r, i in enumerate(rows):
            out[i] = hidden_R_S_C[r, : len(ids[i])]
        return out

    def encode_unpadded(self, captions: list[str]) -> list[EncodedCaption]:
        """Encode captions in one batched Qwen pass; each result is unpadded and on the CPU (what shards store).

        Truncated captions are counted in ``truncation_count`` and each one is warned about with its first chars.
        """
        if not captions:
            return []
        tokens = tokenize_captions(self.qwen_tokenizer, self.t5_tokenizer, captions, self.max_length)
        for caption, tok in zip(captions, tokens):
            if tok.truncated:
                self.truncation_count += 1
                logger.warning("caption truncated to %d tokens (qwen %d, t5 %d tokens): %r", self.max_length,
                               tok.num_qwen_tokens, tok.num_t5_tokens, caption[:60])  # fmt: skip
        states = self._qwen_states([t.qwen_ids for t in tokens])
        return [
            EncodedCaption(qwen_states=s.cpu(), t5_ids=torch.tensor(t.t5_ids, dtype=torch.long), truncated=t.truncated)
            for s, t in zip(states, tokens)
        ]

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Encode and pad to the batch's longest (max 512): qwen_states [B,S,C] (0 at pads), qwen_mask bool [B,S],
        t5_ids long [B,L], t5_mask bool [B,L], all on the encoder's device."""
        batch = collate_captions(self.encode_unpadded(captions))
        return {k: v.to(self.device) for k, v in batch.items()}

    def empty_caption(self) -> EncodedCaption:
        """The empty caption: no Qwen token (states [0, C]) and T5 ids ``[</s>]`` (docs/model.md#empty-caption)."""
        return EncodedCaption(qwen_states=torch.zeros(0, self.hidden_size, dtype=self.dtype),
                              t5_ids=torch.tensor([T5_EOS_ID], dtype=torch.long))  # fmt: skip

    def fingerprint(self) -> str:
        """A stable hash of both tokenizers, the Qwen config, the Qwen weights and max_length (shards store it and
        refuse to mix encoders). Hashing the weights reads them once (about 1.2 GB for Qwen3-0.6B in bf16)."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"anima-text-v{FINGERPRINT_VERSION}:max_length={self.max_length}".encode())
            h.update(tokenizer_identity(self.qwen_tokenizer).encode())
            h.update(tokenizer_identity(self.t5_tokenizer).encode())
            cfg = {k: v for k, v in self.qwen.config.to_dict().items()
                   if k not in _CONFIG_IGNORED and not k.startswith("_")}  # fmt: skip
            h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
            for name, tensor in sorted(self.qwen.state_dict().items()):
                t = tensor.detach().cpu().contiguous()
                h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes())
            self._fingerprint = "text-" + h.hexdigest()[:16]
        return self._fingerprint
