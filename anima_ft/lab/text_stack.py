"""The mini-lab's text side, built offline in a second: two word-level tokenizers and a tiny random Qwen3.

The real pipeline uses Qwen3-0.6B-Base with the Qwen2 tokenizer and the T5 tokenizer (model spec section 5). A
newcomer's machine has neither, so the lab builds stand-ins with the same interfaces:

* Qwen side: a ``tokenizers`` WordLevel model over the caption vocabulary (lower-cased, split on whitespace and
  punctuation), wrapped as ``transformers.PreTrainedTokenizerFast``; no BOS/EOS, like Qwen2's tokenizer. Pad id 0.
* T5 side: the same words at ids 3.. (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, all < 32128), with a post-processor
  appending ``</s>`` as T5TokenizerFast does; the empty caption gives ``[1]``.
* A ``transformers.Qwen3Model`` of width ``hidden_size`` (= the tiny adapter's ``source_dim``), randomly initialized
  from the seed and frozen: its last hidden state is the Qwen conditioning, as for the real model.

:class:`LabTextEncoder` satisfies the prepare text-encoder protocol (``encode_unpadded``, ``fingerprint``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

T5_VOCAB_SIZE = 32128


@dataclass
class EncodedCaption:
    """One caption, unpadded: ``qwen_states [S, C]`` (S may be 0), ``t5_ids [L]`` ending in ``</s>``."""

    qwen_states: torch.Tensor
    t5_ids: torch.Tensor
    truncated: bool = False


def _word_tokenizer(vocab: dict[str, int], unk: str, eos: str | None) -> Tokenizer:
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if eos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    return tok


def build_tokenizers(words: list[str]) -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """``(qwen_tokenizer, t5_tokenizer)`` over ``words`` (sorted and de-duplicated first, so the ids are stable)."""
    words = sorted(set(w.lower() for w in words))
    if len(words) + 3 > T5_VOCAB_SIZE:
        raise ValueError(f"{len(words)} words do not fit the T5 vocabulary of {T5_VOCAB_SIZE}")
    qwen_vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    t5_vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    qwen_tok = PreTrainedTokenizerFast(
        tokenizer_object=_word_tokenizer(qwen_vocab, "<unk>", None), pad_token="<|endoftext|>", unk_token="<unk>"
    )
    t5_tok = PreTrainedTokenizerFast(
        tokenizer_object=_word_tokenizer(t5_vocab, "<unk>", "</s>"), pad_token="<pad>", eos_token="</s>",
        unk_token="<unk>"
    )
    return qwen_tok, t5_tok


def tiny_qwen3_model(vocab_size: int, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Qwen3Model:
    """A frozen, randomly initialized ``Qwen3Model`` (2 heads of 16, 1 KV head) in float32 eval mode."""
    if hidden_size % 16:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of the head dim 16")
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // 16, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=128, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen3Model(config).float().eval()
    model.requires_grad_(False)
    return model


class LabTextEncoder:
    """Captions -> (Qwen3 last hidden states, T5 ids), one caption per forward so nothing is padded."""

    def __init__(self, qwen_model: Qwen3Model, qwen_tokenizer, t5_tokenizer, max_tokens: int = 64):
        self.qwen_model = qwen_model
        self.qwen_tokenizer = qwen_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.max_tokens = max_tokens

    @classmethod
    def build(cls, words: list[str], hidden_size: int = 32, seed: int = 0) -> LabTextEncoder:
        """The lab's text stack over a caption vocabulary, deterministic for ``seed``."""
        qwen_tok, t5_tok = build_tokenizers(words)
        return cls(tiny_qwen3_model(len(qwen_tok), hidden_size, seed=seed), qwen_tok, t5_tok)

    @torch.no_grad()
    def encode_unpadded(self, captions: list[str]) -> list[EncodedCaption]:
        """Encode each caption: ``qwen_states [S, hidden]`` float32 (S = 0 for ""), ``t5_ids [L]`` long."""
        out = []
        for caption in captions:
            q_ids = self.qwen_tokenizer(caption, add_special_tokens=False)["input_ids"]
            t_ids = self.t5_tokenizer(caption)["input_ids"]
            truncated = len(q_ids) > self.max_tokens or len(t_ids) > self.max_tokens
            if truncated:
                q_ids, t_ids = q_ids[: self.max_tokens], t_ids[: self.max_tokens - 1] + [1]
            width = self.qwen_model.config.hidden_size
            if q_ids:
                ids = torch.tensor([q_ids])
                states = self.qwen_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
            else:
                states = torch.zeros(0, width)
            out.append(EncodedCaption(states.float(), torch.tensor(t_ids, dtype=torch.long), truncated))
        return out

    def fingerprint(self) -> dict:
        """Tokenizer vocabularies and a hash of the Qwen3 weights."""
        h = hashlib.sha256()
        for name, t in sorted(self.qwen_model.state_dict().items()):
            h.update(name.encode())
            h.update(t.float().contiguous().numpy().tobytes())
        vocab = hashlib.sha256(repr(sorted(self.t5_tokenizer.get_vocab().items())).encode()).hexdigest()[:16]
        return {"kind": "lab_tiny_text", "hidden": self.qwen_model.config.hidden_size, "vocab_sha256": vocab,
                "weights_sha256": h.hexdigest()[:16]}
