"""The mini-lab's text side, built offline in a second: two word-level tokenizers and a tiny random Qwen3.

The real pipeline uses Qwen3-0.6B-Base with the Qwen2 tokenizer and the T5 tokenizer (docs/model.md#text). A
newcomer's machine has neither, so the lab builds stand-ins with the same interfaces:

* Qwen side: a ``tokenizers`` WordLevel model over the caption vocabulary (lower-cased, split on whitespace and
  punctuation), wrapped as ``transformers.PreTrainedTokenizerFast``; no BOS/EOS, like Qwen2's tokenizer. Pad id 0.
* T5 side: the same words at ids 3.. (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, all < 32128), with a post-processor
  appending ``</s>`` as T5TokenizerFast does; the empty caption gives ``[1]``.
* ``anima_ft.model.text_encoder.tiny_qwen3`` of width ``hidden_size`` (= the tiny adapter's ``source_dim``), randomly
  initialized from the seed and frozen: its last hidden state is the Qwen conditioning, as for the real model.

:func:`build_text_encoder` wraps them in the project's ``TextEncoder`` (which prepare takes as its text encoder).
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

T5_VOCAB_SIZE = 32128


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


def build_text_encoder(words: list[str], hidden_size: int = 32, seed: int = 0):
    """The lab's :class:`anima_ft.model.text_encoder.TextEncoder`: the word-level tokenizers over ``words`` and a
    seeded ``tiny_qwen3`` of width ``hidden_size`` (2 layers, 4 heads of 8) whose vocabulary is the Qwen tokenizer's.
    """
    from anima_ft.model.text_encoder import TextEncoder, tiny_qwen3

    qwen_tok, t5_tok = build_tokenizers(words)
    qwen = tiny_qwen3(hidden_size=hidden_size, vocab_size=len(qwen_tok), seed=seed).float()
    return TextEncoder(qwen, qwen_tok, t5_tok)
