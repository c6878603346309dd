"""Cost of the selection (pool + score + threshold + index) against dense FA3, with and without the mass floor.

``python benchmarks/bench_select.py [--lengths 8192,...] [--settings 0.1:0,0.1:0.9,...]`` (GPU; ``--dry-run`` on CPU)

Per length (Llama-3.1-8B attention shape: 32 query / 8 KV heads, head_dim 128, bf16, structured inputs from
``flashprefill_vllm/synthetic.py``) and per ``alpha:tau`` setting: the time of ``flash_prefill_block_index`` (median, CUDA events),
its share of FA3's dense causal time on the same inputs, and the density it chose. A floor that binds runs the
bisection (12 more passes over each binding row's scores); ``--settings`` includes a setting where it binds on most
rows (alpha 0.5, tau 0.99) as the worst case; on the structured inputs the floor rarely binds, so ``--q-scale 0.25``
(queries scaled down: flatter block scores, more of the mass in the tail) makes it bind on most rows. Writes ``benchmarks/results/bench_select_<device>.{json,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_op import BS, D, DTYPE, HKV, HQ, REPO, Timer, _free, load_fa3, make_inputs  # noqa: E402

from flashprefill_vllm.config import FlashPrefillConfig  # noqa: E402
from flashprefill_vllm.ops.interface import flash_prefill_block_index  # noqa: E402
from flashprefill_vllm.ops.block_sparse_index import block_density  # noqa: E402
from flashprefill_vllm.eval.plotting import pyplot  # noqa: E402

DEFAULT_LENGTHS = [8192, 16384, 32768, 65536, 131072]
GOAL_SHARE = 0.05   # selection <= 5% of FA3's time from 16K up


def _settings(text: str) -> list[tuple[float, float]]:
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            a, t = (float(x) for x in item.split(":"))
            FlashPrefillConfig(alpha=a, tau=t)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{item!r}: give alpha:tau pairs, alpha in (0, 1], tau in [0, 1] "
                                             f"({err})") from None
        out.append((a, t))
    if not out:
        raise argparse.ArgumentTypeError("no alpha:tau pair given")
    return out


def main(argv=None) -> int:
    d = FlashPrefillConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=DEFAULT_LENGTHS)
    p.add_argument("--settings", type=_settings,
                   default=_settings(f"{d.alpha}:0,{d.alpha}:{d.tau},0.5:0.99" if d.tau > 0 else
                                     f"{d.alpha}:0,{d.alpha}:0.9,0.5:0.99"),
                   help="alpha:tau pairs (default: the default alpha without and with the default floor, and 0.5:0.99)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--q-scale", type=float, default=1.0,
                   help="queries multiplied by this (< 1: flatter scores, the floor binds more often; default 1)")
    p.add_argument("--dry-run", action="store_true", help="tiny lengths on the CPU (smoke test)")
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.dry_run:
        p.error("no CUDA device: use --dry-run for a CPU smoke test")
    lengths = [256, 512] if args.dry_run else args.lengths
    timer = Timer(dev, warmup=1, budget_s=0.05) if args.dry_run else Timer(dev)
    fa3, fa3_err, vllm_version = load_fa3()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    records = []
    for L in lengths:
        q, k, v, cu = make_inputs(L, dev, structured=True)
        if args.q_scale != 1.0:
            q = q * args.q_scale
        scale = D ** -0.5
        rec = {"length": L, "fa3_ms": None}
        if fa3 is not None and dev.type == "cuda":
            o = torch.empty_like(q)
            rec["fa3_ms"] = timer(lambda: fa3(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=L,
                                              max_seqlen_k=L, softmax_scale=scale, causal=True, out=o, fa_version=3))
            del o
        rec["settings"] = []
        for alpha, tau in args.settings:
            cfg = FlashPrefillConfig(alpha=alpha, tau=tau, min_sparse_len=0, block_size=BS)
            index = flash_prefill_block_index(q, k, cu, cu, L, L, scale, config=cfg)
            dens = block_density(index, cu, cu)
            del index
            ms = timer(lambda: flash_prefill_block_index(q, k, cu, cu, L, L, scale, config=cfg))
            share = ms / rec["fa3_ms"] if rec["fa3_ms"] else None
            rec["settings"].append({"alpha": alpha, "tau": tau, "select_ms": ms, "density": dens,
                                    "share_of_fa3": share})
            print(f"L={L:>7} alpha={alpha:<5g} tau={tau:<5g} select {ms:8.3f} ms  density {dens:.3f}  "
                  f"share of FA3 {share if share is None else f'{share:.3f}'}", flush=True)
        records.append(rec)
        del q, k, v, cu
        _free(dev)
    result = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "vllm": vllm_version,
              "fa3": "vllm_flash_attn fa_version=3" if fa3 else fa3_err,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "shape": {"num_heads": HQ, "num_kv_heads": HKV, "head_dim": D, "dtype": str(DTYPE), "block_size": BS,
                        "inputs": "flashprefill_vllm.synthetic.structured_qkv", "q_scale": args.q_scale},
              "config": dataclasses.asdict(FlashPrefillConfig()), "goal_share_of_fa3": GOAL_SHARE,
              "results": records}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_select_" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + (f"-{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for n, (alpha, tau) in enumerate(args.settings):
            ys = [r["settings"][n]["share_of_fa3"] for r in records]
            if all(y is not None for y in ys):
                ax.plot(lengths, ys, "o-", label=f"alpha {alpha:g}, tau {tau:g}")
        ax.axhline(GOAL_SHARE, color="grey", ls=":", label=f"goal {GOAL_SHARE:g}")
        ax.set(xscale="log", xlabel="sequence length", ylabel="selection time / FA3 dense time",
               title=f"Selection cost, {HQ}/{HKV} heads, d={D} ({name})")
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=110)
    print(f"wrote {out / stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
