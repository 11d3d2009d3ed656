"""Compile every kernel variant for Hopper (sm_90) without a GPU and report its resource usage.

Usage (CPU is fine; TRITON_INTERPRET must be unset)::

    python kernels/bench/aot_check.py [--arch 90] [--quick]

For each kernel and each autotune config at the Anima shapes (bf16; D 128 unmasked for the DiT, D 64 masked for
the adapter; adaLN C 2048), this prints registers per thread, spilled bytes, shared memory and whether the PTX
uses Hopper's wgmma instructions. A variant that fails to compile is reported (the GPU's autotuner would skip it).
This catches GPU-only compile errors and register spills before spending GPU time. It is not a test.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import triton  # noqa: E402
from anima_kernels import adaln, flash, qk_prologue  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _raw(kernel):
    """The ``JITFunction`` under autotune / heuristics wrappers."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def _signature(fn, pointers: dict[str, str], floats: set[str], consts: dict) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]  # strides and sizes at Anima shapes are multiples of 16
    return sig, attrs


def _resources(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", out.replace("\n", " "))
    return f"reg {m[1]:>3} stack {m[2]:>4} local {m[4]:>4}" if m else out.strip()[-120:]


def compile_one(kernel, pointers, floats, consts, num_warps, num_stages, arch) -> str:
    fn = _raw(kernel)
    sig, attrs = _signature(fn, pointers, floats, consts)
    t0 = time.time()
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps,
                                                                        "num_stages": num_stages})
    except Exception as exc:
        return f"FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"
    wgmma = "wgmma" if "wgmma" in k.asm["ptx"] else "mma.sync" if "mma.sync" in k.asm["ptx"] else "no-mma"
    return (f"{_resources(k.asm['cubin'])} smem {k.metadata.shared // 1024:>3} KiB {wgmma:>8} "
            f"({time.time() - t0:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    """Compile and report; returns 1 if any default-config variant fails to compile."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="only the first autotune config of each kernel")
    args = ap.parse_args(argv)
    attn_ptrs = {n: "*bf16" for n in ("Q", "K", "V", "OUT", "DO", "DV")}
    attn_ptrs.update(KMASK="*u8", LSE="*fp32", DELTA="*fp32", DQ="*fp32", DK="*fp32")
    floats = {"qk_scale", "sm_scale", "eps"}
    failed = False
    for kernel, configs in ((flash._attn_fwd_kernel, flash._FWD_CONFIGS),
                            (flash._attn_bwd_dkdv_kernel, flash._DKDV_CONFIGS),
                            (flash._attn_bwd_dq_kernel, flash._DQ_CONFIGS)):
        for D, mask in ((128, False), (64, True)):
            for ci, cfg in enumerate(configs[:1] if args.quick else configs):
                consts = dict(HAS_MASK=mask, MASK_KEYS=mask, DOT_PREC="tf32", BLOCK_D=D, **cfg.kwargs)
                if kernel is flash._attn_bwd_dkdv_kernel:
                    consts["ATOMIC_DQ"] = False
                res = compile_one(kernel, attn_ptrs, floats, consts, cfg.num_warps, cfg.num_stages, args.arch)
                failed |= res.startswith("FAILED") and ci == 0
                print(f"{_raw(kernel).__name__:24} D{D:<3} mask={mask!s:5} {cfg.kwargs} w{cfg.num_warps} "
                      f"s{cfg.num_stages}: {res}", flush=True)
    for D, mask in ((128, False), (64, True)):
        m, n, w, st = flash._ATOMIC_DQ_CONFIG
        consts = dict(HAS_MASK=mask, MASK_KEYS=mask, DOT_PREC="tf32", BLOCK_D=D, ATOMIC_DQ=True, BLOCK_M=m, BLOCK_N=n)
        res = compile_one(flash._attn_bwd_dkdv_atomic_kernel, attn_ptrs, floats, consts, w, st, args.arch)
        failed |= res.startswith("FAILED")
        print(f"{'dkdv + atomic dq':24} D{D:<3} mask={mask!s:5} {flash._ATOMIC_DQ_CONFIG}: {res}", flush=True)
    pro_ptrs = {"X": "*bf16", "W": "*bf16", "COS": "*fp32", "SIN": "*fp32", "Y": "*bf16", "RSTD": "*fp32",
                "DY": "*fp32", "DX": "*bf16", "DW_PARTIAL": "*fp32"}
    for kernel in (qk_prologue._norm_rope_fwd_kernel, qk_prologue._norm_rope_bwd_kernel):
        for D in (128, 64):
            consts = dict(HAS_ROPE=True, BLOCK_R=4096 // D, BLOCK_D=D)
            res = compile_one(kernel, pro_ptrs, floats, consts, qk_prologue.NUM_WARPS, 1, args.arch)
            failed |= res.startswith("FAILED")
            print(f"{_raw(kernel).__name__:24} D{D}: {res}", flush=True)
    ada_ptrs = {n: "*bf16" for n in ("X", "GATE", "Y", "SHIFT", "SCALE", "XNEW", "OUT", "XN", "DH", "DXNEW", "DX",
                                     "DY")}
    ada_ptrs.update(MEAN="*fp32", RSTD="*fp32", DSHIFT_P="*fp32", DSCALE_P="*fp32", DGATE_P="*fp32")
    for kernel, extra in ((adaln._adaln_fwd_kernel, {}), (adaln._adaln_bwd_kernel, {"HAS_DXNEW": True})):
        for has_res in (False, True):
            consts = dict(HAS_RES=has_res, ROWS=16, BLOCK_R=2, BLOCK_C=2048, **extra)
            res = compile_one(kernel, ada_ptrs, floats, consts, 8, 1, args.arch)
            failed |= res.startswith("FAILED")
            print(f"{_raw(kernel).__name__:24} res={has_res!s:5}: {res}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
