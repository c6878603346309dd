#!/usr/bin/env python
"""Operator benchmark: dense baselines vs our block-sparse kernel vs the full FlashPrefill op (selection + attention).

Causal self-attention, batch 1, 32 query heads / 8 KV heads, head_dim 128, bf16. Per length it times:
  dense     FA3 (vLLM's vllm_flash_attn, fa_version=3), torch SDPA (for context), our kernel with no index;
  mode (a)  our kernel on a synthetic fixed-density index (sinks + local window + uniformly random earlier blocks),
            one list per KV group ("shared") and one per query head ("per_head");
  mode (b)  flash_prefill_varlen_func on structured_qkv inputs at the default alpha: whole op, selection alone,
            the density it chose, and the output's rel-L2 error against dense attention.
Rates are dense-equivalent TFLOP/s (2 * L^2 * D * Hq for every method); "effective" rates scale them by the density.
``--paged`` also times K/V read from a paged cache (vLLM layout, shuffled 16-slot pages) against packed K/V, for the
last 8K-token chunk of a 32K prompt: the sparse kernel (fixed-density index), the dense kernel and selection.

    PYTHONPATH=. python benchmarks/bench_op.py [--lengths 4096,8192] [--modes a,b] [--sweep] [--paged] [--tag x]
    PYTHONPATH=. python benchmarks/bench_op.py --dry-run       # tiny shapes, short timing; runs on CPU too
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import triton
from tqdm import tqdm

from flashprefill_vllm.config import FlashPrefillConfig
from flashprefill_vllm.ops import configs
from flashprefill_vllm.ops.interface import (block_sparse_attn_varlen_func, flash_prefill_block_index,
                                             flash_prefill_varlen_func)
from flashprefill_vllm.ops.index import pool_keys
from flashprefill_vllm.synthetic import structured_qkv, to_paged
from flashprefill_vllm.ops.block_sparse_index import BlockSparseIndex, block_density
from flashprefill_vllm.ops.utils import cdiv
from flashprefill_vllm.eval.plotting import pyplot

REPO = Path(__file__).resolve().parents[1]

HQ, HKV, D, BS, DTYPE = 32, 8, 128, 128, torch.bfloat16
DEFAULT_LENGTHS = [4096, 8192, 16384, 32768, 65536, 131072, 262144]
DRY_RUN_LENGTHS = [256, 1024]
# Densities the selection reaches on long real prompts; mode (a) replays them with a random layout.
TARGET_DENSITY = {4096: 0.70, 8192: 0.46, 16384: 0.29, 32768: 0.176, 65536: 0.10, 131072: 0.045, 262144: 0.023}
GOAL_SPEEDUP = {4096: 1.0, 8192: 1.8, 16384: 3.0, 32768: 5.0, 65536: 8.0, 131072: 14.0, 262144: 25.0}
SDPA_MAX_LEN = 65536   # past this SDPA is slow or out of memory, and FA3 is the baseline anyway
SWEEP_LEN = 32768
SWEEP_LAUNCHES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3)]
POLICIES = ("shared", "per_head")
# (prompt length, chunk): the last chunk of the prompt over the paged cache; 16384 is vLLM's LLM() chunk on an H100.
PAGED_CASES, PAGE_SIZE = [(32768, 8192), (131072, 16384)], 16


@dataclasses.dataclass
class Timer:
    """Median of per-call timings (CUDA events; wall clock on CPU), the rep count adapted to a time budget."""
    device: torch.device
    warmup: int = 3          # the first call compiles the Triton kernels
    budget_s: float = 1.0
    min_reps: int = 3
    max_reps: int = 50

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def once(self, fn) -> float:
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        self.sync()
        times: list[float] = []
        # Cheap calls get many reps (a stable median); slow ones stop at min_reps once the budget is spent.
        while len(times) < self.min_reps or (sum(times) < self.budget_s * 1e3 and len(times) < self.max_reps):
            times.append(self.once(fn))
        self.sync()
        return statistics.median(times)


def _err(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def _free(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(timer: Timer, fn, flops: float, density: float | None = None) -> dict:
    """Time ``fn``; a failure (OOM, compile error, missing kernel) becomes a null record carrying the reason."""
    rec = {} if density is None else {"density": density}
    try:
        ms = timer(fn)
    except Exception as e:  # noqa: BLE001 - one failed method must not end the whole run
        _free(timer.device)
        return {"ms": None, "error": _err(e), **rec}
    rec.update(ms=ms, tflops_equiv=flops / ms / 1e9)
    if density is not None:
        rec["tflops_effective"] = flops * density / ms / 1e9
    return rec


def target_density(L: int) -> float:
    """The table's value; between its lengths a log-log interpolation, clamped to its ends outside them."""
    xs = sorted(TARGET_DENSITY)
    return float(np.exp(np.interp(np.log(L), np.log(xs), np.log([TARGET_DENSITY[x] for x in xs]))))


def fixed_density_index(num_index_heads: int, L: int, density: float, heads_per_index: int,
                        device: torch.device, seed: int = 0) -> BlockSparseIndex:
    """Sinks + local window + random earlier blocks, sized so the index keeps ``density`` of the causal cells.

    Extras are spread over rows in proportion to each row's free candidates, with cumulative rounding so the total
    is exact; within a row they are the top-k of random scores, i.e. a uniform draw without replacement.
    """
    base = FlashPrefillConfig()
    nb = cdiv(L, BS)
    i = torch.arange(nb, device=device)[:, None]
    j = torch.arange(nb, device=device)[None, :]
    causal = j <= i
    forced = causal & ((j < base.num_sink_blocks) | (j > i - base.num_local_blocks))
    cand = causal & ~forced
    n_cand = cand.sum(1)
    extra_total = min(max(round(density * nb * (nb + 1) / 2) - int(forced.sum()), 0), int(n_cand.sum()))
    cum = (n_cand.cumsum(0).double() * (extra_total / max(int(n_cand.sum()), 1))).round().long()
    extras = cum - torch.cat([cum.new_zeros(1), cum[:-1]])   # <= n_cand per row, sums to extra_total
    kmax = int(extras.max()) if nb else 0
    take = torch.arange(kmax, device=device)[None, :] < extras[:, None]
    gen = torch.Generator(device=device).manual_seed(seed)
    counts, ids = [], []
    for _ in range(num_index_heads):   # one head at a time: a 256K head alone is 2048 x 2048 cells
        score = torch.where(cand, torch.rand(nb, nb, generator=gen, device=device), -1.0)
        picked = torch.zeros(nb, nb, dtype=torch.bool, device=device)
        picked.scatter_(1, score.topk(kmax, dim=1).indices, take)
        keep = forced | picked
        # Left-pack ascending: kept ids sort ahead of the (offset) dropped ones; the tail is scratch.
        counts.append(keep.sum(1).int())
        ids.append(torch.where(keep, j, j + nb).sort(dim=1).values.clamp_(max=nb - 1).int())
    return BlockSparseIndex(torch.stack(counts)[:, None].contiguous(), torch.stack(ids)[:, None].contiguous(),
                            BS, heads_per_index)


def load_fa3():
    """(FA3 function or None, why not, vLLM version or None)."""
    try:
        from importlib.metadata import version
        from vllm.vllm_flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func, None, version("vllm")
    except Exception as e:  # noqa: BLE001 - ImportError, or a CUDA extension that fails to load
        return None, f"vllm.vllm_flash_attn not importable ({_err(e)})", None


def rel_l2(out: torch.Tensor, ref: torch.Tensor, chunk: int = 16384) -> float:
    """||out - ref|| / ||ref|| in fp32, chunked so a 256K output never needs a full fp32 copy."""
    num = den = 0.0
    for s in range(0, out.shape[0], chunk):
        r = ref[s:s + chunk].float()
        num += (out[s:s + chunk].float() - r).square().sum().item()
        den += r.square().sum().item()
    return math.sqrt(num / den) if den > 0 else float("nan")


def make_inputs(L: int, device: torch.device, structured: bool):
    if structured:   # built on the CPU by synthetic.py and moved: once per length, its time reported
        return structured_qkv([L], HQ, HKV, D, dtype=DTYPE, device=device)
    q = torch.randn(L, HQ, D, dtype=DTYPE, device=device)
    k, v = (torch.randn(L, HKV, D, dtype=DTYPE, device=device) for _ in range(2))
    return q, k, v, torch.tensor([0, L], dtype=torch.int32, device=device)


def bench_length(L: int, modes: set[str], timer: Timer, fa3, fa3_err: str | None) -> dict:
    dev, flops, scale = timer.device, 2.0 * L * L * D * HQ, D ** -0.5
    rec: dict = {"length": L, "flops": flops}
    t0 = time.perf_counter()
    # Mode (b) needs structured inputs; the other timings do not depend on values, so they share them.
    q, k, v, cu = make_inputs(L, dev, structured="b" in modes)
    timer.sync()
    rec["gen_s"] = time.perf_counter() - t0
    ref, rec["reference"] = None, None   # a dense output on these inputs, for the full op's error

    dense = rec["dense"] = {}
    if fa3 is None or dev.type != "cuda":
        dense["fa3"] = {"ms": None, "error": fa3_err or "no CUDA device"}
    else:
        o_fa3 = torch.empty_like(q)
        dense["fa3"] = measure(timer, lambda: fa3(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=L,
                                                  max_seqlen_k=L, softmax_scale=scale, causal=True, out=o_fa3,
                                                  fa_version=3), flops)
        if dense["fa3"]["ms"] is not None:
            ref, rec["reference"] = o_fa3, "fa3"
    if dev.type != "cuda" or L > SDPA_MAX_LEN:
        dense["sdpa"] = {"ms": None, "error": f"skipped ({'CPU' if dev.type != 'cuda' else f'L > {SDPA_MAX_LEN}'})"}
    else:
        try:
            qs, ks, vs = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))   # (1, H, L, D)
            sdpa = torch.nn.functional.scaled_dot_product_attention
            dense["sdpa"] = measure(timer, lambda: sdpa(qs, ks, vs, is_causal=True, enable_gqa=True), flops)
            del qs, ks, vs
        except Exception as e:  # noqa: BLE001 - the layout copies themselves may not fit
            dense["sdpa"] = {"ms": None, "error": _err(e)}
        _free(dev)
    o_dense = torch.empty_like(q)
    dense["ours_dense"] = measure(
        timer, lambda: block_sparse_attn_varlen_func(q, k, v, None, cu, cu, L, L, scale, out=o_dense), flops)
    if ref is None and dense["ours_dense"]["ms"] is not None:
        ref, rec["reference"] = o_dense, "ours_dense"
    del o_dense

    if "a" in modes:
        fixed = rec["fixed"] = {"target_density": target_density(L)}
        for name, hpi in zip(POLICIES, (HQ // HKV, 1)):
            try:
                index = fixed_density_index(HQ // hpi, L, fixed["target_density"], hpi, dev)
                dens, o = block_density(index, cu, cu), torch.empty_like(q)
            except Exception as e:  # noqa: BLE001
                fixed[name] = {"ms": None, "error": f"index build failed: {_err(e)}"}
            else:
                fixed[name] = measure(
                    timer, lambda: block_sparse_attn_varlen_func(q, k, v, index, cu, cu, L, L, scale, out=o), flops,
                    dens)
                del index, o
            _free(dev)

    if "b" in modes:
        full = rec["full_op"] = {"alpha": FlashPrefillConfig().alpha}
        for name, shared in zip(POLICIES, (True, False)):
            cfg = FlashPrefillConfig(min_sparse_len=0, gqa_shared_index=shared)
            o = torch.empty_like(q)
            try:   # one untimed call for what the op chose and how close its output lands
                _, index = flash_prefill_varlen_func(q, k, v, cu, cu, L, L, scale, config=cfg, out=o,
                                                     return_index=True)
                dens, err = block_density(index, cu, cu), (rel_l2(o, ref) if ref is not None else None)
                del index
            except Exception as e:  # noqa: BLE001
                full[name] = {"ms": None, "error": _err(e)}
            else:
                full[name] = measure(
                    timer, lambda: flash_prefill_varlen_func(q, k, v, cu, cu, L, L, scale, config=cfg, out=o), flops,
                    dens)
                sel = measure(timer, lambda: flash_prefill_block_index(q, k, cu, cu, L, L, scale, config=cfg), flops)
                full[name].update(select_ms=sel["ms"], rel_l2=err, **({"select_error": sel["error"]}
                                                                      if sel["ms"] is None else {}))
            del o
            _free(dev)

    # Speedups only against FA3: our own dense kernel is a comparison point, not the baseline.
    fa3_ms = dense["fa3"]["ms"]
    for group in (dense, rec.get("fixed", {}), rec.get("full_op", {})):
        for m in (m for m in group.values() if isinstance(m, dict)):
            m["speedup_vs_fa3"] = fa3_ms / m["ms"] if fa3_ms and m["ms"] else None
            if "select_ms" in m:
                m["select_share_of_fa3"] = m["select_ms"] / fa3_ms if fa3_ms and m["select_ms"] else None
    del q, k, v, cu, ref
    _free(dev)
    return rec


def sweep_configs(timer: Timer, L: int = SWEEP_LEN, density: float = TARGET_DENSITY[SWEEP_LEN]) -> list[dict]:
    """Attention-kernel time per launch config (sparse with a shared index, and dense), patched in for head_dim 128."""
    dev, flops, scale = timer.device, 2.0 * L * L * D * HQ, D ** -0.5
    q, k, v, cu = make_inputs(L, dev, structured=False)   # kernel time does not depend on the values
    index = fixed_density_index(HKV, L, density, HQ // HKV, dev)
    dens, o = block_density(index, cu, cu), torch.empty_like(q)
    saved, rows = configs._ATTN[D], []
    try:
        for bm, bn, warps, stages in SWEEP_LAUNCHES:
            configs._ATTN[D] = configs.AttnLaunch(bm, bn, warps, stages)
            sp = measure(timer, lambda: block_sparse_attn_varlen_func(q, k, v, index, cu, cu, L, L, scale, out=o),
                         flops, dens)
            dn = measure(timer, lambda: block_sparse_attn_varlen_func(q, k, v, None, cu, cu, L, L, scale, out=o), flops)
            rows.append({"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages, "length": L,
                         "sparse": sp, "dense": dn})
            print(f"  {bm:>3}x{bn:<3} warps {warps} stages {stages}: sparse {_f(sp['ms'])} ms "
                  f"({_f(sp.get('tflops_effective'), 1)} TF/s eff)  dense {_f(dn['ms'])} ms "
                  f"({_f(dn.get('tflops_equiv'), 1)} TF/s)  {sp.get('error', '')}", flush=True)
    finally:
        configs._ATTN[D] = saved
    return rows


def bench_paged(timer: Timer, L: int, chunk: int, page_size: int = PAGE_SIZE) -> dict:
    """The last ``chunk`` queries of an ``L``-token prompt over packed vs paged K/V: kernel times and their ratio;
    and ``pool_context``: mean-pooling the keys of the ``L - chunk`` cached tokens, the part of the selection that
    re-reads the cached context at every chunk (what caching pooled keys across chunks would save)."""
    dev, scale, ctx = timer.device, D ** -0.5, L - chunk
    flops = 4.0 * chunk * (ctx + chunk / 2) * D * HQ   # causal: the chunk sees ctx + row keys
    q, k, v, cu = make_inputs(L, dev, structured=False)   # kernel time does not depend on the values
    q = q[ctx:]
    kc, vc, bt, used = to_paged(k, v, cu, page_size)
    cu_q = torch.tensor([0, chunk], dtype=torch.int32, device=dev)
    # The chunk's rows of a whole-prompt fixed-density index (the chunk starts on a block boundary).
    full = fixed_density_index(HKV, L, target_density(L), HQ // HKV, dev)
    nq = cdiv(chunk, BS)
    index = BlockSparseIndex(full.block_count[:, :, -nq:].contiguous(), full.block_index[:, :, -nq:].contiguous(), BS,
                             full.heads_per_index)
    dens = block_density(index, cu_q, cu)
    kv = {"packed": (k, v, cu, {}), "paged": (kc, vc, None, dict(block_table=bt, seqused_k=used))}
    ctx_kv = {"packed": (k, torch.tensor([0, ctx], dtype=torch.int32, device=dev), {}),
              "paged": (kc, None, dict(block_table=bt, seqused_k=torch.full_like(used, ctx)))}
    o = torch.empty_like(q)
    rec = {"context": L, "chunk": chunk, "page_size": page_size, "density": dens}
    for name, (kk, vv, cu_k, paged) in kv.items():
        rec[name] = {
            "sparse": measure(timer, lambda: block_sparse_attn_varlen_func(q, kk, vv, index, cu_q, cu_k, chunk, L,
                                                                           scale, out=o, **paged), flops, dens),
            "dense": measure(timer, lambda: block_sparse_attn_varlen_func(q, kk, vv, None, cu_q, cu_k, chunk, L,
                                                                          scale, out=o, **paged), flops),
            "select": measure(timer, lambda: flash_prefill_block_index(
                q, kk, cu_q, cu_k, chunk, L, scale, block_size=BS, gqa_shared_index=True, **paged), flops),
            "pool_context": measure(timer, lambda: pool_keys(ctx_kv[name][0], ctx_kv[name][1], ctx, BS,
                                                             **ctx_kv[name][2]), 0.0),
        }
        rec[name]["pool_context_share_of_sparse"] = _ratio(rec[name]["pool_context"]["ms"],
                                                            rec[name]["sparse"]["ms"])
    for kind in ("sparse", "dense", "select", "pool_context"):
        a, b = rec["packed"][kind]["ms"], rec["paged"][kind]["ms"]
        rec[f"{kind}_paged_over_packed"] = _ratio(b, a)
        print(f"  {kind:>6}: packed {_f(a, 3)} ms  paged {_f(b, 3)} ms  ratio {_f(rec[f'{kind}_paged_over_packed'], 3)}"
              f"  {rec['paged'][kind].get('error', '')}", flush=True)
    del q, k, v, kc, vc, o, full, index
    _free(dev)
    return rec


def _ratio(a, b):
    return a / b if a and b else None


def _f(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


# (title, record group, column headers, (field, decimals) per column after L and policy)
TABLES = [
    ("Dense", "dense", ["ms", "TF/s", "vs FA3"], [("ms", 2), ("tflops_equiv", 1), ("speedup_vs_fa3", 2)]),
    ("Mode (a) fixed density: sparse kernel (TF/s eq = dense-equivalent, eff = per computed block)", "fixed",
     ["density", "ms", "TF/s eq", "TF/s eff", "speedup"],
     [("density", 3), ("ms", 2), ("tflops_equiv", 1), ("tflops_effective", 1), ("speedup_vs_fa3", 2)]),
    ("Mode (b) full op (selection + attention), structured inputs", "full_op",
     ["density", "ms", "select ms", "sel/FA3", "TF/s eq", "speedup", "rel-L2"],
     [("density", 3), ("ms", 2), ("select_ms", 2), ("select_share_of_fa3", 3), ("tflops_equiv", 1),
      ("speedup_vs_fa3", 2), ("rel_l2", 4)]),
]


def print_tables(records: list[dict]):
    for title, group, headers, fields in TABLES:
        if not any(group in r for r in records):
            continue
        print(f"\n{title}\n" + "  ".join(f"{h:>10}" for h in ["L", "method", *headers]))
        for r in records:
            for name, x in r.get(group, {}).items():
                if isinstance(x, dict):
                    cells = [r["length"], name] + [_f(x.get(f), nd) for f, nd in fields]
                    print("  ".join(f"{c:>10}" for c in cells) + (f"  ({x['error']})" if x.get("error") else ""))
    gen = [f"{r['length']}: {r['gen_s']:.1f} s" for r in records if "gen_s" in r]
    if gen:
        print("\ninput generation: " + ", ".join(gen))


def write_plot(records: list[dict], path: Path):
    plt = pyplot()
    if plt is None:
        return
    series = {"FA3": ("dense", "fa3"), "SDPA": ("dense", "sdpa"), "ours dense": ("dense", "ours_dense"),
              "(a) fixed density, shared": ("fixed", "shared"), "(a) fixed density, per head": ("fixed", "per_head"),
              "(b) full op, shared": ("full_op", "shared"), "(b) full op, per head": ("full_op", "per_head")}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for n, (label, (group, name)) in enumerate(series.items()):
        for ax, key in ((left, "ms"), (right, "speedup_vs_fa3")):
            pts = [(r["length"], r[group][name][key]) for r in records
                   if (r.get(group, {}).get(name) or {}).get(key) is not None]
            if pts and not (ax is right and group == "dense"):   # one colour per series across both panels
                ax.plot(*zip(*pts), marker="o", color=f"C{n}", ls="--" if "per head" in label else "-", label=label)
    goal = [(L, s) for L, s in GOAL_SPEEDUP.items() if any(r["length"] == L for r in records)]
    if goal:
        right.plot(*zip(*goal), "k*:", ms=10, label="goal")
    left.set(ylabel="ms", title="Latency, causal, batch 1 (32/8 heads, D 128, bf16)")
    right.set(ylabel="speedup vs FA3", title="Speedup vs dense FA3")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:   # the speedup panel is empty without FA3
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", help="comma-separated sequence lengths (default 4K..256K; dry run 256,1024)")
    p.add_argument("--out-dir", help="where the JSON and PNG go (default benchmarks/results; dry run: a temp dir)")
    p.add_argument("--modes", default="a,b", help="a = fixed-density kernel, b = full op (default a,b)")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--sweep", action="store_true", help=f"also time attention launch configs at L={SWEEP_LEN}")
    p.add_argument("--paged", action="store_true",
                   help="also time paged vs packed K/V, the last chunk of a prompt (" +
                        ", ".join(f"{c} of {L} tokens" for L, c in PAGED_CASES) +
                        f"; {PAGE_SIZE}-slot pages), and the pooling of its cached context")
    p.add_argument("--dry-run", action="store_true", help="tiny lengths, short timing; runs without a GPU")
    args = p.parse_args(argv)

    modes = {m.strip() for m in args.modes.split(",") if m.strip()}
    if not modes <= {"a", "b"}:
        p.error(f"--modes takes a and/or b; got {args.modes!r}")
    lengths = ([int(x) for x in args.lengths.split(",")] if args.lengths
               else DRY_RUN_LENGTHS if args.dry_run else DEFAULT_LENGTHS)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.dry_run:
        p.error("no CUDA device: use --dry-run for a CPU smoke test")
    timer = Timer(dev, warmup=1, budget_s=0.05) if args.dry_run else Timer(dev)
    # A dry run is a smoke test: unless told otherwise it keeps its files out of the results folder.
    out_dir = Path(args.out_dir) if args.out_dir else (Path(tempfile.mkdtemp(prefix="bench_op_")) if args.dry_run
                                                       else REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") + (f"-{args.tag}" if args.tag else "")

    fa3, fa3_err, vllm_version = load_fa3()
    print(f"device {device_name} | torch {torch.__version__} | triton {triton.__version__} | vllm {vllm_version} | "
          f"FA3 {'ok' if fa3 else fa3_err} | TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")

    records: list[dict] = []
    result = {
        "device": device_name, "torch": torch.__version__, "triton": triton.__version__, "vllm": vllm_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"batch": 1, "num_heads": HQ, "num_kv_heads": HKV, "head_dim": D, "dtype": str(DTYPE),
                   "causal": True, "block_size": BS, "lengths": lengths, "modes": sorted(modes),
                   "full_op_config": dataclasses.asdict(FlashPrefillConfig(min_sparse_len=0)),
                   "attn_launch": configs._ATTN[D]._asdict(), "target_density": TARGET_DENSITY,
                   "goal_speedup": GOAL_SPEEDUP, "fa3": "vllm_flash_attn fa_version=3" if fa3 else fa3_err,
                   "sdpa_max_len": SDPA_MAX_LEN, "dry_run": args.dry_run,
                   "timing": {"warmup": timer.warmup, "budget_s": timer.budget_s, "min_reps": timer.min_reps,
                              "max_reps": timer.max_reps, "statistic": "median"},
                   "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
                   "flops": "2 * L^2 * head_dim * num_heads (dense causal) for every method"},
        "results": records,
    }
    json_path = out_dir / f"bench_op_{slug}.json"
    for L in tqdm(lengths, desc="bench_op", unit="length"):
        tqdm.write(f"L={L} ...")
        try:
            records.append(bench_length(L, modes, timer, fa3, fa3_err))
        except Exception as e:  # noqa: BLE001 - keep the lengths already measured
            records.append({"length": L, "error": _err(e)})
        _free(dev)
        # Rewritten after every length: a long run that dies late (e.g. a sticky CUDA error) keeps its results.
        json_path.write_text(json.dumps(result, indent=1))
    print_tables(records)
    if args.sweep:
        sweep_len = min(lengths) if args.dry_run else SWEEP_LEN
        print(f"\nLaunch-config sweep at L={sweep_len}, density {TARGET_DENSITY[SWEEP_LEN]} (shared index), and dense")
        result["sweep"] = sweep_configs(timer, sweep_len, TARGET_DENSITY[SWEEP_LEN])
        _free(dev)
    if args.paged:
        result["paged"] = []
        for L, chunk in [(1024, 256)] if args.dry_run else PAGED_CASES:
            print(f"\nPaged vs packed K/V: last {chunk} queries of a {L}-token prompt, {PAGE_SIZE}-slot pages")
            result["paged"].append(bench_paged(timer, L, chunk))
            print(f"  cached-context pooling / sparse attention of the chunk (paged): "
                  f"{_f(result['paged'][-1]['paged']['pool_context_share_of_sparse'], 3)}", flush=True)
    json_path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {json_path}")
    write_plot(records, out_dir / f"bench_op_{slug}.png")


if __name__ == "__main__":
    main()
