"""The two measurements behind the float32 EoRA path (compressor/eora_float32.py), on this machine:

1. a whole-sequence projection matmul (2048 x 576 @ 576 x 1536, SmolLM2's MLP shape) in float32, bfloat16 and
   float16: where the CPU has no native bf16 (no AVX512-BF16 / AMX) bf16 is emulated and far slower;
2. one projection's EoRA decomposition at the Llama-3.2-1B down_proj shape (out 2048, in 8192, rank 32,
   covariance from 4096 tokens): gptqmodel's eora_compute_lora against edgepack's eigen_scaling +
   lowrank_correction, with the relative difference of their corrections B·A.

    python benchmarks/eora_math.py [--out 2048 --inp 8192 --tokens 4096 --rank 32 --threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, repeats: int = 1) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=int, default=2048)
    ap.add_argument("--inp", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from gptqmodel.eora.eora import eora_compute_lora

    from compressor.eora_float32 import eigen_scaling, lowrank_correction
    from runtime.bench import cpu_name

    print(f"{cpu_name()}, torch {torch.__version__}, {args.threads} threads")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a, b = torch.randn(2048, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        print(f"matmul 2048x576 @ 576x1536 {str(dtype):15s} {1e3 * timed(lambda a=a, b=b: a @ b, 3):8.1f} ms")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.inp, generator=g)
    cov, delta = x.T @ x / args.tokens, torch.randn(args.out, args.inp, generator=g) * 0.01
    t = time.perf_counter()
    a_ref, b_ref = eora_compute_lora(delta, "m", cov, args.rank, torch.float32, torch.device("cpu"))
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    scale = eigen_scaling(cov)
    t_eig = time.perf_counter() - t
    t = time.perf_counter()
    a, b = lowrank_correction(delta, *scale, args.rank)
    t_low = time.perf_counter() - t
    ref = b_ref @ a_ref
    diff = ((b @ a - ref).norm() / ref.norm()).item()
    print(
        f"EoRA decomposition out {args.out} x in {args.inp}, rank {args.rank}, {args.tokens} tokens: "
        f"gptqmodel {t_ref:.1f} s; edgepack {t_eig + t_low:.1f} s (eigen {t_eig:.1f} s + rank-r SVD {t_low:.1f} s); "
        f"relative difference of B·A {diff:.1e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
