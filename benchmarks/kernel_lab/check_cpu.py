#!/usr/bin/env python
"""CPU check of the kernel-lab variants (no GPU needed).

1. Numerics under the Triton interpreter (``TRITON_INTERPRET=1``, set here before triton is imported): every
   variant of ``sparse_attn_hopper.VARIANTS`` against the fp32 reference (``flashprefill_vllm.ops.reference``) and
   the product kernel, in fp16 (the interpreter mishandles bf16), on small varlen batches (block_size 128; a 512-token self-attention sequence, a 256-query
   chunk over 512 keys, a 448-token sequence whose last block is partial), per-query-head and shared indexes,
   random kept blocks plus the forced sink and local window. The interpreter ignores ``num_stages`` /
   ``warp_specialize`` and emulates tensor descriptors, so the pipelined / specialised variants check only the
   arithmetic, not the GPU schedule.
2. Compilation for SM90 without a GPU (``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``), in a
   subprocess without the interpreter: per variant and head_dim, whether it compiles, the compile time, shared
   memory, and from the cubin (cuobjdump) registers / spills; from the PTX whether it uses wgmma, TMA and
   warp-specialisation register reallocation (setmaxnreg).

    PYTHONPATH=. python benchmarks/kernel_lab/check_cpu.py [--skip-interp] [--skip-compile] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--compile-sm90-worker" not in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"   # before anything imports triton
else:
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.kernel_lab import sparse_attn_hopper as lab  # noqa: E402
from flashprefill_vllm.ops.block_sparse_index import BlockSparseIndex  # noqa: E402

BS = 128
REL_L2_TOL = 1e-2     # bf16 output against the fp32 reference
ABS_TOL = 3e-2
# The interpreter emulates bf16 wrongly (numpy has no bf16: even the product kernel returns ~1e9 there), so the
# numerics check runs in fp16, as the repo's interpreter tests do; the kernels are dtype-generic. SM90 compiles: bf16.
INTERP_DTYPE = torch.float16


def random_index(seqs: list[tuple[int, int]], heads: int, density: float, heads_per_index: int,
                 seed: int = 0, sinks: int = 1, local: int = 2) -> BlockSparseIndex:
    """Random kept blocks per (index head, sequence, query block): sink + local window (always, as the product's
    builder guarantees) + each other causally visible block with probability ``density``. Ids ascending, scratch
    past the count set to garbage (block 10**6) so a kernel reading past the count would fail loudly."""
    gen = torch.Generator().manual_seed(seed)
    nq_max = max(triton.cdiv(lq, BS) for lq, _ in seqs)
    nk_max = max(triton.cdiv(lk, BS) for _, lk in seqs)
    h_idx = heads // heads_per_index
    count = torch.zeros(h_idx, len(seqs), nq_max, dtype=torch.int32)
    ids = torch.full((h_idx, len(seqs), nq_max, nk_max), 10 ** 6, dtype=torch.int32)
    for b, (lq, lk) in enumerate(seqs):
        ctx = lk - lq
        for i in range(triton.cdiv(lq, BS)):
            d_last = (ctx + min((i + 1) * BS, lq) - 1) // BS
            d_first = (ctx + i * BS) // BS
            j = torch.arange(d_last + 1)
            forced = (j < sinks) | (j > d_first - local)
            for h in range(h_idx):
                keep = forced | (torch.rand(d_last + 1, generator=gen) < density)
                kept = j[keep]
                count[h, b, i] = kept.numel()
                ids[h, b, i, :kept.numel()] = kept.int()
    return BlockSparseIndex(count, ids, BS, heads_per_index)


def interp_check() -> list[dict]:
    from flashprefill_vllm.ops import reference
    from flashprefill_vllm.ops.attention import sparse_attention

    rows = []
    cases = [[(512, 512)], [(256, 512), (448, 448)]]
    for d, hq, hkv in ((128, 4, 2), (64, 4, 2)):
        for seqs in cases:
            for hpi in (1, hq // hkv):
                torch.manual_seed(d + len(seqs) + hpi)
                tq, tk = sum(s[0] for s in seqs), sum(s[1] for s in seqs)
                q = torch.randn(tq, hq, d, dtype=INTERP_DTYPE)
                k = torch.randn(tk, hkv, d, dtype=INTERP_DTYPE)
                v = torch.randn(tk, hkv, d, dtype=INTERP_DTYPE)
                cu_q = torch.tensor([0] + [sum(s[0] for s in seqs[:i + 1]) for i in range(len(seqs))], dtype=torch.int32)
                cu_k = torch.tensor([0] + [sum(s[1] for s in seqs[:i + 1]) for i in range(len(seqs))], dtype=torch.int32)
                max_q = max(s[0] for s in seqs)
                index = random_index(seqs, hq, 0.4, hpi)
                scale = d ** -0.5
                ref_index = index._replace(block_index=torch.where(index.block_index >= 10 ** 6, -1,
                                                                   index.block_index))
                ref = reference.sparse_attention(q, k, v, ref_index, cu_q, cu_k, scale).float()
                cur = torch.zeros_like(q)
                sparse_attention(q, k, v, index, cu_q, cu_k, max_q, scale, cur, None, BS)
                case = f"D{d} seqs={seqs} heads_per_index={hpi}"
                for var in [None] + lab.VARIANTS[d]:
                    name = "current_kernel" if var is None else var.name
                    rec = {"head_dim": d, "case": case, "variant": name}
                    try:
                        if var is None:
                            out = cur
                        else:
                            out = torch.zeros_like(q)
                            lab.sparse_attention_hopper(q, k, v, index, cu_q, cu_k, max_q, scale, out, BS, var)
                        diff = out.float() - ref
                        rec["max_abs"] = diff.abs().max().item()
                        rec["rel_l2"] = (diff.norm() / ref.norm()).item()
                        rec["max_abs_vs_current"] = (out.float() - cur.float()).abs().max().item()
                        rec["ok"] = bool(rec["rel_l2"] < REL_L2_TOL and rec["max_abs"] < ABS_TOL)
                    except Exception as e:  # noqa: BLE001 - record and go on
                        rec.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
                    rows.append(rec)
                    print(f"  {case:<48} {name:<16} "
                          + (f"rel-L2 {rec['rel_l2']:.2e} max|d| {rec['max_abs']:.2e} "
                             f"max|d| vs current {rec['max_abs_vs_current']:.2e} "
                             if "rel_l2" in rec else rec.get("error", "")) + ("" if rec["ok"] else "  FAIL"),
                          flush=True)
    return rows


def _sig_and_attrs(kernel, args, constexprs):
    sig, attrs = {}, {}
    names = kernel.arg_names
    for i, (name, a) in enumerate(zip(names, args)):
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + {torch.bfloat16: "bf16", torch.int32: "i32", torch.float32: "fp32"}[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in constexprs:
        sig[name] = "constexpr"
    return sig, attrs


def _resource_usage(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            txt = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 timeout=60).stdout
        except Exception as e:  # noqa: BLE001
            return {"resource_error": str(e)}
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", txt)
    return ({"regs": int(m[1]), "stack": int(m[2]), "shared_static": int(m[3]), "local": int(m[4])} if m
            else {"resource_raw": txt.strip()[-300:]})


def compile_sm90_worker(out_path: str):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    rows = []
    for d, hq, hkv in ((128, 32, 8), (64, 14, 2)):
        L = 1024
        q = torch.empty(L, hq, d, dtype=torch.bfloat16)
        k = torch.empty(L, hkv, d, dtype=torch.bfloat16)
        cu = torch.tensor([0, L], dtype=torch.int32)
        nb = L // BS
        index = BlockSparseIndex(torch.zeros(hq, 1, nb, dtype=torch.int32),
                                 torch.zeros(hq, 1, nb, nb, dtype=torch.int32), BS, 1)
        args = lab.kernel_args(q, k, k, index, cu, cu, d ** -0.5, q)
        for var in lab.VARIANTS[d]:
            cx = lab.kernel_constexprs(var, d, BS)
            sig, attrs = _sig_and_attrs(lab._sparse_attn_hopper_kernel, args, cx)
            rec = {"head_dim": d, "variant": var.name, **var._asdict()}
            t0 = time.perf_counter()
            err_file = tempfile.TemporaryFile(mode="w+")
            saved_fd = os.dup(2)
            os.dup2(err_file.fileno(), 2)   # MLIR writes its failure (the failing pass) to fd 2
            try:
                src = ASTSource(fn=lab._sparse_attn_hopper_kernel, signature=sig, constexprs=cx, attrs=attrs)
                ck = triton.compile(src, target=target,
                                    options={"num_warps": var.num_warps, "num_stages": var.num_stages})
                ptx, ttgir = ck.asm["ptx"], ck.asm["ttgir"]
                rec.update(compiled=True, compile_s=round(time.perf_counter() - t0, 2),
                           shared_bytes=ck.metadata.shared,
                           wgmma="wgmma.mma_async" in ptx, tma="cp.async.bulk.tensor" in ptx,
                           tensormap_in_kernel="tensormap.replace" in ptx or "tensormap" in ptx,
                           setmaxnreg="setmaxnreg" in ptx, ttg_warp_specialize="ttg.warp_specialize" in ttgir, cp_async="cp.async.ca" in ptx or "cp.async.cg" in ptx,
                           **_resource_usage(ck.asm["cubin"]))
            except Exception as e:  # noqa: BLE001
                msg = str(e).strip().splitlines()
                os.dup2(saved_fd, 2)
                err_file.seek(0)
                passes = re.findall(r"Pipeline failed while executing \[`([^`]+)`", err_file.read())
                rec.update(compiled=False, compile_s=round(time.perf_counter() - t0, 2),
                           error=f"{type(e).__name__}: {' | '.join(msg[:3])[:600]}"
                                 + (f" (failing pass: {', '.join(passes)})" if passes else ""))
            finally:
                os.dup2(saved_fd, 2)
                os.close(saved_fd)
                err_file.close()
            rows.append(rec)
            print(f"  sm90 D{d} {var.name:<16} "
                  + (f"ok {rec['compile_s']:5.1f}s smem {rec['shared_bytes']} regs {rec.get('regs')} "
                     f"local {rec.get('local')} wgmma {rec['wgmma']} tma {rec['tma']} setmaxnreg "
                     f"{rec['setmaxnreg']} ttg.warp_specialize {rec['ttg_warp_specialize']} cp.async {rec['cp_async']}" if rec["compiled"] else
                     f"FAILED: {rec['error']}"), flush=True)
    Path(out_path).write_text(json.dumps(rows, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-interp", action="store_true")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--strict", action="store_true", help="also fail when a variant does not compile for SM90")
    p.add_argument("--compile-sm90-worker", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.compile_sm90_worker:
        compile_sm90_worker(args.compile_sm90_worker)
        return
    result = {"triton": triton.__version__, "torch": torch.__version__}
    failed = []
    if not args.skip_interp:
        print("Interpreter numerics (vs fp32 reference; tolerance rel-L2 < "
              f"{REL_L2_TOL}, max abs < {ABS_TOL}):", flush=True)
        result["interp"] = rows = interp_check()
        failed += [f"interp {r['case']} {r['variant']}" for r in rows if not r["ok"]]
    if not args.skip_compile:
        print("SM90 compile (no GPU; ASTSource + GPUTarget('cuda', 90, 32)):", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "sm90.json"
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
            env["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")   # a cold cache: honest compile times
            subprocess.run([sys.executable, __file__, "--compile-sm90-worker", str(out)], env=env, check=True)
            result["sm90"] = rows = json.loads(out.read_text())
        no_compile = [f"D{r['head_dim']} {r['variant']}" for r in rows if not r["compiled"]]
        print("SM90: all variants compile" if not no_compile else
              "SM90: do not compile (reported, not a check failure): " + ", ".join(no_compile))
        if args.strict:
            failed += [f"sm90 {x}" for x in no_compile]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print("\nall checks passed" if not failed else "\nFAILED: " + ", ".join(failed))
    assert not failed, failed


if __name__ == "__main__":
    main()
