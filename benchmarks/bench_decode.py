#!/usr/bin/env python
"""Decode throughput in vLLM, stock (``FLASHPREFILL=0``) vs the plugin on (``FLASHPREFILL=1``), A/B in fresh processes.

Decode steps never run sparse (they take stock FlashAttention, replayed from FULL CUDA graphs), so the plugin should
cost decode nothing. A single process per setting is not enough to show that: on a small model decode is bound by
the host, and its speed differs between processes of the *same* setting by more than the 2% we want to resolve. So
the parent alternates ``stock`` and ``plugin`` children for ``--rounds`` rounds and compares the medians of the
per-process medians, and (from 5 processes on) the effect at equal host speed (:func:`host_adjusted_change`). Each child (engine in-process, dummy weights) decodes ``--batch`` prompts of 512 tokens for
``--tokens`` new tokens ``--runs`` times and also records, per run, how vLLM dispatched each step (CUDA-graph mode),
how often the attention impl's ``forward`` ran in Python (24 or 32 = one eager step: the prefill) and the time spent
in the metadata builders (stock FlashAttention's ``build`` and, with the plugin, ours around it).

    python benchmarks/bench_decode.py --shape llama8b --rounds 2
    python benchmarks/bench_decode.py --shape qwen0.5b --rounds 3
    python benchmarks/bench_decode.py --from-logs DIR --shape qwen0.5b      # rebuild JSON/PNG from child logs
"""

from __future__ import annotations

import argparse
import ast
import collections
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ttft import LLAMA_8B_SHAPE  # noqa: E402
from flashprefill_vllm.eval.plotting import pyplot  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama8b": LLAMA_8B_SHAPE,
    # Qwen2.5-0.5B: 24 layers, 14/2 heads, head_dim 64; decode is host-bound at this size.
    "qwen0.5b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
                 "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                 "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
                 "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                 "torch_dtype": "bfloat16", "use_sliding_window": False},
}
SETTINGS = ("stock", "plugin")
RUN_RE = re.compile(r"^\[diag\] (\w+) run (\d+): (\d+) tok/s  (\{.*?\})  (.*)$")


def child(setting: str, shape: str, runs: int, batch: int, tokens: int) -> None:
    import random
    counts, times = collections.Counter(), collections.defaultdict(float)
    from vllm.v1.attention.backends import flash_attn as fa
    from vllm.v1.worker.gpu import cudagraph_utils as cgu

    def wrap_forward(fn):
        def forward(self, *a, **k):
            counts["attn_forward"] += 1
            return fn(self, *a, **k)
        return forward

    def wrap_build(fn, name, count=None):
        def build(self, *a, **k):
            t = time.perf_counter()
            res = fn(self, *a, **k)
            times[name] += time.perf_counter() - t
            if count:
                counts[count] += 1
            return res
        return build

    def wrap_dispatch(fn):
        def dispatch(self, *a, **k):
            desc = fn(self, *a, **k)
            counts["dispatch_" + desc.cg_mode.name] += 1
            return desc
        return dispatch

    fa.FlashAttentionImpl.forward = wrap_forward(fa.FlashAttentionImpl.forward)
    fa.FlashAttentionMetadataBuilder.build = wrap_build(fa.FlashAttentionMetadataBuilder.build, "fa_build_s",
                                                        "fa_build")
    cgu.CudaGraphManager.dispatch = wrap_dispatch(cgu.CudaGraphManager.dispatch)
    if setting == "plugin":
        from flashprefill_vllm.backends import vllm_latest
        builder = vllm_latest.FlashPrefillMetadataBuilder
        builder.build = wrap_build(builder.build, "fp_build_s")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cfg = SHAPES[shape]
    model = tempfile.mkdtemp(prefix=f"{shape}_")
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(cfg, f)
    llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, max_model_len=4096,
              gpu_memory_utilization=0.7, seed=0)
    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, cfg["vocab_size"]) for _ in range(512)])
               for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:2], params, use_tqdm=False)
    rates = []
    for i in range(runs):
        counts.clear()
        times.clear()
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        rates.append(batch * tokens / (time.perf_counter() - t))
        print(f"[diag] {setting} run {i}: {rates[-1]:.0f} tok/s  {dict(counts)}  "
              + " ".join(f"{k}={v * 1e3:.1f}ms" for k, v in times.items()), flush=True)
    print(f"[diag] {shape} {setting} median {statistics.median(rates):.0f} tok/s", flush=True)


def parse_log(text: str) -> list[dict]:
    """The runs a child printed: tok/s, its counters and builder times (ms)."""
    runs = []
    for line in text.splitlines():
        m = RUN_RE.match(line)
        if m:
            rec = {"setting": m.group(1), "run": int(m.group(2)), "tok_s": float(m.group(3)),
                   "counts": ast.literal_eval(m.group(4))}
            for kv in m.group(5).split():
                k, v = kv.split("=")
                rec[k.replace("_s", "_ms")] = float(v.rstrip("ms"))
            runs.append(rec)
    return runs


def summarize(processes: list[dict]) -> dict:
    """Per setting: every process's median tok/s (first run excluded: it follows the warm-up step's shapes) and
    the median over processes; the plugin's change against stock; and that change adjusted for host speed."""
    out = {}
    for s in SETTINGS:
        meds = [p["median_tok_s"] for p in processes if p["setting"] == s and p["median_tok_s"] is not None]
        out[s] = {"process_medians": meds, "median": statistics.median(meds) if meds else None}
    if out["stock"]["median"] and out["plugin"]["median"]:
        out["plugin_change"] = out["plugin"]["median"] / out["stock"]["median"] - 1
    adjusted = host_adjusted_change(processes)
    if adjusted is not None:
        out["plugin_change_host_adjusted"], out["plugin_change_host_adjusted_se"] = adjusted
    return out


def host_adjusted_change(processes: list[dict], min_processes: int = 5) -> tuple[float, float] | None:
    """The plugin's effect on decode tok/s at equal host speed, with its standard error (relative; ``None`` with
    fewer than ``min_processes`` usable processes or without both settings).

    Host-bound decode runs at different speeds in different processes of the same setting. Stock FlashAttention's
    ``build`` is the same code in both settings and runs once per step, so its time per run measures how fast the
    host ran that process. Least squares over processes: ``log(tok/s) = a + b * log(fa_build_ms) + c * plugin``;
    the effect is ``exp(c) - 1``."""
    import numpy as np
    rows = [(p["median_tok_s"], p["median_fa_build_ms"], p["setting"] == "plugin") for p in processes
            if p.get("median_tok_s") and p.get("median_fa_build_ms")]
    if len(rows) < min_processes or len({r[2] for r in rows}) < 2:
        return None
    x = np.array([[1.0, np.log(fa), float(plugin)] for _, fa, plugin in rows])
    y = np.log(np.array([tok for tok, _, _ in rows]))
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    var = (resid @ resid) / (len(rows) - x.shape[1]) * np.linalg.inv(x.T @ x)
    return float(np.exp(coef[2]) - 1), float(np.sqrt(var[2, 2]))


def process_record(setting: str, round_: int, log_path: Path) -> dict:
    runs = parse_log(log_path.read_text())
    steady = runs[1:] or runs
    fa = [r["fa_build_ms"] for r in steady if "fa_build_ms" in r]
    return {"setting": setting, "round": round_, "log": log_path.name, "runs": runs,
            "median_tok_s": statistics.median(r["tok_s"] for r in steady) if steady else None,
            "median_fa_build_ms": statistics.median(fa) if fa else None}


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, s in enumerate(SETTINGS):
        ys = [p["median_tok_s"] for p in result["processes"] if p["setting"] == s]
        ax.plot([i] * len(ys), ys, "o", alpha=0.7, label=f"{s} (one point per process)")
        if result["summary"][s]["median"]:
            ax.hlines(result["summary"][s]["median"], i - 0.2, i + 0.2, color="k")
    ax.set_xticks(range(len(SETTINGS)), SETTINGS)
    ax.set_ylabel("decode tok/s (median of runs 2..N)")
    summary = result["summary"]
    change, adjusted = summary.get("plugin_change"), summary.get("plugin_change_host_adjusted")
    ax.set_title(f"{result['shape']} decode, batch {result['batch']}, vLLM {result['vllm']}, {result['device']}\n"
                 + (f"plugin vs stock: {change * 100:+.1f}% (medians)" if change is not None else "")
                 + (f", {adjusted * 100:+.1f}% +- {summary['plugin_change_host_adjusted_se'] * 100:.1f}% at equal "
                    "host speed" if adjusted is not None else ""), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    ap.add_argument("--rounds", type=int, default=2, help="stock/plugin process pairs")
    ap.add_argument("--runs", type=int, default=5, help="timed decode runs per process")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--from-logs", default=None,
                    help="build the JSON/PNG from child logs <shape>_<setting>_<round>.log in this folder")
    ap.add_argument("--provenance", default="{}", type=json.loads,
                    help="with --from-logs: JSON of where the logs were made (device, torch, triton, vllm, date)")
    ap.add_argument("--child", default=None, choices=SETTINGS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.shape, args.runs, args.batch, args.tokens)
    import torch
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    if args.from_logs:
        for log in sorted(Path(args.from_logs).glob("*_*_*.log")):
            m = re.match(r"(.+)_(stock|plugin)_(\d+)\.log$", log.name)
            if m and m.group(1) in (args.shape, args.shape.replace("0.5b", "")):
                processes.append(process_record(m.group(2), int(m.group(3)), log))
        prov = args.provenance
        device, vllm_version, torch_version, triton_version = (prov.get(k) for k in ("device", "vllm", "torch",
                                                                                      "triton"))
    else:
        import triton
        import vllm
        from tqdm import tqdm
        device, vllm_version = torch.cuda.get_device_name(), vllm.__version__
        torch_version, triton_version = torch.__version__, triton.__version__
        log_dir = out_dir / f"decode_logs_{args.shape}"
        log_dir.mkdir(exist_ok=True)
        bar = tqdm(total=args.rounds * len(SETTINGS), desc="decode A/B", unit="process")
        for r in range(1, args.rounds + 1):
            for s in SETTINGS:
                env = dict(os.environ, FLASHPREFILL="0" if s == "stock" else "1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                           PYTHONUNBUFFERED="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
                log = log_dir / f"{args.shape}_{s}_{r}.log"
                with open(log, "w") as f:
                    subprocess.run([sys.executable, __file__, "--child", s, "--shape", args.shape, "--runs",
                                    str(args.runs), "--batch", str(args.batch), "--tokens", str(args.tokens)],
                                   env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
                processes.append(process_record(s, r, log))
                tqdm.write(f"[decode] {args.shape} {s} round {r}: {processes[-1]['median_tok_s']} tok/s")
                bar.update(1)
        bar.close()
    result = {"shape": args.shape, "batch": args.batch, "tokens": args.tokens, "device": device,
              "torch": torch_version, "triton": triton_version, "vllm": vllm_version,
              "date": args.provenance.get("date") or datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "source": f"child logs in {args.from_logs}" if args.from_logs else "this run", "processes": processes,
              "summary": summarize(processes)}
    stem = f"bench_decode_{args.shape}" + (f"_{re.sub(r'[^a-z0-9]+', '-', device.lower())}" if device else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    _plot(result, out_dir / f"{stem}.png")
    s = result["summary"]
    adjusted = (f"; at equal host speed {s['plugin_change_host_adjusted'] * 100:+.2f}% "
                f"+- {s['plugin_change_host_adjusted_se'] * 100:.2f}%" if "plugin_change_host_adjusted" in s else "")
    print(f"stock {s['stock']['process_medians']} plugin {s['plugin']['process_medians']}; "
          f"plugin vs stock {s.get('plugin_change', float('nan')) * 100:+.2f}%{adjusted}  -> {out_dir / stem}.json")


if __name__ == "__main__":
    main()
