#!/usr/bin/env python
"""Time-to-first-token in vLLM, dense (stock FlashAttention) vs FlashPrefill, plus decode throughput.

The parent process starts one child per setting (the plugin reads ``FLASHPREFILL*`` in every vLLM process, so a
setting is fixed per engine) and merges their JSON into ``benchmarks/results/bench_ttft_<device>.{json,png}``.

Default model: a Llama-3.1-8B-shaped config (32 layers, 32/8 heads, head_dim 128) with ``load_format="dummy"``
written to a temp folder (no weights needed, token-id prompts). Random weights give near-uniform attention, where
the threshold keeps nearly every block; ``--alpha`` sets the threshold the sparse run uses, and the density each
layer chose is logged (``FLASHPREFILL_LOG_DENSITY=1``) and summarised in the JSON.

    python benchmarks/bench_ttft.py --settings dense,sparse --lengths 4096,16384,32768,65536,131071 --alpha 1.0
    python benchmarks/bench_ttft.py --child dense --out x.json ...          # one setting (used by the parent)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LLAMA_8B_SHAPE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def _write_dummy_model() -> str:
    d = tempfile.mkdtemp(prefix="llama8b_shape_")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(LLAMA_8B_SHAPE, f)
    return d


def child(args) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    import random

    lengths = [int(x) for x in args.lengths.split(",")]
    max_len = max(lengths) + 1 if args.max_model_len is None else args.max_model_len
    kw = dict(model=args.model, skip_tokenizer_init=True, max_model_len=max_len, gpu_memory_utilization=0.85,
              seed=0, enable_prefix_caching=False)
    if args.model_is_dummy:
        kw["load_format"] = "dummy"
    if args.whole_prompts:
        # Whole-prompt prefills (no chunks), so every long prompt is a fresh prefill the sparse path can take.
        kw["max_num_batched_tokens"] = max_len
    t0 = time.perf_counter()
    llm = LLM(**kw)
    start_s = time.perf_counter() - t0
    rng = random.Random(0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    one = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
    records = []
    for L in lengths:
        times = []
        for rep in range(args.reps + 1):          # first run of each length is a warm-up
            prompt = TokensPrompt(prompt_token_ids=[rng.randrange(100, vocab) for _ in range(L)])
            t = time.perf_counter()
            llm.generate([prompt], one, use_tqdm=False)
            if rep:
                times.append(time.perf_counter() - t)
        records.append({"length": L, "ttft_s": statistics.median(times), "ttft_all_s": times})
        print(f"[ttft] {args.child} L={L} ttft={statistics.median(times) * 1e3:.1f} ms", flush=True)
    # Decode throughput: a batch of short prompts, many new tokens (decode-only steps dominate).
    dec = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, vocab) for _ in range(512)])
               for _ in range(args.decode_batch)]
    llm.generate(prompts[:2], dec, use_tqdm=False)
    t = time.perf_counter()
    llm.generate(prompts, dec, use_tqdm=False)
    dt = time.perf_counter() - t
    decode_tps = args.decode_batch * args.decode_tokens / dt
    print(f"[decode] {args.child} {decode_tps:.0f} tok/s", flush=True)
    with open(args.out, "w") as f:
        json.dump({"setting": args.child, "engine_start_s": start_s, "ttft": records, "decode_tok_s": decode_tps,
                   "decode_batch": args.decode_batch, "decode_tokens": args.decode_tokens}, f)


def run_child(setting: str, args, out: str) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["FLASHPREFILL"] = "1" if setting == "sparse" else "0"
    if setting == "sparse":
        env["FLASHPREFILL_ALPHA"] = str(args.alpha)
        env["FLASHPREFILL_LOG_DENSITY"] = "1"
    cmd = [sys.executable, __file__, "--child", setting, "--out", out, "--model", args.model, "--lengths",
           args.lengths, "--reps", str(args.reps), "--decode-batch", str(args.decode_batch), "--decode-tokens",
           str(args.decode_tokens)] + (["--model-is-dummy"] if args.model_is_dummy else []) \
        + (["--whole-prompts"] if args.whole_prompts else [])
    log = Path(out).with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    for line in text.splitlines():
        if line.startswith(("[ttft]", "[decode]")):
            print(line, flush=True)
    if proc.returncode != 0:
        print(text[-4000:])
        raise SystemExit(f"{setting} run failed (rc {proc.returncode}); log {log}")
    res = json.load(open(out))
    # Density lines from the plugin's FLASHPREFILL_LOG_DENSITY logging: "1 prefill(s), 32768 tokens, kept 12.3% ...".
    dens = {}
    for m in re.finditer(r"1 prefill\(s\), (\d+) tokens, kept ([0-9.]+)%", text):
        dens.setdefault(int(m.group(1)), []).append(float(m.group(2)) / 100)
    res["density_by_length"] = {L: statistics.mean(v) for L, v in sorted(dens.items())}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="dense,sparse")
    ap.add_argument("--lengths", default="4096,16384,32768,65536,131071")
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--model", default=None, help="HF model dir (default: Llama-3.1-8B-shaped dummy weights)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--whole-prompts", action="store_true", default=True)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--child", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--model-is-dummy", action="store_true")
    ap.add_argument("--max-model-len", type=int, default=None)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.model is None:
        args.model, args.model_is_dummy = _write_dummy_model(), True
    import torch
    import vllm
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") + (f"-{args.tag}" if args.tag else "")
    runs = {}
    for s in args.settings.split(","):
        runs[s] = run_child(s, args, str(out_dir / f"bench_ttft_{slug}_{s}.json"))
    import triton
    summary = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
               "vllm": vllm.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "model": "Llama-3.1-8B-shaped, load_format=dummy" if args.model_is_dummy else args.model,
               "alpha": args.alpha, "whole_prompts": args.whole_prompts, "runs": runs}
    if "dense" in runs and "sparse" in runs:
        rows = []
        for d, s in zip(runs["dense"]["ttft"], runs["sparse"]["ttft"]):
            rows.append({"length": d["length"], "dense_ms": d["ttft_s"] * 1e3, "sparse_ms": s["ttft_s"] * 1e3,
                         "speedup": d["ttft_s"] / s["ttft_s"],
                         "density": runs["sparse"]["density_by_length"].get(d["length"])})
            print(f"L={d['length']:>7} dense {rows[-1]['dense_ms']:9.1f} ms  sparse {rows[-1]['sparse_ms']:9.1f} ms"
                  f"  speedup {rows[-1]['speedup']:.2f}x  density {rows[-1]['density']}")
        summary["table"] = rows
        summary["decode_change"] = runs["sparse"]["decode_tok_s"] / runs["dense"]["decode_tok_s"] - 1
        print(f"decode tok/s dense {runs['dense']['decode_tok_s']:.0f} sparse {runs['sparse']['decode_tok_s']:.0f}"
              f" ({summary['decode_change'] * 100:+.1f}%)")
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(1, 2, figsize=(11, 4))
            Ls = [r["length"] for r in rows]
            ax[0].loglog(Ls, [r["dense_ms"] for r in rows], "o-", label="dense (stock FA3)")
            ax[0].loglog(Ls, [r["sparse_ms"] for r in rows], "o-", label=f"FlashPrefill (alpha {args.alpha})")
            ax[0].set_xlabel("prompt tokens"); ax[0].set_ylabel("TTFT ms"); ax[0].legend(); ax[0].grid(alpha=.3)
            ax[1].semilogx(Ls, [r["speedup"] for r in rows], "o-")
            ax[1].set_xlabel("prompt tokens"); ax[1].set_ylabel("TTFT speed-up"); ax[1].grid(alpha=.3)
            fig.suptitle(f"vLLM {vllm.__version__} TTFT, {summary['model']}, {device}")
            fig.tight_layout()
            fig.savefig(out_dir / f"bench_ttft_{slug}.png", dpi=120)
        except ImportError:
            print("note: matplotlib not installed; plot skipped")
    with open(out_dir / f"bench_ttft_{slug}.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {out_dir / f'bench_ttft_{slug}.json'}")


if __name__ == "__main__":
    main()
