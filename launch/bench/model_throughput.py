"""Whole-model train-step throughput of OUR full-size Anima DiT at the peer's shapes (not a test).

One step = ``model.denoise(x_t, t, ctx)`` forward + ``out.float().pow(2).mean().backward()``, exactly the peer's
step on diffusers' ``CosmosTransformer3DModel``: latents [B, 16, 1, 128, 128] (1024^2 px, 4096 tokens), context
[B, 512, 1024] given directly (the DiT alone, no LLM adapter: 1.956e9 parameters like the peer's), random init,
bf16, no optimizer. For every (attention backend sdpa|triton, batch 1|2|4, activation checkpointing off|on): two
warm-up steps, then the mean of five timed steps (the peer's protocol), img/s, peak memory, MFU = img/s x
``peer_ref.flops_per_image()`` / measured bf16 matmul peak, and the ratio to the peer's number (ours / peer img/s,
> 1 = ours faster). Then, if the deadline allows, the trainer's ``dist.compile_blocks`` path (``block.compile()`` on
every DiT block, as ``anima_ft.train.trainer.build_model`` does) with the sdpa backend, timed like the peer's
compiled step (bs 4): compile seconds (the first step) and step time. ``--only-compiled`` runs just that part
(gpu_session.sh runs it last, in whatever time is left).

Results are rewritten to ``--out`` after every configuration, so a killed run keeps what finished; the
configuration running when it was killed is named in ``in_progress``.

    python launch/bench/model_throughput.py --out /tmp/model.json --peer-json .peer_run/baseline.json
    TRITON_INTERPRET=1 python launch/bench/model_throughput.py --smoke --out /tmp/model.json    # CPU, tiny model
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
from peer_ref import flops_per_image, load_peer, peer_dit  # noqa: E402

from anima_ft.model import AnimaConfig, build_anima  # noqa: E402
from anima_ft.runtime import write_json_atomic  # noqa: E402

WARMUP, TIMED = 2, 5  # the peer's protocol


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def matmul_peak_tflops(smoke: bool) -> float:
    """Measured dense matmul rate: 8192^3 bf16 on the GPU (the peer's section 1), 512^3 fp32 on CPU (smoke)."""
    n, dtype = (512, torch.float32) if smoke else (8192, torch.bfloat16)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn_like(a)
    if torch.cuda.is_available():
        from triton.testing import do_bench

        ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    else:
        a @ b
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        ms = (time.perf_counter() - t0) / 5 * 1e3
    return 2 * n**3 / (ms * 1e-3) / 1e12


class Bench:
    """The model, its inputs per batch size, and the results file."""

    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        # DiT alone (adapter=None): the peer's model is the DiT alone and gets the context directly
        self.cfg = AnimaConfig.tiny(with_adapter=False) if self.smoke else AnimaConfig(adapter=None)
        self.latent = 8 if self.smoke else 128
        peer, label = load_peer(args.peer_json, args.stored_peer)
        self.peer, self.peer_label = peer, label
        p = self.cfg.patch_spatial
        self.fpi = flops_per_image(S=(self.latent // p) ** 2, T=self.cfg.context_tokens, L=self.cfg.num_blocks,
                                   C=self.cfg.model_channels, Cc=self.cfg.crossattn_emb_channels, m=self.cfg.mlp_ratio)
        self.res: dict = {"smoke": self.smoke, "device": self.device, "dtype": str(self.dtype)[6:],
                          "latent": [16, 1, self.latent, self.latent], "context": [self.cfg.context_tokens,
                                                                                  self.cfg.crossattn_emb_channels],
                          "flops_per_image": self.fpi, "peer_source": label, "rows": []}
        if torch.cuda.is_available():
            self.res["gpu"] = torch.cuda.get_device_name()

    def save(self) -> None:
        write_json_atomic(self.args.out, self.res)

    def left(self) -> float:
        return self.args.deadline - time.time() if self.args.deadline else float("inf")

    def build(self) -> None:
        t0 = time.perf_counter()
        self.peak = matmul_peak_tflops(self.smoke)
        self.res["our_matmul_tflops"] = self.peak
        if "matmul_bf16_tflops" in self.peer and self.peer_label.startswith("same"):
            self.peak = float(self.peer["matmul_bf16_tflops"])  # the peer's denominator, measured in this run
            self.res["mfu_peak_source"] = "peer matmul_bf16_tflops (same run)"
        else:
            self.res["mfu_peak_source"] = "our matmul measurement"
        self.res["mfu_peak_tflops"] = self.peak
        self.model = build_anima(self.cfg, device=self.device, dtype=self.dtype, seed=0)
        self.model.train()
        self.res["params"] = sum(p.numel() for p in self.model.parameters())
        self.res["build_s"] = time.perf_counter() - t0
        self.save()

    def inputs(self, bs: int):
        g = torch.Generator(device=self.device).manual_seed(bs)
        mk = lambda *s: torch.randn(*s, device=self.device, dtype=self.dtype, generator=g)
        lat = mk(bs, 16, 1, self.latent, self.latent)
        ctx = mk(bs, self.cfg.context_tokens, self.cfg.crossattn_emb_channels)
        t = torch.rand(bs, device=self.device, generator=g).to(self.dtype)
        return lat, t, ctx

    def step(self, lat, t, ctx) -> None:
        out = self.model.denoise(lat, t, ctx)
        out.float().pow(2).mean().backward()

    def measure(self, name: str, bs: int, ckpt: bool, compiled: bool = False) -> dict:
        """Time one configuration; an error (e.g. out of memory) is recorded, not raised."""
        row = {"name": name, "backend": self.model.attention_backend, "batch": bs, "ckpt": ckpt, "compiled": compiled}
        self.res["in_progress"] = {"name": name, "since_unix": time.time()}
        self.save()
        self.model.set_activation_checkpointing(1.0 if ckpt else 0.0)
        _free()
        try:
            lat, t, ctx = self.inputs(bs)
            t0 = time.perf_counter()
            self.step(lat, t, ctx)
            _sync()
            row["first_step_s"] = time.perf_counter() - t0  # includes autotuning / compilation
            warmup, timed = (1, 2) if self.smoke else (WARMUP, TIMED)
            for _ in range(warmup - 1):
                self.step(lat, t, ctx)
            _sync()
            t0 = time.perf_counter()
            for _ in range(timed):
                self.step(lat, t, ctx)
            _sync()
            dt = (time.perf_counter() - t0) / timed
            ips = bs / dt
            row.update(step_s=dt, img_per_s=ips, mfu=ips * self.fpi / (self.peak * 1e12), peak_mem_gb=_peak_gb())
        except Exception as exc:
            oom = isinstance(exc, torch.cuda.OutOfMemoryError)
            row["error"] = "out of memory" if oom else traceback.format_exc()[-800:]
        finally:
            self.model.zero_grad(set_to_none=True)
            lat = t = ctx = None
            _free()
        # the peer compiled only bs4 without checkpointing: a compiled + checkpointed row is set against its eager one
        ref, source = peer_dit(self.peer, self.peer_label, bs, ckpt, compiled and not ckpt)
        if compiled and ckpt and ref:
            source += ", eager (the peer has no compiled checkpointed run)"
        if ref:
            row["peer_img_per_s"], row["peer_source"] = ref.get("img_per_s"), source
            row["peer_peak_mem_gb"] = ref.get("peak_mem_gb")
            if compiled and not ckpt:
                row["peer_compile_s"] = ref.get("compile_s")
            if "img_per_s" in row and ref.get("img_per_s"):
                row["ratio_vs_peer"] = row["img_per_s"] / ref["img_per_s"]
        print(name, {k: v for k, v in row.items() if k != "error"}, row.get("error", "")[:300], flush=True)
        self.res["rows"].append(row)
        self.res.pop("in_progress", None)
        self.save()
        return row

    def eager(self) -> None:
        for backend in self.args.backends.split(","):
            self.model.set_attention_backend(backend)
            if backend == "triton":
                import anima_kernels

                self.res["triton_runs_kernels"] = bool(anima_kernels.triton_available())
            batches = [int(b) for b in self.args.batches.split(",")]
            if backend == "triton" and self.smoke:
                batches = batches[:1]  # the Triton interpreter takes seconds per step even for the tiny model
            for bs in batches:
                for ckpt in (False, True):
                    if self.left() < self.args.min_config_s:
                        self.res.setdefault("skipped", []).append(f"{backend} bs{bs} ckpt{int(ckpt)}: deadline")
                        continue
                    self.measure(f"{backend}_bs{bs}_ckpt{int(ckpt)}", bs, ckpt)

    def compiled(self) -> None:
        """The trainer's ``dist.compile_blocks`` path: ``block.compile()`` on each DiT block, sdpa backend."""
        if self.left() < self.args.min_compile_s:
            self.res.setdefault("skipped", []).append(
                f"compiled: {self.left():.0f} s left < --min-compile-s {self.args.min_compile_s}")
            self.save()
            return
        self.model.set_attention_backend("sdpa")
        for block in self.model.blocks:
            block.compile()
        bs = max(int(b) for b in self.args.batches.split(","))
        for ckpt in (False, True):
            if ckpt and self.left() < 30:  # the checkpointed variant reuses the compiled block graph
                self.res.setdefault("skipped", []).append(f"compiled bs{bs} ckpt{int(ckpt)}: deadline")
                continue
            self.measure(f"compiled_sdpa_bs{bs}_ckpt{int(ckpt)}", bs, ckpt, compiled=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="results JSON (rewritten after every configuration)")
    ap.add_argument("--peer-json", default=None, help="baseline.json of the peer run in this same run")
    ap.add_argument("--stored-peer", default=None, help="an earlier peer baseline.json, used where this run has none")
    ap.add_argument("--backends", default="sdpa,triton")
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    ap.add_argument("--only-compiled", action="store_true", help="only the compiled variant (no eager configs)")
    ap.add_argument("--deadline", type=float, default=float(os.environ.get("STEP_DEADLINE", 0)),
                    help="unix time after which no new configuration starts (default: $STEP_DEADLINE, 0 = none)")
    ap.add_argument("--min-config-s", type=float, default=15.0, help="seconds a configuration needs before deadline")
    ap.add_argument("--min-compile-s", type=float, default=100.0, help="seconds the compiled variant needs")
    ap.add_argument("--smoke", action="store_true", help="tiny model, fp32: exercise the script on CPU")
    args = ap.parse_args(argv)
    if args.smoke:
        args.min_config_s, args.min_compile_s = 1.0, 5.0
        args.batches = ",".join(args.batches.split(",")[:2])
    bench = Bench(args)
    bench.build()
    if not args.only_compiled:
        bench.eager()
    if not args.no_compile:
        try:
            bench.compiled()
        except Exception:
            bench.res["compile_error"] = traceback.format_exc()[-1500:]
            bench.save()
    bench.res["done"] = True
    bench.save()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
