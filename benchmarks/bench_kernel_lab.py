#!/usr/bin/env python
"""Kernel lab: per-kept-block throughput of the experimental Hopper sparse-attention variants vs FA3 dense.

Causal self-attention, batch 1, bf16, block_size 128, a per-query-head fixed-density index (bench_op's
``fixed_density_index``: sinks + local window + uniformly random earlier blocks) at densities 0.1 and 0.3, random
q/k/v. Shapes: head_dim 128 with 32 q / 8 kv heads (Llama-8B) and head_dim 64 with 14 q / 2 kv heads. Per length
it times (CUDA events, median): FA3 dense (vLLM's vllm_flash_attn, fa_version=3), the product kernel dense and
sparse (``flashprefill_vllm.ops.attention.sparse_attention``), and every variant of
``benchmarks/kernel_lab/sparse_attn_hopper.py`` (``VARIANTS``). Each variant's output is checked against the
product kernel's (max abs diff, rel-L2); above 2e-2 rel-L2 it is flagged WRONG and its speed is not reported as
valid. A variant that fails to compile or run is recorded with its error and skipped.

Rates: FLOPs = 4 * head_dim * (causal (query, key) position pairs computed), summed over query heads. For a sparse
kernel the pairs are those of the kept blocks ("TF/s per kept block"); FA3 dense counts L(L+1)/2 pairs per head.
The ratio column is a variant's per-kept-block rate over FA3's dense rate. The first call of each kernel (compile
included, with a cold Triton cache unless TRITON_CACHE_DIR is set) is reported as ``first_call_s``.

    PYTHONPATH=. python benchmarks/bench_kernel_lab.py [--lengths 16384,32768,65536] [--out-dir DIR]
    PYTHONPATH=. python benchmarks/bench_kernel_lab.py --dry-run     # tiny shapes, CPU, Triton interpreter, fp16
"""

from __future__ import annotations

import os
import sys
import tempfile

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported
else:
    # A cold cache, so that the first call's time includes the compile (set TRITON_CACHE_DIR to reuse one).
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="kernel_lab_triton_cache_"))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_op import BS, Timer, _err, _free, fixed_density_index, load_fa3, rel_l2  # noqa: E402
from kernel_lab import sparse_attn_hopper as lab  # noqa: E402
from flashprefill_vllm.ops.attention import sparse_attention  # noqa: E402
from flashprefill_vllm.ops.block_sparse_index import BlockSparseIndex, block_density  # noqa: E402
from flashprefill_vllm.eval.plotting import pyplot  # noqa: E402

DEFAULT_LENGTHS = [16384, 32768, 65536]
DENSITIES = [0.1, 0.3]
SHAPES = [(128, 32, 8), (64, 14, 2)]          # (head_dim, q heads, kv heads)
DRY_SHAPES = [(128, 4, 2), (64, 2, 1)]
DRY_LENGTHS = [256, 512]
WRONG_REL_L2 = 2e-2
BUDGET_S = 110.0                               # stop starting new measurements after this (the run must end < 120 s)


def kept_pairs(index: BlockSparseIndex, L: int) -> int:
    """Causal (query, key) position pairs inside the kept blocks, summed over index heads (one sequence, ctx 0)."""
    cnt, ids = index.block_count[:, 0].long(), index.block_index[:, 0].long()     # (H, nq), (H, nq, nk)
    nq, nk = ids.shape[1], ids.shape[2]
    valid = torch.arange(nk, device=ids.device)[None, None, :] < cnt[..., None]
    i = torch.arange(nq, device=ids.device)[None, :, None]
    rows = (torch.clamp(L - i * BS, max=BS))                                         # rows of query block i
    # Off-diagonal block: rows * BS pairs; diagonal: rows * (rows + 1) / 2 (L is a multiple of BS here).
    pairs = torch.where(ids < i, rows * BS, torch.where(ids == i, rows * (rows + 1) // 2, 0))
    return int((pairs * valid).sum())


class Run:
    """Shared state: timer, records, the time budget, and whether the CUDA context is still usable."""

    def __init__(self, dev: torch.device, timer: Timer, budget_s: float):
        self.dev, self.timer, self.budget_s, self.t0 = dev, timer, budget_s, time.perf_counter()
        self.dead: str | None = None

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.budget_s

    def skip_reason(self) -> str | None:
        if self.dead:
            return f"skipped: CUDA context unusable after an earlier error ({self.dead})"
        if self.over_budget():
            return f"skipped: time budget ({self.budget_s:.0f} s) spent"
        return None

    def check_context(self, e: BaseException):
        if self.dev.type != "cuda":
            return
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - a sticky error (illegal address, ...): nothing later can run
            self.dead = _err(e)

    def first_call(self, fn) -> float:
        t0 = time.perf_counter()
        fn()
        self.timer.sync()
        return time.perf_counter() - t0

    def time(self, fn, flops: float | None) -> dict:
        reason = self.skip_reason()
        if reason:
            return {"ms": None, "error": reason}
        try:
            ms = self.timer(fn)
        except Exception as e:  # noqa: BLE001
            self.check_context(e)
            _free(self.dev)
            return {"ms": None, "error": _err(e)}
        return {"ms": ms, "tflops": flops / ms / 1e9 if flops else None}


def _f(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def bench_head_dim(run: Run, d: int, hq: int, hkv: int, lengths: list[int], dtype, fa3, fa3_err) -> dict:
    dev, scale = run.dev, d ** -0.5
    rec: dict = {"head_dim": d, "num_heads": hq, "num_kv_heads": hkv, "lengths": {}, "variants": {}}
    cases = {}    # L -> inputs, indexes, reference outputs
    for L in lengths:
        if run.skip_reason():
            rec["lengths"][str(L)] = {"error": run.skip_reason()}
            continue
        lrec = rec["lengths"][str(L)] = {"dense_flops": 4.0 * d * hq * L * (L + 1) / 2}
        torch.manual_seed(L + d)
        q = torch.randn(L, hq, d, dtype=dtype, device=dev)
        k, v = (torch.randn(L, hkv, d, dtype=dtype, device=dev) for _ in range(2))
        cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
        # FA3 dense
        if fa3 is None or dev.type != "cuda":
            lrec["fa3"] = {"ms": None, "error": fa3_err or "no CUDA device"}
        else:
            o = torch.empty_like(q)
            fn = lambda: fa3(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=L, max_seqlen_k=L,  # noqa
                             softmax_scale=scale, causal=True, out=o, fa_version=3)
            lrec["fa3"] = run.time(fn, lrec["dense_flops"])
            del o
        # The product kernel, dense (no index): context for "our kernel run dense".
        o = torch.empty_like(q)
        lrec["current_dense"] = run.time(
            lambda: sparse_attention(q, k, v, None, cu, cu, L, scale, o, None, BS), lrec["dense_flops"])
        del o
        fa3_tf = lrec["fa3"].get("tflops")
        print(f"D{d} L={L:>6} {'dense':>9} {'FA3':<18} {_f(lrec['fa3']['ms'], 3):>8} ms "
              f"{_f(fa3_tf, 1):>6} TF/s   {lrec['fa3'].get('error', '')}", flush=True)
        cd = lrec["current_dense"]
        print(f"D{d} L={L:>6} {'dense':>9} {'current_kernel':<18} {_f(cd['ms'], 3):>8} ms "
              f"{_f(cd.get('tflops'), 1):>6} TF/s   {_ratio_str(cd.get('tflops'), fa3_tf)} {cd.get('error', '')}",
              flush=True)
        lrec["sparse"] = {}
        for dens in DENSITIES:
            if run.skip_reason():
                lrec["sparse"][str(dens)] = {"error": run.skip_reason()}
                continue
            index = fixed_density_index(hq, L, dens, 1, dev)      # one list per query head
            drec = lrec["sparse"][str(dens)] = {"density": block_density(index, cu, cu),
                                                "kept_flops": 4.0 * d * kept_pairs(index, L)}
            ref = torch.empty_like(q)
            fn = lambda: sparse_attention(q, k, v, index, cu, cu, L, scale, ref, None, BS)  # noqa: E731
            try:
                if L == lengths[0] and dens == DENSITIES[0]:
                    rec["current_first_call_s"] = run.first_call(fn)
                fn()
                run.timer.sync()
            except Exception as e:  # noqa: BLE001
                run.check_context(e)
                drec["current"] = {"ms": None, "error": _err(e)}
                ref = None
            else:
                drec["current"] = run.time(fn, drec["kept_flops"])
            cur = drec["current"]
            cur["ratio_to_fa3"] = _ratio(cur.get("tflops"), fa3_tf)
            print(f"D{d} L={L:>6} dens {dens:<4} {'current_kernel':<18} {_f(cur['ms'], 3):>8} ms "
                  f"{_f(cur.get('tflops'), 1):>6} TF/s/kept {_ratio_str(cur.get('tflops'), fa3_tf)} "
                  f"(density {drec['density']:.3f}) {cur.get('error', '')}", flush=True)
            cases[(L, dens)] = (q, k, v, cu, index, ref, drec, fa3_tf)
        _free(dev)

    # Variants last, one at a time over every case: a variant that breaks the CUDA context costs only those after it.
    for var in lab.VARIANTS[d]:
        vrec = rec["variants"][var.name] = {"config": var._asdict(), "cases": {}}
        first = True
        for (L, dens), (q, k, v, cu, index, ref, drec, fa3_tf) in cases.items():
            key = f"{L}/{dens}"
            reason = run.skip_reason()
            if reason:
                vrec["cases"][key] = {"ms": None, "error": reason}
                continue
            if "compile_error" in vrec:
                vrec["cases"][key] = {"ms": None, "error": "skipped: " + vrec["compile_error"]}
                continue
            out = torch.zeros_like(q)
            fn = lambda: lab.sparse_attention_hopper(q, k, v, index, cu, cu, L, scale, out, BS, var)  # noqa: E731
            try:
                if first:
                    vrec["first_call_s"] = run.first_call(fn)
                    first = False
                    print(f"D{d} {var.name:<18} first call (compile + run, L={L}) {vrec['first_call_s']:.2f} s",
                          flush=True)
                else:
                    fn()
                    run.timer.sync()
            except Exception as e:  # noqa: BLE001
                run.check_context(e)
                vrec["compile_error" if first else "error"] = _err(e)
                vrec["cases"][key] = {"ms": None, "error": _err(e)}
                print(f"D{d} L={L:>6} dens {dens:<4} {var.name:<18} FAILED: {_err(e)}", flush=True)
                _free(dev)
                continue
            c = {}
            if ref is not None:
                c["max_abs"] = (out.float() - ref.float()).abs().max().item()
                c["rel_l2"] = rel_l2(out, ref)
                c["valid"] = bool(c["rel_l2"] <= WRONG_REL_L2)     # NaN is not valid
            else:
                c["valid"] = None
            t = run.time(fn, drec["kept_flops"])
            if c["valid"] is False:
                c.update(ms_unvalidated=t["ms"], ms=None, tflops=None, error="WRONG output")
            else:
                c.update(t)
            c["ratio_to_fa3"] = _ratio(c.get("tflops"), fa3_tf)
            c["speedup_vs_current"] = _ratio(drec["current"].get("ms"), c.get("ms"))
            vrec["cases"][key] = c
            print(f"D{d} L={L:>6} dens {dens:<4} {var.name:<18} {_f(c.get('ms'), 3):>8} ms "
                  f"{_f(c.get('tflops'), 1):>6} TF/s/kept {_ratio_str(c.get('tflops'), fa3_tf)} "
                  f"x{_f(c['speedup_vs_current'])} vs current  rel-L2 {_f(c.get('rel_l2'), 5)} "
                  f"max|d| {_f(c.get('max_abs'), 4)}"
                  + ("  WRONG" if c["valid"] is False else "") + (f"  {t['error']}" if t.get("error") else ""),
                  flush=True)
            del out
    del cases
    _free(dev)
    return rec


def _ratio(a, b):
    return a / b if a and b else None


def _ratio_str(a, b) -> str:
    r = _ratio(a, b)
    return f"({r:.2f}x FA3)" if r is not None else "(- x FA3)"


def write_plot(result: dict, path: Path):
    plt = pyplot()
    if plt is None:
        return
    recs = result["results"]
    fig, axes = plt.subplots(len(recs), len(DENSITIES), figsize=(6.5 * len(DENSITIES), 4.5 * len(recs)),
                             squeeze=False)
    for row, rec in zip(axes, recs):
        lengths = sorted(int(L) for L, x in rec["lengths"].items() if "sparse" in x)
        for ax, dens in zip(row, DENSITIES):
            fa3 = [(L, rec["lengths"][str(L)]["fa3"].get("tflops")) for L in lengths]
            fa3 = [p for p in fa3 if p[1]]
            if fa3:
                ax.plot(*zip(*fa3), "k--", lw=2, label="FA3 dense")
            cur = [(L, rec["lengths"][str(L)]["sparse"].get(str(dens), {}).get("current", {}).get("tflops"))
                   for L in lengths]
            cur = [p for p in cur if p[1]]
            if cur:
                ax.plot(*zip(*cur), "k-o", lw=2, label="current kernel")
            for n, (name, v) in enumerate(rec["variants"].items()):
                pts = [(L, v["cases"].get(f"{L}/{dens}", {}).get("tflops")) for L in lengths]
                pts = [p for p in pts if p[1]]
                if pts:
                    ax.plot(*zip(*pts), marker=".", color=f"C{n % 10}", ls="-" if n < 10 else ":", label=name)
            ax.set(xscale="log", xlabel="sequence length", ylabel="TF/s per kept block (FA3: dense)",
                   title=f"D{rec['head_dim']} ({rec['num_heads']}/{rec['num_kv_heads']} heads), density {dens}")
            ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle(f"kernel lab: {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def summary(result: dict):
    print("\nSummary: best valid variant per (head_dim, length, density) vs the current kernel and FA3 dense")
    for rec in result["results"]:
        for L, lrec in rec["lengths"].items():
            for dens, drec in lrec.get("sparse", {}).items():
                key = f"{L}/{dens}"
                best = max(((n, v["cases"].get(key, {})) for n, v in rec["variants"].items()
                            if v["cases"].get(key, {}).get("tflops")), key=lambda x: x[1]["tflops"], default=None)
                cur = drec.get("current", {}) if isinstance(drec, dict) else {}
                fa3 = lrec.get("fa3", {}).get("tflops")
                line = (f"  D{rec['head_dim']} L={L:>6} dens {dens:<4} current {_f(cur.get('tflops'), 1):>6} TF/s/kept"
                        f" {_ratio_str(cur.get('tflops'), fa3)}")
                if best:
                    line += (f" | best {best[0]:<16} {_f(best[1]['tflops'], 1):>6} TF/s/kept "
                             f"{_ratio_str(best[1]['tflops'], fa3)} x{_f(best[1].get('speedup_vs_current'))}")
                print(line)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", help=f"comma-separated (default {','.join(map(str, DEFAULT_LENGTHS))}; "
                                     f"dry run {','.join(map(str, DRY_LENGTHS))})")
    p.add_argument("--out-dir", help="JSON + PNG go here (default benchmarks/results; dry run: a temp dir)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="start no new measurement after this")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    args = p.parse_args(argv)

    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else (DRY_LENGTHS if args.dry_run
                                                                                else DEFAULT_LENGTHS)
    assert all(L % BS == 0 for L in lengths), f"lengths must be multiples of {BS}"
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if dev.type != "cuda" and not args.dry_run:
        p.error("no CUDA device: use --dry-run for a CPU smoke test")
    # The interpreter mishandles bf16 (numpy has none), so a dry run uses fp16; the kernels are dtype-generic.
    dtype = torch.float16 if args.dry_run else torch.bfloat16
    timer = (Timer(dev, warmup=0, budget_s=0.0, min_reps=1, max_reps=1) if args.dry_run
             else Timer(dev, warmup=1, budget_s=0.1, min_reps=3, max_reps=10))
    out_dir = Path(args.out_dir) if args.out_dir else (Path(tempfile.mkdtemp(prefix="bench_kernel_lab_"))
                                                       if args.dry_run else REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    fa3, fa3_err, vllm_version = load_fa3()
    print(f"device {device_name} | torch {torch.__version__} | triton {triton.__version__} | vllm {vllm_version} | "
          f"FA3 {'ok' if fa3 else fa3_err} | TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')} | "
          f"TRITON_CACHE_DIR={os.environ.get('TRITON_CACHE_DIR')}", flush=True)
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    result = {
        "device": device_name, "torch": torch.__version__, "triton": triton.__version__, "vllm": vllm_version,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"batch": 1, "causal": True, "block_size": BS, "dtype": str(dtype), "lengths": lengths,
                   "densities": DENSITIES, "shapes": [dict(head_dim=d, num_heads=hq, num_kv_heads=hkv)
                                                      for d, hq, hkv in shapes],
                   "index": "bench_op.fixed_density_index, one list per query head (heads_per_index=1)",
                   "flops": "4 * head_dim * causal (q, k) pairs computed, summed over query heads; sparse: pairs "
                            "in kept blocks; FA3 / dense: L(L+1)/2 per head",
                   "wrong_if_rel_l2_above": WRONG_REL_L2, "reference_output": "current kernel (same index)",
                   "timing": {"warmup": timer.warmup, "budget_s": timer.budget_s, "min_reps": timer.min_reps,
                              "max_reps": timer.max_reps, "statistic": "median, CUDA events"},
                   "dry_run": args.dry_run, "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
                   "variants": {d: [v._asdict() for v in lab.VARIANTS[d]] for d, _, _ in shapes}},
        "results": [],
    }
    json_path = out_dir / f"bench_kernel_lab_{slug}.json"
    run = Run(dev, timer, args.budget_s)
    for d, hq, hkv in shapes:
        try:
            result["results"].append(bench_head_dim(run, d, hq, hkv, lengths, dtype, fa3, fa3_err))
        except Exception as e:  # noqa: BLE001 - keep what the other head_dims measured
            result["results"].append({"head_dim": d, "error": _err(e), "lengths": {}, "variants": {}})
            print(f"D{d}: FAILED {_err(e)}", flush=True)
            run.check_context(e)
        _free(dev)
        json_path.write_text(json.dumps(result, indent=1))
    result["wall_s"] = time.perf_counter() - run.t0
    result["cuda_context_lost"] = run.dead
    json_path.write_text(json.dumps(result, indent=1))
    summary(result)
    print(f"\nwall {result['wall_s']:.1f} s; wrote {json_path}", flush=True)
    write_plot(result, out_dir / f"bench_kernel_lab_{slug}.png")


if __name__ == "__main__":
    main()
