"""`prepare`: real images from skimage.data through fake and real (tiny) encoders into shards, counts, resume."""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from anima_ft.data import MixedStream, SourceSpec
from anima_ft.data.buckets import make_buckets, nearest_bucket, resize_and_crop
from anima_ft.data.prepare import PrepareConfig, list_units, prepare_shards
from anima_ft.data.sources import ShardReader, build_catalog

skimage_data = pytest.importorskip("skimage.data")
AREA = 64 * 64
TINY_AREA = 32 * 32  # one 32x32 bucket: the real (tiny) VAE is slow on CPU, so few encoder calls
IMAGES = ["astronaut", "camera", "coffee", "chelsea", "rocket", "horse"]


class FakeVAE:
    """latent = 8x8 average pool of the pixels, channels tiled 3 -> 16 (a formula the test can recompute)."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(pixels.double(), 8)  # [B, 3, H/8, W/8]
        return pooled.repeat(1, 6, 1, 1)[:, :16].float()

    def fingerprint(self):
        return "fake-vae-1"


@dataclass
class Encoded:
    qwen_states: torch.Tensor
    t5_ids: torch.Tensor
    truncated: bool


class FakeText:
    """qwen_states[i] = (code of char i) / 100 in 4 columns; t5 = char codes + </s>; truncated past 20 chars."""

    def encode_unpadded(self, captions):
        out = []
        for c in captions:
            codes = torch.tensor([ord(ch) % 500 for ch in c[:20]], dtype=torch.float32)
            out.append(Encoded(codes[:, None].repeat(1, 4) / 100, torch.cat([codes.long() + 2, torch.ones(1).long()]),
                               len(c) > 20))
        return out

    def fingerprint(self):
        return {"fake_text": 1}


def image_of(name: str) -> Image.Image:
    array = getattr(skimage_data, name)()
    return Image.fromarray(array).convert("RGB")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Six real images (png/jpg/webp) with captions, plus a corrupt image, a missing and an empty caption."""
    root = tmp_path_factory.mktemp("images") / "imgs"
    root.mkdir()
    for i, name in enumerate(IMAGES):
        ext = ["png", "jpg", "webp"][i % 3]
        image_of(name).save(root / f"{name}.{ext}")
        (root / f"{name}.txt").write_text(f"a photo of {name}" + (", very long words" if i == 0 else ""))
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "broken.txt").write_text("broken")
    image_of("coins").save(root / "nocaption.png")
    image_of("moon").save(root / "empty.png")
    (root / "empty.txt").write_text("  \n")
    return root


def run(inputs, out, **kw) -> dict:
    cfg = PrepareConfig(out_dir=str(out), bucket_area=AREA, bucket_width_step=16, shard_size=4, batch_size=2,
                        progress=False, **kw)
    return prepare_shards([str(i) for i in inputs], FakeVAE(), FakeText(), cfg)


def test_prepare_folder_counts_contents_and_resume(image_folder, tmp_path):
    summary = run([image_folder], tmp_path / "out")
    assert summary["samples"] == len(IMAGES) and summary["shards"] == 3  # 9 inputs in units of 4
    assert summary["counts"] == {"undecodable_image": 1, "missing_caption": 1, "empty_caption": 1,
                                 "caption_truncated": 1}
    assert json.loads((tmp_path / "out" / "prepare_summary.json").read_text())["counts"] == summary["counts"]
    cat = build_catalog([SourceSpec("t", str(tmp_path / "out"))], validate="full")
    reader, buckets = ShardReader(cat), make_buckets(AREA, 16, 16)
    for sample_id, entry in ((i, cat.entry(i)) for i in range(len(cat))):
        sample = reader.read(sample_id)
        name = Path(sample["meta"]["origin"]).stem
        original = image_of(name)
        bucket = nearest_bucket(*original.size, buckets)
        cropped, geometry = resize_and_crop(original, bucket)
        assert entry["bucket"] == list(bucket) and sample["meta"]["crop"] == geometry["crop"]
        assert sample["meta"]["original_size"] == list(original.size)
        pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float64)).permute(2, 0, 1)[None] / 127.5 - 1
        want = F.avg_pool2d(pixels, 8).repeat(1, 6, 1, 1)[0, :16]
        torch.testing.assert_close(sample["latent"].double(), want, atol=1e-2, rtol=1e-2)  # bf16 storage
        caption = f"a photo of {name}" + (", very long words" if name == IMAGES[0] else "")
        assert sample["meta"]["caption"] == caption and sample["meta"]["caption_truncated"] == (len(caption) > 20)
        assert sample["t5_ids"].tolist() == [ord(c) % 500 + 2 for c in caption[:20]] + [1]
    # resume: a second run writes nothing new (the tar is untouched)
    tars = sorted((tmp_path / "out").glob("*.tar"))
    mtimes = [t.stat().st_mtime_ns for t in tars]
    assert run([image_folder], tmp_path / "out") == summary
    assert [t.stat().st_mtime_ns for t in tars] == mtimes
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_ranks_split_units_disjointly(image_folder, tmp_path):
    run([image_folder], tmp_path / "split", rank=1, world_size=2)
    units = [u.name for u in list_units([str(image_folder)], 4)]
    assert sorted(p.name for p in (tmp_path / "split").glob("*.tar")) == [f"{u}.tar" for u in units[1::2]]
    summary = run([image_folder], tmp_path / "split", rank=0, world_size=2)
    assert summary["shards"] == len(units) and summary["samples"] == len(IMAGES)


def test_fingerprint_change_in_same_out_dir_is_refused(image_folder, tmp_path):
    run([image_folder], tmp_path / "fp")

    class OtherVAE(FakeVAE):
        def fingerprint(self):
            return "fake-vae-2"

    cfg = PrepareConfig(out_dir=str(tmp_path / "fp"), bucket_area=AREA, bucket_width_step=16, shard_size=4,
                        progress=False)
    with pytest.raises(ValueError, match="new --out"):
        prepare_shards([str(image_folder)], OtherVAE(), FakeText(), cfg)


def test_img2dataset_tar_input(tmp_path):
    """jpg+txt, png+json caption, a truncated image, a sample without caption, a non-image member."""
    tar = tmp_path / "in" / "00000.tar"
    tar.parent.mkdir()

    def encoded(name, fmt):
        buf = io.BytesIO()
        image_of(name).save(buf, format=fmt)
        return buf.getvalue()

    with wds.TarWriter(str(tar), encoder=False) as w:
        w.write({"__key__": "000000000", "jpg": encoded("astronaut", "JPEG"), "txt": b"astronaut in space"})
        w.write({"__key__": "000000001", "png": encoded("coffee", "PNG"), "json": json.dumps({"caption": "coffee"}).encode()})
        w.write({"__key__": "000000002", "jpg": encoded("camera", "JPEG")[:200], "txt": b"cut off"})
        w.write({"__key__": "000000003", "jpg": encoded("rocket", "JPEG")})
        w.write({"__key__": "000000004", "parquet": b"x", "txt": b"no image"})
    summary = run([tar], tmp_path / "out")
    assert summary["samples"] == 2
    assert summary["counts"] == {"undecodable_image": 1, "missing_caption": 1, "missing_image": 1}
    stream = MixedStream([SourceSpec("laion", str(tmp_path / "out"))], micro_batch_size=1, validate="full")
    captions = {next(iter(stream))["caption"][0] for _ in range(1)}
    assert captions <= {"astronaut in space", "coffee"}


@pytest.fixture(scope="module")
def long_caption_folder(image_folder) -> Path:
    """One image whose caption is far past 512 tokens."""
    folder = image_folder.parent / "long"
    folder.mkdir(exist_ok=True)
    image_of("chelsea").save(folder / "cat.png")
    (folder / "cat.txt").write_text(" ".join(["1girl, solo, very long tag list"] * 200))
    return folder


def check_real_shards(out: Path, vae, text) -> None:
    """Every stored sample equals what the encoders give for its crop and caption (bf16 storage tolerance)."""
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["samples"] == len(IMAGES) + 1
    assert summary["counts"]["caption_truncated"] == 1 and summary["counts"]["undecodable_image"] == 1
    cat = build_catalog([SourceSpec("t", str(out))], validate="full")
    reader = ShardReader(cat)
    names, checked = set(), []
    for sample_id in range(len(cat)):
        sample = reader.read(sample_id)
        name = Path(sample["meta"]["origin"]).stem
        names.add(name)
        if name in ("camera", "cat", "coffee"):
            checked.append((name, sample, tuple(cat.entry(sample_id)["bucket"])))
    assert {c[2] for c in checked} == {checked[0][2]}  # one bucket (tiny area): one encoder call below
    pixels = torch.stack([
        torch.from_numpy(np.asarray(resize_and_crop(image_of("chelsea" if n == "cat" else n), b)[0], np.float32))
        for n, _, b in checked]).permute(0, 3, 1, 2) / 127.5 - 1  # fmt: skip
    latents = vae.encode(pixels).float()
    refs = text.encode_unpadded([sample["meta"]["caption"] for _, sample, _ in checked])
    for (name, sample, _), latent, ref in zip(checked, latents, refs):
        torch.testing.assert_close(sample["latent"].float(), latent, atol=2e-2, rtol=2e-2)
        assert sample["t5_ids"].tolist() == ref.t5_ids.tolist() and sample["t5_ids"][-1] == 1
        torch.testing.assert_close(sample["qwen_states"].float(), ref.qwen_states.float(), atol=2e-2, rtol=2e-2)
        assert sample["meta"]["caption_truncated"] == (name == "cat")
        if name == "cat":
            assert len(sample["t5_ids"]) == 512 and sample["qwen_states"].shape[0] == 512
    assert names == set(IMAGES) | {"cat"}


def test_end_to_end_real_tiny_encoders(image_folder, long_caption_folder, tmp_path, tokenizer_dir):
    """prepare with the real AnimaVAE / TextEncoder classes (tiny random weights) and the real tokenizers."""
    from anima_ft.model.text_encoder import TextEncoder, tiny_qwen3
    from anima_ft.model.tokenizers import load_tokenizers
    from anima_ft.model.vae import AnimaVAE, tiny_vae

    qwen_tok, t5_tok = load_tokenizers(tokenizer_dir / "qwen3_06b", tokenizer_dir / "t5_old")
    vae, text = AnimaVAE(tiny_vae(seed=0)), TextEncoder(tiny_qwen3(seed=0).to(torch.bfloat16), qwen_tok, t5_tok)
    cfg = PrepareConfig(out_dir=str(tmp_path / "real"), bucket_area=TINY_AREA, bucket_width_step=16, shard_size=4,
                        batch_size=8, progress=False)
    prepare_shards([str(image_folder), str(long_caption_folder)], vae, text, cfg)
    check_real_shards(tmp_path / "real", vae, text)
    batch = next(iter(MixedStream([SourceSpec("t", str(tmp_path / "real"))], micro_batch_size=2)))
    assert batch["qwen_states"].shape[2] == text.hidden_size and batch["latents"].shape[1] == 16


@pytest.mark.slow  # loads the real tokenizers a second time; the library path is covered by the test above
def test_cli_with_tiny_encoders(image_folder, long_caption_folder, tmp_path, tokenizer_dir):
    """`anima-ft prepare --tiny-encoders 0` writes the same shards the library call does."""
    from anima_ft.cli import main
    from anima_ft.model.text_encoder import TextEncoder, tiny_qwen3
    from anima_ft.model.tokenizers import load_tokenizers
    from anima_ft.model.vae import AnimaVAE, tiny_vae

    qwen_dir, t5_dir = tokenizer_dir / "qwen3_06b", tokenizer_dir / "t5_old"
    out = tmp_path / "cli"
    argv = ["prepare", str(image_folder), str(long_caption_folder), "--out", str(out), "--tiny-encoders", "0",
            "--qwen-tokenizer", str(qwen_dir), "--t5-tokenizer", str(t5_dir), "--bucket-area", str(TINY_AREA),
            "--bucket-width-step", "16", "--shard-size", "4", "--batch-size", "8", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    qwen_tok, t5_tok = load_tokenizers(qwen_dir, t5_dir)
    check_real_shards(out, AnimaVAE(tiny_vae(seed=0)), TextEncoder(tiny_qwen3(seed=0).to(torch.bfloat16), qwen_tok, t5_tok))


RANK_SCRIPT = """
import os, sys, torch, torch.nn.functional as F
sys.path.insert(0, {test_dir!r})
from test_prepare import FakeText, FakeVAE
from anima_ft.data.prepare import PrepareConfig, prepare_shards
cfg = PrepareConfig(out_dir={out!r}, bucket_area={area}, bucket_width_step=16, shard_size=2, batch_size=2,
                    progress=False, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
prepare_shards([{inputs!r}], FakeVAE(), FakeText(), cfg)
"""


@pytest.mark.multiproc
def test_two_processes_split_the_work(image_folder, tmp_path):
    """Two concurrent ranks (RANK / WORLD_SIZE as torchrun sets them) write disjoint shards that equal one run."""
    import os
    import subprocess
    import sys

    script = RANK_SCRIPT.format(test_dir=str(Path(__file__).parent), out=str(tmp_path / "two"), area=AREA,
                                inputs=str(image_folder))
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"})
             for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    cfg = PrepareConfig(out_dir=str(tmp_path / "one"), bucket_area=AREA, bucket_width_step=16, shard_size=2,
                        batch_size=2, progress=False)
    one = prepare_shards([str(image_folder)], FakeVAE(), FakeText(), cfg)
    from anima_ft.data.prepare import write_summary

    two = write_summary(tmp_path / "two")
    assert two == one
    for tar in (tmp_path / "one").glob("*.tar"):
        assert (tmp_path / "two" / tar.name).read_bytes() == tar.read_bytes()


# --- one input never stops the run: shapes, declared sizes and caption bytes ------------------------------------------

def png_bytes(width: int, height: int, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched to declare ``width`` x ``height`` (CRC fixed): a header-only bomb."""
    data = bytearray(png_bytes(1, 1))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def expected_reason(image: bytes | None, caption: bytes | None, cfg: PrepareConfig, buckets) -> str | None:
    """The reference: which named skip an input must get (None = encoded), from the header and the caption bytes."""
    if image is None:
        return "missing_image"
    if caption is not None:
        try:
            text = caption.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError:
            return "caption_invalid_utf8"
        if "\x00" in text:
            return "caption_nul_byte"
        if not text.strip():
            return "empty_caption"
    else:
        return "missing_caption"
    w, h = struct.unpack(">II", image[16:24])  # the PNG IHDR, read without PIL
    if w * h > Image.MAX_IMAGE_PIXELS:
        return "decompression_bomb"
    if w * h > cfg.max_input_pixels:
        return "image_too_large"
    W, H = nearest_bucket(w, h, buckets)
    kept = min((W / H) / (w / h), (w / h) / (W / H))  # share of the covering resize that survives the crop
    return "aspect_ratio_out_of_range" if 1 - kept > cfg.max_crop_fraction else None


def run_inputs(folder: Path, out: Path, inputs, monkeypatch, **kw) -> tuple[dict, list, PrepareConfig]:
    """Write (image bytes, caption bytes) pairs as a folder, run prepare, return (summary, resize targets, cfg)."""
    folder.mkdir(parents=True)
    for i, (image, caption) in enumerate(inputs):
        if image is not None:
            (folder / f"in{i:03d}.png").write_bytes(image)
        else:  # a caption without its image is not an input of a folder; use a broken file instead
            (folder / f"in{i:03d}.png").write_bytes(b"")
        if caption is not None:
            (folder / f"in{i:03d}.txt").write_bytes(caption)
    targets = []
    real_resize = Image.Image.resize

    def spy(self, size, *a, **k):
        targets.append((tuple(self.size), tuple(size)))
        return real_resize(self, size, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", spy)
    cfg = PrepareConfig(out_dir=str(out), bucket_area=AREA, bucket_width_step=16, shard_size=64, batch_size=4,
                        progress=False, **kw)
    summary = prepare_shards([str(folder)], FakeVAE(), FakeText(), cfg)
    return summary, targets, cfg


def assert_bounded_and_counted(summary, targets, cfg, inputs) -> None:
    buckets = make_buckets(cfg.bucket_area, 16, cfg.bucket_width_step, cfg.min_ar, cfg.max_ar)
    reasons = [expected_reason(img if img else None, cap, cfg, buckets) if img != b"" else "undecodable_image"
               for img, cap in inputs]
    want = Counter(r for r in reasons if r)
    encoded = [i for i, r in enumerate(reasons) if r is None]
    want.update({"caption_truncated": sum(len(inputs[i][1].decode().removeprefix("\ufeff").strip()) > 20
                                          for i in encoded)})
    assert summary["counts"] == {k: v for k, v in want.items() if v}, (summary["counts"], want)
    assert summary["samples"] == len(encoded)
    assert json.loads((Path(cfg.out_dir) / "prepare_summary.json").read_text())["counts"] == summary["counts"]
    for examples in summary["examples"].values():
        assert all(Path(e).name.startswith("in") for e in examples)
    max_bucket = max(w * h for w, h in buckets)
    bound = max_bucket / (1 - cfg.max_crop_fraction) + 2 * math.sqrt(max_bucket / (1 - cfg.max_crop_fraction)) + 1
    for source, (rw, rh) in targets:  # every resize prepare did is bounded by the bucket, whatever the input shape
        assert rw * rh <= bound, (source, (rw, rh), bound)
        assert source[0] * source[1] <= cfg.max_input_pixels


def test_extreme_inputs_are_counted_skips_with_bounded_memory(tmp_path, monkeypatch):
    """The reported inputs: a 1x6000 PNG (MemoryError before), 1x1000 (2.6 GB peak before), plus a 1x1 image,
    header-only bombs, a size over max_input_pixels, and captions with invalid UTF-8, NUL, a BOM and only spaces."""
    ok = b"a caption"
    inputs = [
        (png_bytes(1, 6000), ok), (png_bytes(6000, 1), ok), (png_bytes(1, 1000), ok),  # aspect ratio
        (png_bytes(1, 1), ok), (png_bytes(3, 2), b"\xef\xbb\xbfBOM then text"),  # encoded (upscaled to the bucket)
        (png_declaring(100_000, 100_000), ok),  # 1e10 px declared: PIL's bomb error
        (png_declaring(10_000, 10_000), ok),  # 1e8 px: PIL's bomb warning, an error here
        (png_declaring(400, 300), ok),  # 120000 px > max_input_pixels below, refused before decoding
        (png_bytes(64, 64), b"bad \xff\xfe utf-8"), (png_bytes(64, 64), b"nul \x00 inside"),
        (png_bytes(64, 64), b" \n\t "), (png_bytes(64, 64), None), (b"", ok),
    ]
    summary, targets, cfg = run_inputs(tmp_path / "in", tmp_path / "out", inputs, monkeypatch,
                                       max_input_pixels=100_000)
    assert summary["counts"] == {"aspect_ratio_out_of_range": 3, "decompression_bomb": 2, "image_too_large": 1,
                                 "caption_invalid_utf8": 1, "caption_nul_byte": 1, "empty_caption": 1,
                                 "missing_caption": 1, "undecodable_image": 1}
    assert_bounded_and_counted(summary, targets, cfg, inputs)
    assert summary["samples"] == 2 and len(targets) == 2


def test_tar_captions_strict_utf8_and_json(tmp_path):
    tar = tmp_path / "in" / "00000.tar"
    tar.parent.mkdir()
    img = png_bytes(64, 64)
    with wds.TarWriter(str(tar), encoder=False) as w:
        w.write({"__key__": "0", "png": img, "txt": b"fine caption"})
        w.write({"__key__": "1", "png": img, "txt": b"\xc3\x28 broken"})
        w.write({"__key__": "2", "png": img, "json": b'{"caption": "nul \\u0000 escaped"}'})
        w.write({"__key__": "3", "png": img, "json": b'{"caption": '})
        w.write({"__key__": "4", "png": img, "json": b'{"caption": "\xff"}'})
        w.write({"__key__": "5", "png": img, "json": json.dumps({"text": "from text"}).encode()})
    summary = run([tar], tmp_path / "out")
    assert summary["samples"] == 2
    assert summary["counts"] == {"caption_invalid_utf8": 2, "caption_nul_byte": 1, "caption_bad_json": 1}


def test_prepare_limits_are_checked(tmp_path):
    for kw, needle in (({"max_crop_fraction": 1.0}, "max_crop_fraction=1.0"),
                       ({"max_crop_fraction": float("nan")}, "max_crop_fraction=nan"),
                       ({"max_input_pixels": 0}, "max_input_pixels=0"),
                       ({"max_input_pixels": 10**12}, "PIL's decompression-bomb limit")):
        with pytest.raises(ValueError, match=needle):
            prepare_shards([], FakeVAE(), FakeText(), PrepareConfig(out_dir=str(tmp_path), **kw))


SHAPES = st.one_of(
    st.tuples(st.integers(1, 8), st.integers(1, 8)),  # tiny
    st.tuples(st.integers(1, 3), st.integers(200, 3000)),  # extreme tall
    st.tuples(st.integers(200, 3000), st.integers(1, 3)),  # extreme wide
    st.tuples(st.integers(16, 160), st.integers(16, 160)),  # ordinary (some above max_input_pixels below)
)
CAPTIONS = st.one_of(
    st.none(), st.binary(max_size=30), st.text(max_size=30).map(lambda t: t.encode()),
    st.tuples(st.text(max_size=10), st.text(max_size=10)).map(lambda p: (p[0] + "\x00" + p[1]).encode()),
    st.sampled_from([b"a photo", b"  ", b"\xef\xbb\xbf", b"\xef\xbb\xbfok", "caf\u00e9 \u2603".encode()]),
)
INPUTS = st.one_of(
    st.tuples(SHAPES.map(lambda s: png_bytes(*s)), CAPTIONS),
    st.tuples(st.sampled_from([(40_000, 40_000), (9_000, 9_000), (200, 200), (5000, 10)]).map(
        lambda s: png_declaring(*s)), CAPTIONS),  # header-only sizes: never decoded
)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(inputs=st.lists(INPUTS, min_size=1, max_size=6))
def test_fuzz_shapes_and_caption_bytes(tmp_path_factory, inputs):
    """Every input is encoded with a bounded resize or is a counted skip with the reference's reason; counts exact."""
    root = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as monkeypatch:
        summary, targets, cfg = run_inputs(root / "in", root / "out", inputs, monkeypatch, max_input_pixels=12_000)
    assert_bounded_and_counted(summary, targets, cfg, inputs)
