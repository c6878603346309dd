"""Run sparse prefill on a structured long input and compare it with dense attention.

On a GPU this runs the Triton kernels and prints time, density and error; without a GPU it runs the plain-torch
reference on the CPU (shorter input) and prints density and error only: speed-ups need a GPU.
"""

import argparse
import time

import torch

from flashprefill_vllm import FlashPrefillConfig, block_density, block_sparse_attn_varlen_func, flash_prefill_varlen_func
from flashprefill_vllm import synthetic


def main():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--length", type=int, default=32768 if cuda else 8192)
    ap.add_argument("--alpha", type=float, default=FlashPrefillConfig.alpha)
    args = ap.parse_args()
    dev = "cuda" if cuda else "cpu"
    hq, hkv, d = (32, 8, 128) if cuda else (4, 1, 64)
    q, k, v, cu = synthetic.structured_qkv([args.length], hq, hkv, d, dtype=torch.bfloat16, device=dev)
    cfg = FlashPrefillConfig(alpha=args.alpha, min_sparse_len=0)
    L = args.length

    def timed(fn):
        if cuda:
            fn()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = fn()
        if cuda:
            torch.cuda.synchronize()
        return res, (time.perf_counter() - t0) * 1e3

    (out, index), t_sparse = timed(lambda: flash_prefill_varlen_func(q, k, v, cu, cu, L, L, config=cfg,
                                                                     return_index=True))
    dense, t_dense = timed(lambda: block_sparse_attn_varlen_func(q, k, v, None, cu, cu, L, L))
    err = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU (plain-torch reference)'}")
    print(f"length {L}, heads {hq}/{hkv}, head_dim {d}, alpha {cfg.alpha}, block {cfg.block_size}")
    print(f"density chosen: {block_density(index, cu, cu):.3f} of causally visible blocks")
    print(f"output error vs dense attention: rel-L2 {err:.4f}")
    if cuda:
        print(f"sparse prefill {t_sparse:.2f} ms vs dense (same Triton kernel, every block) {t_dense:.2f} ms")
    else:
        print("timings are not shown on the CPU: the speed-up needs a GPU (time-to-first-token is a GPU number)")


if __name__ == "__main__":
    main()
