#!/usr/bin/env python
"""FA3 dense vs FA4 (CuTe DSL) dense and block-sparse vs our Triton sparse kernel, same inputs, one process.

Causal self-attention, batch 1, 32 query / 8 KV heads, bf16, head_dim 64 and 128, at the fixed densities of
``bench_op.py`` (``TARGET_DENSITY``, ``fixed_density_index``: sinks + local window + random earlier blocks, 128-token
blocks), with one list per query head ("per_head") and one per KV group ("shared"). Per (head_dim, length, policy):

  fa3            vllm.vllm_flash_attn.flash_attn_varlen_func(fa_version=3), dense causal
  fa4_dense      FA4 forward (vllm.vllm_flash_attn.cute.interface._flash_attn_fwd), dense causal, varlen
  fa4_sparse     the same with block_sparse_tensors from ops/fa4_blocks.py, varlen layout (cu_total_m_blocks)
  fa4_sparse_b   the same, batched layout (q as (1, L, H, D)), which needs no per-sequence offsets
  ours           flashprefill_vllm.ops.block_sparse_attn_varlen_func on the same index

``--chunk-cases`` adds, per head_dim, the shape of a chunked prefill in vLLM: the last ``--chunk`` queries of a
``L``-token sequence over all L keys (bottom-right causal), keys in a paged cache of 16-token pages. "ours_paged"
reads the cache through the block table; "gather" is the copy of the sequence's keys and values out of the
cache into contiguous rows (what an FA4 route would pay, as SM90 FA4 block sparsity takes no page table);
"fa4_sparse_b" runs on those gathered rows. ``paged_probe`` calls FA4 once with ``page_table`` (128-token
pages, shuffled) and block sparsity and records the rel-L2 against the contiguous call.

Reports the median ms, TFLOP/s per computed block (2 * L^2 * D * Hq causal FLOPs times the density), speed-up vs
FA3, each FA4 variant's first-call time (CuTe compile; FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 makes it persistent)
and the rel-L2 of every FA4 output against ours (sparse) or FA3 (dense). FA4 is probed by import; why it is missing
is recorded. Writes ``benchmarks/results/bench_fa4_sparse_<device>.{json,png}``; prints a table last.

    PYTHONPATH=. python benchmarks/bench_fa4_sparse.py [--lengths 8192,16384] [--head-dims 64,128] [--tag x]
    PYTHONPATH=. python benchmarks/bench_fa4_sparse.py --dry-run     # CPU: argument parsing and the index mapping only
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_op import (BS, DTYPE, HKV, HQ, REPO, TARGET_DENSITY, Timer, _err, _free, fixed_density_index,  # noqa: E402
                      load_fa3, measure, rel_l2, target_density)

from flashprefill_vllm.ops.fa4_blocks import fa4_block_sparse, fa4_kept_mask  # noqa: E402
from flashprefill_vllm.ops.interface import block_sparse_attn_varlen_func  # noqa: E402
from flashprefill_vllm.ops.reference import index_to_mask  # noqa: E402
from flashprefill_vllm.ops.block_sparse_index import block_density  # noqa: E402
from flashprefill_vllm.ops.utils import cdiv  # noqa: E402
from flashprefill_vllm.eval.plotting import pyplot  # noqa: E402

DEFAULT_LENGTHS = [8192, 16384, 32768, 65536, 131072]
DRY_RUN_LENGTHS = [256, 1024]
HEAD_DIMS = [64, 128]
POLICIES = {"per_head": 1, "shared": HQ // HKV}   # heads_per_index
METHODS = ("fa3", "fa4_dense", "fa4_sparse", "fa4_sparse_b", "ours")


def load_fa4():
    """(dict of callables or None, why not). Needs vLLM's CuTe FA4 and nvidia-cutlass-dsl (the bundle's optional
    part) and an SM90+ GPU."""
    try:
        from vllm.vllm_flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
        from vllm.vllm_flash_attn.cute.interface import _flash_attn_fwd
    except Exception as e:  # noqa: BLE001 - ImportError (cutlass, quack missing) or a failing module init
        return None, f"vllm.vllm_flash_attn.cute not importable ({_err(e)})"
    info = {"fwd": _flash_attn_fwd, "tensors": BlockSparseTensorsTorch,
            "fwd_params": sorted(inspect.signature(_flash_attn_fwd).parameters)}
    try:   # 0.33+: the public wrapper forwards block_sparse_tensors; 0.26 does not
        from vllm.vllm_flash_attn import flash_attn_varlen_func
        info["public_block_sparse_kwarg"] = "block_sparse_tensors" in inspect.signature(flash_attn_varlen_func).parameters
    except Exception as e:  # noqa: BLE001
        info["public_block_sparse_kwarg"] = f"unknown ({_err(e)})"
    return info, None


def check_mapping(index, fa4, L: int, hq: int) -> dict:
    """The FA4 lists hold exactly the index's kept blocks, none twice (CPU-cheap: short lengths or a few heads)."""
    ok, heads = True, range(hq) if L <= 4096 else (0, hq - 1)
    want = index_to_mask(index, 0, L, L)
    for h in heads:
        full = fa4_kept_mask(fa4, 0, h, L, L, masked=False)
        masked = fa4_kept_mask(fa4, 0, h, L, L, full=False)
        ok &= not bool((full & masked).any()) and torch.equal(full | masked, want[h // index.heads_per_index])
    return {"mapping_ok": ok, "heads_checked": len(heads)}


def first_call(fn, dev) -> float:
    t0 = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_case(L: int, D: int, timer: Timer, fa3, fa3_err, fa4, fa4_err, policies, dry_run: bool) -> dict:
    dev, scale = timer.device, D ** -0.5
    flops = 2.0 * L * L * D * HQ
    rec = {"length": L, "head_dim": D, "flops": flops, "target_density": target_density(L), "policies": {}}
    gpu = dev.type == "cuda"
    q = torch.randn(L, HQ, D, dtype=DTYPE, device=dev)
    k, v = (torch.randn(L, HKV, D, dtype=DTYPE, device=dev) for _ in range(2))
    cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
    skip = {"ms": None, "error": "dry run without CUDA: kernels not run"}

    dense = rec["dense"] = {}
    o_fa3 = torch.empty_like(q)
    if not gpu or fa3 is None:
        dense["fa3"] = skip if not gpu else {"ms": None, "error": fa3_err}
        o_fa3 = None
    else:
        dense["fa3"] = measure(timer, lambda: fa3(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=L,
                                                  max_seqlen_k=L, softmax_scale=scale, causal=True, out=o_fa3,
                                                  fa_version=3), flops, 1.0)
    if not gpu or fa4 is None:
        dense["fa4_dense"] = skip if not gpu else {"ms": None, "error": fa4_err}
    else:
        o4 = torch.empty_like(q)
        fn = lambda: fa4["fwd"](q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=L, max_seqlen_k=L,  # noqa: E731
                                softmax_scale=scale, causal=True, out=o4)
        try:
            first = first_call(fn, dev)
        except Exception as e:  # noqa: BLE001
            dense["fa4_dense"] = {"ms": None, "error": _err(e)}
        else:
            dense["fa4_dense"] = {**measure(timer, fn, flops, 1.0), "first_call_s": first}
            if o_fa3 is not None:
                dense["fa4_dense"]["rel_l2_vs_fa3"] = rel_l2(o4, o_fa3)
        del o4
    _free(dev)
    fa3_ms = dense["fa3"].get("ms")

    for pol in policies:
        hpi = POLICIES[pol]
        r = rec["policies"][pol] = {}
        try:
            index = fixed_density_index(HQ // hpi, L, rec["target_density"], hpi, dev)
            t0 = time.perf_counter()
            t_var = fa4_block_sparse(index, cu, cu, HQ, head_dim=D)
            t_bat = fa4_block_sparse(index, cu, cu, HQ, head_dim=D, varlen=False)
            timer.sync()
            r["mapping_s"] = time.perf_counter() - t0
            r["density"] = dens = block_density(index, cu, cu)
            r.update(check_mapping(index, t_var, L, HQ) if not gpu or L <= 8192 else {})
            r["fa4_masked_blocks"] = int(t_var.mask_block_cnt.sum())
            r["fa4_full_blocks"] = int(t_var.full_block_cnt.sum())
        except Exception as e:  # noqa: BLE001
            r["error"] = f"index / mapping failed: {_err(e)}"
            continue
        if not gpu:
            for m in ("fa4_sparse", "fa4_sparse_b", "ours"):
                r[m] = skip
            continue
        o_ours = torch.empty_like(q)
        r["ours"] = measure(timer, lambda: block_sparse_attn_varlen_func(q, k, v, index, cu, cu, L, L, scale,
                                                                         out=o_ours), flops, dens)
        if fa4 is None:
            r["fa4_sparse"] = r["fa4_sparse_b"] = {"ms": None, "error": fa4_err}
        else:
            bst_var = fa4["tensors"](**t_var._asdict())
            bst_bat = fa4["tensors"](**t_bat._asdict())
            o_v, o_b = torch.empty_like(q), torch.empty_like(q)
            q1, k1, v1, o_b1 = (t.unsqueeze(0) for t in (q, k, v, o_b))
            calls = {
                "fa4_sparse": (lambda: fa4["fwd"](q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=L,
                                                  max_seqlen_k=L, softmax_scale=scale, causal=True, out=o_v,
                                                  block_sparse_tensors=bst_var), o_v),
                "fa4_sparse_b": (lambda: fa4["fwd"](q1, k1, v1, softmax_scale=scale, causal=True, out=o_b1,
                                                    block_sparse_tensors=bst_bat), o_b),
            }
            for name, (fn, o) in calls.items():
                try:
                    first = first_call(fn, dev)
                except Exception as e:  # noqa: BLE001 - e.g. varlen block sparsity unsupported on this build
                    r[name] = {"ms": None, "error": _err(e)}
                    continue
                r[name] = {**measure(timer, fn, flops, dens), "first_call_s": first}
                if r["ours"].get("ms") is not None:
                    r[name]["rel_l2_vs_ours"] = rel_l2(o, o_ours)
            del o_v, o_b, q1, k1, v1, o_b1, bst_var, bst_bat
        for m in ("ours", "fa4_sparse", "fa4_sparse_b"):
            ms = r.get(m, {}).get("ms")
            if ms and fa3_ms:
                r[m]["speedup_vs_fa3"] = fa3_ms / ms
        del index, t_var, t_bat, o_ours
        _free(dev)
    del q, k, v, o_fa3
    _free(dev)
    return rec


def chunk_case(L: int, C: int, D: int, timer: Timer, fa4, fa4_err) -> dict:
    """The last C queries of an L-token sequence against its L keys held in a paged cache (page 16)."""
    dev, scale, page = timer.device, D ** -0.5, 16
    flops = 2.0 * C * (L - C / 2) * D * HQ            # causal cells of the chunk's rows
    rec = {"length": L, "chunk": C, "head_dim": D, "flops": flops, "target_density": target_density(L)}
    q = torch.randn(C, HQ, D, dtype=DTYPE, device=dev)
    k, v = (torch.randn(L, HKV, D, dtype=DTYPE, device=dev) for _ in range(2))
    npg = cdiv(L, page)
    perm = torch.randperm(npg, device=dev).int()
    kc, vc = (torch.empty(npg, page, HKV, D, dtype=DTYPE, device=dev) for _ in range(2))
    kc[perm.long()] = k.view(npg, page, HKV, D)
    vc[perm.long()] = v.view(npg, page, HKV, D)
    bt = perm[None, :]
    cu_q = torch.tensor([0, C], dtype=torch.int32, device=dev)
    used = torch.tensor([L], dtype=torch.int32, device=dev)
    index = fixed_density_chunk_index(HQ, L, C, rec["target_density"], dev)
    rec["density"] = dens = block_density(index, cu_q, None, seqused_k=used)
    o_ours = torch.empty_like(q)
    rec["ours_paged"] = measure(timer, lambda: block_sparse_attn_varlen_func(
        q, kc, vc, index, cu_q, None, C, L, scale, out=o_ours, block_table=bt, seqused_k=used), flops, dens)
    rows = bt[0, :npg].long()
    gather = lambda: (kc[rows].view(-1, HKV, D)[:L], vc[rows].view(-1, HKV, D)[:L])  # noqa: E731
    rec["gather"] = measure(timer, gather, flops, dens)
    if fa4 is None:
        rec["fa4_sparse_b"] = {"ms": None, "error": fa4_err}
    else:
        try:
            t = fa4_block_sparse(index, cu_q, None, HQ, seqused_k=used, head_dim=D, varlen=False)
            bst = fa4["tensors"](**t._asdict())
            kg, vg = gather()
            o4 = torch.empty_like(q)
            fn = lambda: fa4["fwd"](q[None], kg[None], vg[None], softmax_scale=scale, causal=True,  # noqa: E731
                                    out=o4[None], block_sparse_tensors=bst)
            first = first_call(fn, dev)
            rec["fa4_sparse_b"] = {**measure(timer, fn, flops, dens), "first_call_s": first,
                                   "rel_l2_vs_ours": rel_l2(o4, o_ours)}
        except Exception as e:  # noqa: BLE001
            rec["fa4_sparse_b"] = {"ms": None, "error": _err(e)}
    g = rec["gather"].get("ms")
    f4 = rec["fa4_sparse_b"].get("ms")
    if g and f4 and rec["ours_paged"].get("ms"):
        rec["fa4_with_gather_vs_ours"] = rec["ours_paged"]["ms"] / (g + f4)
    del q, k, v, kc, vc, index, o_ours
    _free(dev)
    return rec


def fixed_density_chunk_index(hq: int, L: int, C: int, density: float, dev) -> "BlockSparseIndex":
    """The rows of ``fixed_density_index`` (one list per head) that belong to the last C queries."""
    full = fixed_density_index(hq, L, density, 1, dev)
    first = (L - C) // BS
    return full._replace(block_index=full.block_index[:, :, first:].contiguous(),
                         block_count=full.block_count[:, :, first:].contiguous())


def paged_probe(fa4, dev, L: int = 8192, D: int = 128) -> dict:
    """FA4 with ``page_table`` (128-token pages, shuffled) and block sparsity vs the same call on contiguous K/V."""
    if fa4 is None:
        return {"error": "FA4 not available"}
    scale, page = D ** -0.5, 128
    q = torch.randn(1, L, HQ, D, dtype=DTYPE, device=dev)
    k, v = (torch.randn(1, L, HKV, D, dtype=DTYPE, device=dev) for _ in range(2))
    npg = L // page
    perm = torch.randperm(npg, device=dev)
    kc, vc = (torch.empty(npg, page, HKV, D, dtype=DTYPE, device=dev) for _ in range(2))
    kc[perm] = k[0].view(npg, page, HKV, D)
    vc[perm] = v[0].view(npg, page, HKV, D)
    cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
    index = fixed_density_index(HQ, L, 0.5, 1, dev)
    bst = fa4["tensors"](**fa4_block_sparse(index, cu, cu, HQ, head_dim=D, varlen=False)._asdict())
    o_ref, o_pg = torch.empty_like(q), torch.empty_like(q)
    try:
        fa4["fwd"](q, k, v, softmax_scale=scale, causal=True, out=o_ref, block_sparse_tensors=bst)
        fa4["fwd"](q, kc, vc, page_table=perm[None].int(), softmax_scale=scale, causal=True, out=o_pg,
                   block_sparse_tensors=bst)
        torch.cuda.synchronize()
        return {"length": L, "head_dim": D, "page_size": page, "rel_l2_paged_vs_contiguous": rel_l2(o_pg[0], o_ref[0])}
    except Exception as e:  # noqa: BLE001
        return {"length": L, "head_dim": D, "page_size": page, "error": _err(e)}


def _f(x, nd=2) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def print_table(records: list[dict]):
    print("\nms (TFLOP/s per computed block) [x vs FA3]; rel-L2 of FA4 sparse vs ours")
    print(f"{'D':>4} {'L':>7} {'policy':>8} {'dens':>6} | {'FA3':>14} | {'FA4 dense':>14} | {'FA4 sparse':>22} | "
          f"{'FA4 sparse batched':>22} | {'ours':>22} | {'relL2':>8} {'compile s':>9}")
    for rec in records:
        d = rec["dense"]
        for pol, r in rec["policies"].items():
            def cell(x, sp=True):
                if not x or x.get("ms") is None:
                    return "n/a"
                s = f"{x['ms']:.2f} ({x.get('tflops_effective', 0):.0f})"
                return s + (f" [{x['speedup_vs_fa3']:.2f}x]" if sp and "speedup_vs_fa3" in x else "")
            fs = r.get("fa4_sparse", {})
            print(f"{rec['head_dim']:>4} {rec['length']:>7} {pol:>8} {_f(r.get('density'), 3):>6} | "
                  f"{cell(d['fa3'], False):>14} | {cell(d['fa4_dense'], False):>14} | {cell(fs):>22} | "
                  f"{cell(r.get('fa4_sparse_b')):>22} | {cell(r.get('ours')):>22} | "
                  f"{_f(fs.get('rel_l2_vs_ours'), 4):>8} {_f(fs.get('first_call_s'), 1):>9}")


def write_plot(records: list[dict], path: Path):
    plt = pyplot()
    if plt is None:
        return
    dims = sorted({r["head_dim"] for r in records})
    fig, axes = plt.subplots(2, len(dims), figsize=(6 * len(dims), 8), squeeze=False)
    for c, D in enumerate(dims):
        recs = sorted((r for r in records if r["head_dim"] == D), key=lambda r: r["length"])
        xs = [r["length"] for r in recs]
        for name in ("fa3", "fa4_dense"):
            ys = [r["dense"][name].get("tflops_effective") for r in recs]
            axes[0][c].plot(xs, [y if y else float("nan") for y in ys], "k--" if name == "fa3" else "k:", label=name)
        for pol in POLICIES:
            for name, style in (("fa4_sparse", "o-"), ("fa4_sparse_b", "s-"), ("ours", "^-")):
                rs = [r["policies"].get(pol, {}).get(name, {}) for r in recs]
                axes[0][c].plot(xs, [x.get("tflops_effective") or float("nan") for x in rs], style,
                                label=f"{name} {pol}")
                axes[1][c].plot(xs, [x.get("speedup_vs_fa3") or float("nan") for x in rs], style,
                                label=f"{name} {pol}")
        axes[0][c].set_title(f"head_dim {D}: TFLOP/s per computed block")
        axes[1][c].set_title(f"head_dim {D}: speed-up vs FA3 at TARGET_DENSITY")
        for ax in axes[:, c]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.grid(alpha=0.3)
        axes[0][c].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers") from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return out


def _heads(text: str) -> tuple[int, int]:
    try:
        hq, hkv = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give HQ/HKV, e.g. 14/2") from None
    if hq <= 0 or hkv <= 0 or hq % hkv:
        raise argparse.ArgumentTypeError(f"{text!r}: need positive heads, HQ a multiple of HKV")
    return hq, hkv


def _policies(text: str) -> list[str]:
    out = [x for x in text.split(",") if x]
    if not out or any(x not in POLICIES for x in out):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(POLICIES)}")
    return out


def main(argv=None) -> int:
    global HQ, HKV, POLICIES
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=_ints, help="default 8K..128K (dry run: 256,1024)")
    p.add_argument("--head-dims", type=_ints, default=HEAD_DIMS)
    p.add_argument("--policies", type=_policies, default=list(POLICIES), help="per_head,shared (default both)")
    p.add_argument("--out-dir", help="default benchmarks/results (dry run: a temp dir)")
    p.add_argument("--tag", default="")
    p.add_argument("--heads", type=_heads, default=None, metavar="HQ/HKV",
                   help=f"query / KV heads (default {HQ}/{HKV}, the 8B shape; 14/2 and 12/2 are Qwen2.5-Coder-0.5B / -1.5B)")
    p.add_argument("--chunk-cases", type=_ints, default=[], metavar="L,..",
                   help="also the chunked-prefill shape at these lengths (last --chunk queries, paged keys)")
    p.add_argument("--chunk", type=int, default=16384, help="query rows of a chunk case (default %(default)s)")
    p.add_argument("--paged-probe", action="store_true", help="one FA4 call with page_table + block sparsity")
    p.add_argument("--dry-run", action="store_true", help="tiny lengths; on CPU only the argument parsing and the "
                                                          "index mapping run")
    args = p.parse_args(argv)
    if args.heads:
        HQ, HKV = args.heads
        POLICIES = {"per_head": 1, "shared": HQ // HKV}
        args.policies = [x for x in args.policies if x in POLICIES]
    lengths = args.lengths or (DRY_RUN_LENGTHS if args.dry_run else DEFAULT_LENGTHS)
    for L in lengths:
        if L % BS:
            p.error(f"length {L} is no multiple of the {BS}-token block")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.dry_run:
        p.error("no CUDA device: use --dry-run for a CPU smoke test")
    timer = Timer(dev, warmup=1, budget_s=0.05) if args.dry_run else Timer(dev)
    out_dir = Path(args.out_dir) if args.out_dir else (Path(tempfile.mkdtemp(prefix="bench_fa4_")) if args.dry_run
                                                       else REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    fa3, fa3_err, vllm_version = load_fa3()
    fa4, fa4_err = load_fa4() if dev.type == "cuda" else (None, "no CUDA device")
    if dev.type == "cuda" and fa4 is not None and torch.cuda.get_device_capability()[0] < 9:
        fa4, fa4_err = None, f"compute capability {torch.cuda.get_device_capability()} < 9.0"
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") + (f"-{args.tag}" if args.tag else "")
    try:
        from importlib.metadata import version
        cutlass_version = version("nvidia-cutlass-dsl")
    except Exception:  # noqa: BLE001
        cutlass_version = None
    print(f"device {device_name} | torch {torch.__version__} | triton {triton.__version__} | vllm {vllm_version} | "
          f"cutlass-dsl {cutlass_version} | FA3 {'ok' if fa3 else fa3_err} | FA4 {'ok' if fa4 else fa4_err}")
    result = {
        "device": device_name, "torch": torch.__version__, "triton": triton.__version__, "vllm": vllm_version,
        "nvidia_cutlass_dsl": cutlass_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": {"num_heads": HQ, "num_kv_heads": HKV, "dtype": str(DTYPE), "block_size": BS, "batch": 1},
        "target_density": TARGET_DENSITY, "dry_run": args.dry_run,
        "fa3_error": fa3_err, "fa4_error": fa4_err,
        "fa4_public_block_sparse_kwarg": fa4.get("public_block_sparse_kwarg") if fa4 else None,
        "fa4_fwd_params": fa4.get("fwd_params") if fa4 else None,
        "records": [],
    }
    json_path = out_dir / f"bench_fa4_sparse_{slug}.json"
    for D in args.head_dims:
        for L in lengths:
            print(f"head_dim {D} length {L} ...", flush=True)
            try:
                rec = bench_case(L, D, timer, fa3, fa3_err, fa4, fa4_err, args.policies, args.dry_run)
            except Exception as e:  # noqa: BLE001 - e.g. inputs that do not fit; keep the other cases
                rec = {"length": L, "head_dim": D, "error": _err(e), "dense": {}, "policies": {}}
                _free(dev)
            result["records"].append(rec)
            json_path.write_text(json.dumps(result, indent=1))   # partial results survive a timeout
    if dev.type == "cuda" and args.paged_probe:
        result["paged_probe"] = paged_probe(fa4, dev)
        print(f"paged probe: {result['paged_probe']}", flush=True)
        json_path.write_text(json.dumps(result, indent=1))
    result["chunk_records"] = []
    for D in args.head_dims if dev.type == "cuda" else []:
        for L in args.chunk_cases:
            print(f"chunk case head_dim {D} length {L} chunk {args.chunk} ...", flush=True)
            try:
                rec = chunk_case(L, args.chunk, D, timer, fa4, fa4_err)
            except Exception as e:  # noqa: BLE001
                rec = {"length": L, "chunk": args.chunk, "head_dim": D, "error": _err(e)}
                _free(dev)
            print(f"  {json.dumps({k: (x.get('ms') if isinstance(x, dict) else x) for k, x in rec.items()})}",
                  flush=True)
            result["chunk_records"].append(rec)
            json_path.write_text(json.dumps(result, indent=1))
    json_path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {json_path}")
    write_plot(result["records"], out_dir / f"bench_fa4_sparse_{slug}.png")
    print_table(result["records"])
    bad = [(r["head_dim"], r["length"], pol) for r in result["records"] for pol, x in r["policies"].items()
           if x.get("mapping_ok") is False]
    if bad:
        print(f"MAPPING MISMATCH: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
