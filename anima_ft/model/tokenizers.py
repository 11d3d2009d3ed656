"""Caption tokenization for Anima's text path: Qwen3 (``Qwen2Tokenizer``) and T5 (docs/model.md#text).

Conventions (the trainers', diffusion-pipe and sd-scripts):

* Qwen: the raw caption, no chat template, no BOS/EOS; pad = ``<|endoftext|>`` = 151643, right padding.
* T5: original T5 SentencePiece vocabulary, no BOS, ``</s>`` = 1 appended; pad = 0.
* Both are cut at ``max_length`` = 512 tokens. T5 keeps its ``</s>`` (511 pieces + ``</s>``), as the tokenizers'
  own ``truncation=True`` does. Truncation is never silent: it is flagged per caption and counted by the caller.

Examples checked with the real tokenizers: ``"1girl, solo, @artist name, smiling"`` gives
Qwen ``[16, 28552, 11, ...]`` and T5 ``[209, 18722, 6, 6729, 6, 3320, 1408, 343, 564, 6, 20770, 1]``.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

MAX_LENGTH = 512
QWEN_PAD_ID = 151643
T5_PAD_ID = 0
T5_EOS_ID = 1
_IDENTITY_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> identity hash


@dataclass
class TokenizedCaption:
    """Token ids of one caption after truncation.

    qwen_ids: Qwen ids (no special tokens), at most max_length, possibly empty.
    t5_ids: T5 ids ending with ``</s>``, at most max_length. truncated: either sequence was cut.
    num_qwen_tokens / num_t5_tokens: the lengths before truncation (for the warning).
    """

    qwen_ids: list[int]
    t5_ids: list[int]
    truncated: bool
    num_qwen_tokens: int
    num_t5_tokens: int


def load_tokenizers(qwen_tokenizer_dir: str | Path, t5_tokenizer_dir: str | Path):
    """Load ``Qwen2Tokenizer`` and ``T5TokenizerFast`` from local directories (never from a hub)."""
    from transformers import Qwen2Tokenizer, T5TokenizerFast

    for name, path, needed in (("qwen_tokenizer_dir", qwen_tokenizer_dir, "vocab.json"),
                               ("t5_tokenizer_dir", t5_tokenizer_dir, "tokenizer.json")):  # fmt: skip
        if not (Path(path) / needed).is_file():
            raise ValueError(
                f"{name}={path} has no {needed}; point it at a local tokenizer directory "
                "(diffusion-pipe configs/qwen3_06b and configs/t5_old hold the right files)"
            )
    qwen = Qwen2Tokenizer.from_pretrained(str(qwen_tokenizer_dir), local_files_only=True)
    t5 = T5TokenizerFast.from_pretrained(str(t5_tokenizer_dir), local_files_only=True)
    check_tokenizers(qwen, t5)
    return qwen, t5


def check_tokenizers(qwen_tokenizer, t5_tokenizer) -> None:
    """Raise ValueError when the tokenizers do not follow the Anima conventions (pad ids, right padding)."""
    if qwen_tokenizer.pad_token_id is None:
        raise ValueError("the Qwen tokenizer has no pad token; Anima pads with <|endoftext|> (id 151643)")
    if t5_tokenizer.eos_token_id is None or t5_tokenizer.pad_token_id is None:
        raise ValueError("the T5 tokenizer needs </s> and <pad> tokens (ids 1 and 0 in the original T5 vocabulary)")
    for name, tok in (("Qwen", qwen_tokenizer), ("T5", t5_tokenizer)):
        if tok.padding_side != "right":
            raise ValueError(f"the {name} tokenizer pads on the {tok.padding_side}; Anima uses right padding")


def tokenize_captions(qwen_tokenizer, t5_tokenizer, captions: list[str], max_length: int = MAX_LENGTH):
    """Tokenize ``captions`` for both encoders and cut them at ``max_length`` -> list[TokenizedCaption]."""
    if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"captions must be a list of str, got {type(captions).__name__}")
    if max_length < 2:
        raise ValueError(f"max_length={max_length}; need at least 2 (T5 keeps its </s>)")
    # verbose=False: we report truncation ourselves, per caption.
    qwen_all = qwen_tokenizer(list(captions), add_special_tokens=False, verbose=False)["input_ids"]
    t5_all = t5_tokenizer(list(captions), add_special_tokens=True, verbose=False)["input_ids"]
    eos = t5_tokenizer.eos_token_id
    out = []
    for caption, qwen_ids, t5_ids in zip(captions, qwen_all, t5_all):
        if not t5_ids or t5_ids[-1] != eos:
            raise ValueError(
                f"the T5 tokenizer did not append </s> (id {eos}) to {caption[:40]!r}; use T5TokenizerFast"
            )
        truncated = len(qwen_ids) > max_length or len(t5_ids) > max_length
        out.append(
            TokenizedCaption(
                qwen_ids=list(qwen_ids[:max_length]),
                t5_ids=list(t5_ids) if len(t5_ids) <= max_length else list(t5_ids[: max_length - 1]) + [eos],
                truncated=truncated,
                num_qwen_tokens=len(qwen_ids),
                num_t5_tokens=len(t5_ids),
            )
        )
    return out


def tokenizer_identity(tokenizer) -> str:
    """A stable hash of a tokenizer's full definition (vocabulary, merges, normalizer, special tokens).

    The backend JSON is re-serialized with sorted keys so map ordering cannot change the hash. Cached per
    tokenizer object (about a second for Qwen's 151k-token vocabulary).
    """
    cached = _IDENTITY_CACHE.get(tokenizer)
    if cached is not None:
        return cached
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(json.dumps(json.loads(backend.to_str()), sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.padding_side]
    h.update(json.dumps(specials).encode())
    _IDENTITY_CACHE[tokenizer] = h.hexdigest()
    return _IDENTITY_CACHE[tokenizer]
