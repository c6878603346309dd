#!/usr/bin/env python
"""Time-to-first-token in vLLM, dense (stock FlashAttention) vs FlashPrefill, plus decode throughput.

The parent process starts one child per setting (the plugin reads ``FLASHPREFILL*`` in every vLLM process, so a
setting is fixed per engine) and merges their JSON into ``benchmarks/results/bench_ttft_<device>.{json,png}``.
Settings:

- ``dense``: stock vLLM (``FLASHPREFILL=0``).
- ``sparse``: ``FLASHPREFILL=1`` with ``--alpha``; timed without density logging (logging reads the index back,
  a host sync per layer). The density each prompt length chose comes from one extra untimed child (``density``,
  ``FLASHPREFILL_LOG_DENSITY=1``) that runs every length once.
- ``fixed``: FlashPrefill's real selection runs (its cost is paid), but attention then uses an index of a fixed
  density from ``--fixed-density`` (sink, local window and dense tail as always, other visible blocks drawn at
  random): the TTFT a model whose selection keeps that density would get. For dummy weights, where the threshold
  keeps nearly every block because random attention is near uniform.
- ``noattn``: the ceiling. Every prefill of every layer (``FLASHPREFILL_DENSE_LAYERS=0``) goes through FlashPrefill's
  path, which is replaced by a no-op: TTFT with prefill attention costing nothing (outputs are garbage; timing only).

The ``dense`` and ``sparse`` children also time decode (one process each: on a small, host-bound model that number
varies between processes more than the plugin could change it; ``bench_decode.py`` runs the A/B that resolves it).

Every child runs the engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): ``fixed`` and ``noattn`` need it to
replace the backend's op, and all settings then pay the same front-end overhead. Default model: a Llama-3.1-8B-shaped config (32 layers, 32/8 heads, head_dim 128) with
``load_format="dummy"`` written to a temp folder (no weights needed, token-id prompts).

    python benchmarks/bench_ttft.py --settings dense,fixed,noattn --fixed-density 0.05,0.1,0.2 \
        --lengths 4096,16384,32768,65536,131071
    python benchmarks/bench_ttft.py --model /path/to/hf_model --settings dense,sparse --lengths 8192,16384,31744
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


def _fixed_density_op(densities: dict, seed: int = 0):
    """A stand-in for the backend's ``flash_prefill_varlen_func``: the real selection (its cost is paid; its index is
    dropped), then attention over a fixed-density index built once per (length, heads, density)."""
    import torch
    from flashprefill_vllm.ops import block_sparse_attn_varlen_func, flash_prefill_block_index
    from flashprefill_vllm.ops import flash_prefill_varlen_func as real_op
    from flashprefill_vllm.ops.reference import mask_to_ids
    from flashprefill_vllm.ops.block_sparse_index import BlockSparseIndex
    from flashprefill_vllm.ops.utils import cdiv

    cache = {}

    def index_for(q_len, seq_len, hq, cfg, device):
        d = densities["current"]
        key = (q_len, seq_len, hq, d, cfg.block_size)
        if key not in cache:
            nq, nk = cdiv(q_len, cfg.block_size), cdiv(seq_len, cfg.block_size)
            i = torch.arange(nq, device=device)[:, None] + (nk - nq)     # bottom-right: query block -> key block
            j = torch.arange(nk, device=device)[None, :]
            visible = j <= i
            forced = visible & ((j < cfg.num_sink_blocks) | (j > i - cfg.num_local_blocks)
                                | (i >= nk - cfg.num_dense_tail_blocks))
            nv, nf = int(visible.sum()), int(forced.sum())
            p = min(max((d * nv - nf) / max(nv - nf, 1), 0.0), 1.0)
            g = torch.Generator(device=device).manual_seed(seed)
            extra = visible & (torch.rand(hq, nq, nk, generator=g, device=device) < p)
            keep = forced[None] | extra
            count, ids = mask_to_ids(keep)
            cache[key] = (BlockSparseIndex(count[:, None], ids[:, None], cfg.block_size, 1),
                          float(keep.sum()) / (hq * nv))
        return cache[key]

    def op(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, *, config=None, out=None, return_index=False,
           **paged):
        if densities["current"] is None:            # engine start (kernel warm-up): the real op
            return real_op(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, config=config, out=out,
                           return_index=return_index, **paged)
        paged.pop("dense_tail", None)
        flash_prefill_block_index(q, k, cu_q, cu_k, max_q, max_k, softmax_scale, config=config, **paged)
        if cu_q.numel() != 2:
            raise SystemExit("the fixed-density setting expects one request per op call")
        # One request per call: max_q / max_k are its exact lengths (the backend passes them so).
        index, densities["actual"] = index_for(max_q, max_k, q.shape[1], config, q.device)
        block_sparse_attn_varlen_func(q, k, v, index, cu_q, cu_k, max_q, max_k, softmax_scale, out=out, **paged)
        return (out, index) if return_index else out

    return op


def _no_attention_op(q, k, v, *args, out=None, return_index=False, **_):
    """The ceiling's stand-in: prefill attention that costs nothing."""
    return (out, None) if return_index else out


def child(args) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    import random

    lengths = [int(x) for x in args.lengths.split(",")]
    max_len = max(lengths) + 1 if args.max_model_len is None else args.max_model_len
    kw = dict(model=args.model, skip_tokenizer_init=True, max_model_len=max_len, gpu_memory_utilization=0.85,
              seed=0)
    if args.model_is_dummy:
        kw["load_format"] = "dummy"
    if args.hf_overrides:
        kw["hf_overrides"] = json.loads(args.hf_overrides)
    if args.chunk_size == "default":
        # vLLM's defaults as a user gets them: chunked prefill with vLLM's own per-step token budget (16384 for
        # LLM() on an H100 in 0.26), prefix caching on. The prompts are random, so they never hit the prefix cache;
        # every chunk after the first attends over the cached context.
        kw.update(enable_prefix_caching=True)
    elif args.chunk_size != "0":
        # Chunked prefill with this token budget per step, prefix caching on.
        kw.update(max_num_batched_tokens=int(args.chunk_size), enable_prefix_caching=True)
    else:
        # Whole-prompt prefills (no chunks): every long prompt is one fresh prefill.
        kw.update(max_num_batched_tokens=max_len, enable_prefix_caching=False)
    densities = {"current": None, "actual": None}
    if args.child in ("fixed", "noattn"):
        from flashprefill_vllm.backends import sparse_forward
        sparse_forward.flash_prefill_varlen_func = (_fixed_density_op(densities) if args.child == "fixed"
                                                    else _no_attention_op)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    start_s = time.perf_counter() - t0
    sched = getattr(getattr(llm.llm_engine, "vllm_config", None), "scheduler_config", None)
    budget = getattr(sched, "max_num_batched_tokens", None)
    print(f"[sched] max_num_batched_tokens={budget}", flush=True)
    rng = random.Random(0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    one = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
    records = []
    fixed = [float(x) for x in args.fixed_density.split(",")] if args.child == "fixed" else [None]
    reps = 0 if args.child == "density" else args.reps
    for L in lengths:
        for d in fixed:
            densities["current"] = d
            times = []
            for rep in range(reps + 1):          # first run of each (length, density) is a warm-up
                prompt = TokensPrompt(prompt_token_ids=[rng.randrange(100, vocab) for _ in range(L)])
                t = time.perf_counter()
                llm.generate([prompt], one, use_tqdm=False)
                if rep or not reps:
                    times.append(time.perf_counter() - t)
            rec = {"length": L, "ttft_s": statistics.median(times), "ttft_all_s": times}
            if d is not None:
                rec.update(fixed_density=d, index_density=densities["actual"])
            records.append(rec)
            print(f"[ttft] {args.child} L={L}{f' density={d}' if d is not None else ''} "
                  f"ttft={statistics.median(times) * 1e3:.1f} ms", flush=True)
    if args.child == "density":
        with open(args.out, "w") as f:
            json.dump({"setting": args.child, "ttft": records, "max_num_batched_tokens": budget}, f)
        return
    # Decode throughput: a batch of short prompts, many new tokens (decode-only steps dominate); median of 3.
    decode_tps = None
    if args.child in ("dense", "sparse"):
        dec = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, vocab) for _ in range(512)])
                   for _ in range(args.decode_batch)]
        llm.generate(prompts[:2], dec, use_tqdm=False)
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            llm.generate(prompts, dec, use_tqdm=False)
            runs.append(args.decode_batch * args.decode_tokens / (time.perf_counter() - t))
        decode_tps = statistics.median(runs)
        print(f"[decode] {args.child} {decode_tps:.0f} tok/s (runs {', '.join(f'{r:.0f}' for r in runs)})",
              flush=True)
    with open(args.out, "w") as f:
        json.dump({"setting": args.child, "engine_start_s": start_s, "ttft": records, "decode_tok_s": decode_tps,
                   "decode_batch": args.decode_batch, "decode_tokens": args.decode_tokens,
                   "max_num_batched_tokens": budget}, f)


def _sparse_label(summary: dict) -> str:
    knobs = ", ".join(f"{k} {summary.get(k) if summary.get(k) is not None else 'default'}" for k in ("alpha", "tau"))
    return f"FlashPrefill ({knobs})"


def run_child(setting: str, args, out: str) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["FLASHPREFILL"] = "0" if setting == "dense" else "1"
    env["FLASHPREFILL_LOG_DENSITY"] = "1" if setting == "density" else "0"
    if setting != "dense":
        for name, value in (("FLASHPREFILL_ALPHA", args.alpha), ("FLASHPREFILL_TAU", args.tau)):
            if value is not None:                      # None: the package default (or the caller's variable)
                env[name] = str(value)
    if setting == "noattn":
        env["FLASHPREFILL_MIN_LEN"] = "1"             # every prefill takes the (replaced) FlashPrefill path
        env["FLASHPREFILL_DENSE_LAYERS"] = "0"        # in every layer: no layer left running stock attention
    # In-process engine for every setting: ``fixed``/``noattn`` need it (the child replaces the backend's op), and the
    # others then pay the same front-end overhead (no engine-core IPC), so the settings compare like for like.
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    cmd = [sys.executable, __file__, "--child", setting, "--out", out, "--model", args.model, "--lengths",
           args.lengths, "--reps", str(args.reps), "--decode-batch", str(args.decode_batch), "--decode-tokens",
           str(args.decode_tokens), "--fixed-density", args.fixed_density] \
        + (["--model-is-dummy"] if args.model_is_dummy else []) + ["--chunk-size", str(args.chunk_size)] \
        + (["--hf-overrides", args.hf_overrides] if args.hf_overrides else [])
    log = Path(out).with_suffix(".log")
    if setting in args.reuse and Path(out).exists():
        print(f"[reuse] {setting}: {out}", flush=True)
        proc = subprocess.CompletedProcess(cmd, 0)
    else:
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
    res["density_by_length"], res["density_by_chunk"] = densities_from_log(text, block_size_of(env))
    return res


def block_size_of(env) -> int:
    from flashprefill_vllm.config import FlashPrefillConfig
    return FlashPrefillConfig.from_env(env).block_size


def densities_from_log(text: str, block_size: int) -> tuple[dict, dict]:
    """From a child's log with the plugin's density lines: per prompt length, the prompt's density (chunks folded
    back into the whole prompt; rows that ran stock count as dense), and per length the density of each prefill
    step by its start position. A prompt's lines are those before its ``[ttft] ... L=<length>`` line."""
    from flashprefill_vllm.eval import density_log
    by_length, by_chunk, pending = {}, {}, []
    for line in text.splitlines():
        d = density_log.parse_line(line)
        if d is not None:
            pending.append(d)
            continue
        m = re.match(r"\[ttft\] \S+ L=(\d+)", line)
        if m:
            L = int(m.group(1))
            by_length[L] = density_log.prompt_density(pending, L, block_size)
            if pending:
                by_chunk[L] = density_log.by_chunk(pending)
            pending = []
    return by_length, by_chunk


def _table(runs: dict) -> list[dict]:
    """One row per prompt length (and fixed density): TTFT per setting, speed-ups vs dense, and the ceiling."""
    dense = {r["length"]: r["ttft_s"] for r in runs["dense"]["ttft"]}
    rows = []
    for L, t_dense in dense.items():
        base = {"length": L, "dense_ms": t_dense * 1e3}
        if "noattn" in runs:
            t0 = next(r["ttft_s"] for r in runs["noattn"]["ttft"] if r["length"] == L)
            base.update(noattn_ms=t0 * 1e3, ceiling_speedup=t_dense / t0)
        if "sparse" in runs:
            t = next(r["ttft_s"] for r in runs["sparse"]["ttft"] if r["length"] == L)
            base.update(sparse_ms=t * 1e3, speedup=t_dense / t,
                        density=runs.get("density", {}).get("density_by_length", {}).get(L))
            if "ceiling_speedup" in base:
                base["share_of_ceiling"] = base["speedup"] / base["ceiling_speedup"]
        if "fixed" not in runs:
            rows.append(base)
            continue
        for r in runs["fixed"]["ttft"]:
            if r["length"] == L:
                row = dict(base, fixed_density=r["fixed_density"], index_density=r["index_density"],
                           fixed_ms=r["ttft_s"] * 1e3, fixed_speedup=t_dense / r["ttft_s"])
                if "ceiling_speedup" in row:
                    row["fixed_share_of_ceiling"] = row["fixed_speedup"] / row["ceiling_speedup"]
                rows.append(row)
    return rows


def _plot(rows: list[dict], summary: dict, path: Path) -> None:
    from flashprefill_vllm.eval.plotting import pyplot
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    lengths = sorted({r["length"] for r in rows})
    first = {L: next(r for r in rows if r["length"] == L) for L in lengths}
    ax[0].loglog(lengths, [first[L]["dense_ms"] for L in lengths], "o-", label="dense (stock FA3)")
    series = []
    if "noattn_ms" in first[lengths[0]]:
        ax[0].loglog(lengths, [first[L]["noattn_ms"] for L in lengths], "k--", label="attention costs nothing")
        series.append(("ceiling", [first[L]["ceiling_speedup"] for L in lengths], "k--"))
    if "sparse_ms" in first[lengths[0]]:
        ax[0].loglog(lengths, [first[L]["sparse_ms"] for L in lengths], "o-",
                     label=_sparse_label(summary))
        series.append((_sparse_label(summary), [first[L]["speedup"] for L in lengths], "o-"))
    for d in sorted({r["fixed_density"] for r in rows if "fixed_density" in r}):
        pts = [r for r in rows if r.get("fixed_density") == d]
        ax[0].loglog([r["length"] for r in pts], [r["fixed_ms"] for r in pts], "s:",
                     label=f"FlashPrefill at density {d:g}")
        series.append((f"density {d:g}", [r["fixed_speedup"] for r in pts], "s:"))
    for label, ys, style in series:
        ax[1].semilogx(lengths, ys, style, label=label)
    ax[0].set_xlabel("prompt tokens"); ax[0].set_ylabel("TTFT ms"); ax[0].legend(fontsize=8); ax[0].grid(alpha=.3)
    ax[1].axhline(1.0, color="grey", lw=0.8)
    ax[1].set_xlabel("prompt tokens"); ax[1].set_ylabel("TTFT speed-up vs dense"); ax[1].legend(fontsize=8)
    ax[1].grid(alpha=.3)
    fig.suptitle(f"vLLM {summary['vllm']} TTFT, {summary['model']}, {summary['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _chunk_size(text: str) -> str:
    if text == "default" or (text.isdigit() and (int(text) == 0 or int(text) >= 16)):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: 0 (whole prompts), a token budget >= 16, or 'default'")


def _is_fraction(text: str) -> bool:
    try:
        return 0.0 < float(text) <= 1.0
    except ValueError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="dense,sparse")
    ap.add_argument("--lengths", default="4096,16384,32768,65536,131071")
    ap.add_argument("--alpha", type=float, default=None, help="FLASHPREFILL_ALPHA for the sparse runs (default: unset)")
    ap.add_argument("--tau", type=float, default=None, help="FLASHPREFILL_TAU, the mass floor (default: unset)")
    ap.add_argument("--model", default=None, help="HF model dir (default: Llama-3.1-8B-shaped dummy weights)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--hf-overrides", default=None,
                    help="JSON merged into the model's HF config (e.g. a RoPE scaling to serve past the trained "
                         "context; the model's own long-context recipe, not a benchmark trick)")
    ap.add_argument("--chunk-size", default="0", type=_chunk_size,
                    help="0: whole-prompt prefills; N: chunked prefill with N tokens per step and prefix caching on; "
                         "'default': vLLM's default scheduling (chunked prefill with its own budget, prefix caching)")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--child", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--model-is-dummy", action="store_true")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--reuse", default="", type=lambda x: [y for y in x.split(",") if y],
                    help="settings whose child JSON already exists in --out-dir are read instead of re-run")
    ap.add_argument("--fixed-density", default="0.05,0.1,0.2",
                    help="densities the 'fixed' setting sweeps (comma-separated, each in (0, 1])")
    args = ap.parse_args()
    if args.hf_overrides:
        try:
            if not isinstance(json.loads(args.hf_overrides), dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            ap.error(f"--hf-overrides {args.hf_overrides!r}: must be a JSON object ({e})")
    bad = [d for d in args.fixed_density.split(",") if not _is_fraction(d)]
    if bad:
        ap.error(f"--fixed-density {args.fixed_density!r}: each value must be a number in (0, 1]; got {bad}")
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
    settings = args.settings.split(",")
    unknown = set(settings) - {"dense", "sparse", "fixed", "noattn"}
    if unknown:
        raise SystemExit(f"--settings: unknown {sorted(unknown)}; allowed dense, sparse, fixed, noattn")
    if "sparse" in settings:
        settings.append("density")
    runs = {}
    from tqdm import tqdm
    for s in tqdm(settings, desc="bench_ttft", unit="setting"):
        runs[s] = run_child(s, args, str(out_dir / f"bench_ttft_{slug}_{s}.json"))
    import triton
    summary = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
               "vllm": vllm.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "model": "Llama-3.1-8B-shaped, load_format=dummy" if args.model_is_dummy else args.model,
               "alpha": args.alpha, "tau": args.tau, "chunk_size": None if args.chunk_size == "0" else args.chunk_size,
               "max_num_batched_tokens": next(iter(runs.values())).get("max_num_batched_tokens"), "runs": runs}
    if "dense" in runs:
        summary["table"] = rows = _table(runs)
        for r in rows:
            print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
        summary["decode_change"] = {s: runs[s]["decode_tok_s"] / runs["dense"]["decode_tok_s"] - 1
                                    for s in ("sparse",) if s in runs}
        for s, c in summary["decode_change"].items():
            print(f"decode tok/s dense {runs['dense']['decode_tok_s']:.0f} {s} {runs[s]['decode_tok_s']:.0f}"
                  f" ({c * 100:+.1f}%)")
        _plot(rows, summary, out_dir / f"bench_ttft_{slug}.png")
    for L, steps in runs.get("density", {}).get("density_by_chunk", {}).items():
        print(f"density per prefill step, L={L}: " + ", ".join(f"{s['start']}+{s['tokens']}: {s['density']:.3f}"
                                                              for s in steps))
    with open(out_dir / f"bench_ttft_{slug}.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {out_dir / f'bench_ttft_{slug}.json'}")


if __name__ == "__main__":
    main()
