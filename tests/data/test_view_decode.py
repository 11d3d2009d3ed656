"""The view decoder (``decode_span`` / ``read_sample``: safetensors tensors as views of one private buffer) against the
reference decoder (``split_members`` + ``verify_checksums`` + ``decode_members``, the safetensors library): the same
tensors bit for bit, or the same rejection (reason and message), for well-formed samples and for seeded random
damage to the safetensors headers; and the bf16 finite check against ``torch.isfinite`` on every bf16 bit pattern."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import save as st_save

from anima_ft.data.shard_format import (
    SampleError,
    ShardWriter,
    _all_finite_bf16,
    decode_members,
    decode_owned,
    decode_span,
    make_fingerprint,
    read_index,
    read_sample,
    split_members,
    verify_checksums,
)

QWEN_DIM = 8
BUCKET = (64, 32)  # latent [16, 4, 8]


def _reference(span: bytes, entry: dict) -> tuple:
    try:
        members = split_members(span, entry, entry["key"])
        if entry.get("checksums") is not None:
            verify_checksums(members, entry["checksums"], entry["key"])
        return ("ok", decode_members(members, entry, QWEN_DIM))
    except SampleError as err:
        return ("err", err.reason, str(err))


def _views(span: bytes, entry: dict) -> tuple:
    try:
        return ("ok", decode_span(span, entry, QWEN_DIM))
    except SampleError as err:
        return ("err", err.reason, str(err))


def _owned(span: bytes, entry: dict) -> tuple:
    try:
        return ("ok", decode_owned(bytearray(span), entry, QWEN_DIM))
    except SampleError as err:
        return ("err", err.reason, str(err))


def _assert_same(got: tuple, want: tuple, what: str) -> None:
    assert got[0] == want[0], f"{what}: view decoder {got[:3] if got[0] == 'err' else 'ok'}, reference {want[:3]}"
    if want[0] == "err":
        assert got[1:] == want[1:], what
        return
    a, b = got[1], want[1]
    assert a["meta"] == b["meta"] and set(a) == set(b), what
    for name in ("latent", "qwen_states", "t5_ids"):
        x, y = a[name], b[name]
        assert (x.dtype, x.shape, x.is_contiguous()) == (y.dtype, y.shape, y.is_contiguous()), (what, name)
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), (what, name)  # bitwise, NaN-proof


def _sample_tensors(rng: random.Random) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    S, L = rng.randint(1, 6), rng.randint(1, 5)
    return {"latent": torch.randn(16, BUCKET[1] // 8, BUCKET[0] // 8, generator=g).to(torch.bfloat16),
            "qwen_states": torch.randn(S, QWEN_DIM, generator=g).to(torch.bfloat16),
            "t5_ids": torch.randint(0, 32128, (L,), generator=g, dtype=torch.int32)}


def _header_and_data(tensors: dict[str, torch.Tensor]) -> tuple[dict, bytes]:
    """The header dict and data bytes ``st_save`` writes for ``tensors``."""
    raw = st_save(tensors)
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _pack(header_text: bytes, data: bytes, length: int | None = None) -> bytes:
    return (len(header_text) if length is None else length).to_bytes(8, "little") + header_text + data


def _damaged(rng: random.Random, tensors: dict[str, torch.Tensor]) -> bytes:
    """A safetensors file of ``tensors`` with one seeded random defect (or none) in its header or layout."""
    header, data = _header_and_data(tensors)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    info = header[name]
    kind = rng.randrange(23)
    if kind == 0:
        info["dtype"] = rng.choice(["F32", "I32", "F16", "U16", "I64", "U8", "BOOL", "F8_E4M3", "bf16", "X", 7])
    elif kind == 1:
        info["shape"] = rng.choice([info["shape"][:-1], info["shape"] + [1], [1] + info["shape"], [0],
                                    [float(d) for d in info["shape"]], [-d for d in info["shape"]], [True] * 2,
                                    [2**64] + info["shape"], list(reversed(info["shape"]))])
    elif kind == 2:
        s, e = info["data_offsets"]
        info["data_offsets"] = rng.choice([[s + 1, e + 1], [s, e + 1], [s, e - 1], [e, s], [s - 1, e], [s], [s, e, e],
                                           [float(s), e], [s, 2**70]])
    elif kind == 3:
        info["extra"] = 1
    elif kind == 4:
        del info[rng.choice(sorted(info))]
    elif kind == 5:
        header["__metadata__"] = rng.choice([{"a": 1}, ["x"], "x", None, {"a": "b"}, {"é": "ü"}])
    elif kind == 6:  # a second tensor overlapping / following the data
        header["zz"] = {"dtype": "U8", "shape": [rng.randint(0, 3)], "data_offsets": [len(data), len(data) +
                                                                                      rng.randint(0, 3)]}
    text = json.dumps(header, separators=(",", ":")).encode()
    if kind == 7:  # a repeated key
        text = text[:-1] + b',"' + name.encode() + b'":' + json.dumps(info).encode() + b"}"
    elif kind == 8:  # an escape sequence spelling the same name
        text = text.replace(name.encode(), b"\\u00" + f"{ord(name[0]):02x}".encode() + name[1:].encode(), 1)
    elif kind == 9:
        text = rng.choice([b" ", b"\n", b"\x00", b"x"]) + text
    elif kind == 10:
        text = text + rng.choice([b" ", b"   ", b"\x00", b"x", b"}", b"\n\t"])
    elif kind == 11:
        text = text.replace(b'"__metadata__":{', b'"__metadata__":{"n":NaN,', 1) if b"__metadata__" in text \
            else text[:-1] + b',"__metadata__":{"n":NaN}}'
    elif kind == 12:  # misaligned data: a header length that is not a multiple of 8
        text = text + b" " * rng.randint(1, 7)
    elif kind == 13:
        data = data[: rng.randrange(len(data))]
    elif kind == 14:
        data = data + bytes(rng.randint(1, 9))
    elif kind == 15:
        return _pack(text, data, length=rng.choice([0, 1, len(text) - 1, len(text) + 1, len(text) + len(data) + 1,
                                                    2**63, 100_000_001]))
    elif kind == 16:
        return bytes(rng.randrange(8))
    elif kind == 17:  # random bytes flipped anywhere in the header
        text = bytearray(text)
        for _ in range(rng.randint(1, 3)):
            text[rng.randrange(len(text))] ^= 1 << rng.randrange(8)
        text = bytes(text)
    elif kind == 18:
        text = text.replace(b"[", b"[ ", 1).replace(b":", b" : ", 2)  # harmless whitespace
    elif kind == 19:
        text = text.replace(b'"', b"'", 2)
    elif kind == 20:
        text = b"[" + text + b"]"
    elif kind == 21:  # another tensor name
        text = text.replace(b'"' + name.encode() + b'"', b'"' + name.encode() + b'_"', 1)
    return _pack(text, data)


def _write(tmp_path, members_list: list[dict[str, bytes]], lens: list[tuple[int, int]]) -> tuple[bytes, list]:
    tar = tmp_path / "v-0000.tar"
    with ShardWriter(tar, make_fingerprint({"t": 1}, {"t": 1})) as writer:
        for i, (members, (S, L)) in enumerate(zip(members_list, lens)):
            writer.add_raw(f"k{i:05d}", members, BUCKET, S, QWEN_DIM, L)
        writer.commit()
    return tar.read_bytes(), read_index(tar)["samples"]


def _members(tensors: dict[str, torch.Tensor], caption: str = "a caption") -> dict[str, bytes]:
    meta = json.dumps({"caption": caption, "bucket": list(BUCKET)}).encode()
    return {"json": meta, "latent.safetensors": st_save({"latent": tensors["latent"]}),
            "text.safetensors": st_save({"qwen_states": tensors["qwen_states"], "t5_ids": tensors["t5_ids"]})}


def test_view_decoder_matches_the_reference_on_damaged_safetensors_headers(tmp_path):
    rng = random.Random(1234)
    members_list, lens = [], []
    for _ in range(400):
        tensors = _sample_tensors(rng)
        members = _members(tensors)
        which = rng.choice(["latent", "text"])
        part = {"latent": tensors["latent"]} if which == "latent" else {k: tensors[k] for k in ("qwen_states", "t5_ids")}
        members[f"{which}.safetensors"] = _damaged(rng, part)
        members_list.append(members)
        lens.append((tensors["qwen_states"].shape[0], tensors["t5_ids"].shape[0]))
    data, entries = _write(tmp_path, members_list, lens)
    reasons = set()
    for entry in entries:
        span = data[entry["span"][0] : entry["span"][1]]
        want = _reference(span, entry)
        _assert_same(_views(span, entry), want, entry["key"])
        _assert_same(_owned(span, entry), want, entry["key"] + " (decode_owned)")
        reasons.add(want[1] if want[0] == "err" else "ok")
    assert {"ok", "corrupt_member", "bad_shape", "missing_field"} <= reasons, reasons  # the damage reached them all


def test_view_decoder_matches_on_clean_and_non_finite_samples_and_is_private(tmp_path):
    rng = random.Random(99)
    members_list, lens, poisoned = [], [], []
    specials = [0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0xFFFF, 0x7FFF]  # +-Inf, NaNs (bf16 bits)
    for i in range(60):
        tensors = _sample_tensors(rng)
        if i % 3 == 0:
            name = rng.choice(["latent", "qwen_states"])
            flat = tensors[name].view(torch.int16).reshape(-1)
            bits = rng.choice(specials)
            flat[rng.randrange(flat.numel())] = bits - 2**16 if bits >= 2**15 else bits
            poisoned.append(f"k{i:05d}")
        members_list.append(_members(tensors))
        lens.append((tensors["qwen_states"].shape[0], tensors["t5_ids"].shape[0]))
    data, entries = _write(tmp_path, members_list, lens)
    tar = tmp_path / "v-0000.tar"
    with open(tar, "rb") as f:
        for entry in entries:
            span = data[entry["span"][0] : entry["span"][1]]
            want = _reference(span, entry)
            assert (want[0] == "err" and want[1] == "non_finite") == (entry["key"] in poisoned), entry["key"]
            got = _views(span, entry)
            _assert_same(got, want, entry["key"])
            _assert_same(_owned(span, entry), want, entry["key"] + " (decode_owned)")
            try:
                local = ("ok", read_sample(f, entry, QWEN_DIM))
            except SampleError as err:
                local = ("err", err.reason, str(err))
            _assert_same(local, want, entry["key"] + " (read_sample)")
            if got[0] == "ok":  # views of one buffer (no copy per tensor), writable, private to this decode
                tensors = [got[1][k] for k in ("latent", "qwen_states", "t5_ids")]
                lo = min(t.data_ptr() for t in tensors)
                hi = max(t.data_ptr() + t.numel() * t.element_size() for t in tensors)
                assert hi - lo <= len(span), entry["key"]  # all inside one span-sized buffer
                assert all(t.is_contiguous() for t in tensors), entry["key"]
                got[1]["latent"].fill_(0)
                got[1]["qwen_states"].fill_(0)
                _assert_same(_views(span, entry), want, entry["key"] + " (after writing to a decoded sample)")


def test_decode_owned_views_the_buffer_it_is_given_and_refuses_bytes(tmp_path):
    rng = random.Random(11)
    tensors = _sample_tensors(rng)
    data, entries = _write(tmp_path, [_members(tensors)], [(tensors["qwen_states"].shape[0],
                                                           tensors["t5_ids"].shape[0])])
    span = data[entries[0]["span"][0] : entries[0]["span"][1]]
    buf = bytearray(span)
    out = decode_owned(buf, entries[0], QWEN_DIM)
    _assert_same(("ok", out), _reference(span, entries[0]), "decode_owned")
    start = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    for name in ("latent", "qwen_states", "t5_ids"):  # no copy: every tensor lies inside the caller's buffer
        assert start <= out[name].data_ptr() < start + len(buf), name
    out["latent"].fill_(0)
    assert buf != span  # the buffer itself was decoded (and written through the view)
    with pytest.raises(TypeError, match="decode_span for bytes"):
        decode_owned(span, entries[0], QWEN_DIM)


def test_truncated_file_is_the_same_reason_through_read_sample(tmp_path):
    rng = random.Random(5)
    tensors = _sample_tensors(rng)
    _, entries = _write(tmp_path, [_members(tensors)], [(tensors["qwen_states"].shape[0], tensors["t5_ids"].shape[0])])
    tar = tmp_path / "v-0000.tar"
    cut = entries[0]["members"]["text.safetensors"][0] + 600
    full = tar.read_bytes()
    tar.write_bytes(full[:cut])
    want = _reference(full[entries[0]["span"][0] : cut], entries[0])
    assert want[:2] == ("err", "truncated")
    with open(tar, "rb") as f, pytest.raises(SampleError) as err:
        read_sample(f, entries[0], QWEN_DIM)
    assert (err.value.reason, str(err.value)) == want[1:]


def test_bf16_finite_check_matches_isfinite_on_every_bit_pattern():
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = torch.isfinite(patterns.float())
    filler = torch.ones(7, dtype=torch.bfloat16)
    for k in range(patterns.numel()):
        x = torch.cat([filler[: k % 7], patterns[k : k + 1], filler[: 3]])
        assert _all_finite_bf16(x) == bool(finite[k]), hex(k - 2**15 & 0xFFFF)
    assert _all_finite_bf16(torch.empty(0, dtype=torch.bfloat16))
    assert _all_finite_bf16(patterns[finite].reshape(-1, 1)[::2])  # non-contiguous input
