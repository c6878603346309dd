"""Prefill one long prompt with FlashPrefill off and on, in vLLM: time-to-first-token, density and the first tokens.

    python examples/offline_inference.py --model /path/to/hf_model --length 31000

With a CUDA GPU, vLLM and ``--model``: three child processes (the plugin reads ``FLASHPREFILL*`` when vLLM starts,
so a setting is fixed per engine), each loading the model once: FlashPrefill off (dense), on (timed), and on with
``FLASHPREFILL_LOG_DENSITY=1`` (untimed: logging the density reads the index back, one host sync per layer). It
prints TTFT dense vs sparse, the density the sparse prefill chose, and writes ``<stem>.json`` and ``<stem>.png``
(plus each child's log) into ``--out-dir``. vLLM's defaults stay on (chunked prefill, prefix caching).

Otherwise it says which of those three is missing and runs the sparse op itself on the CPU (plain-torch reference)
on a structured input, printing the density it chose and its error against dense attention (TTFT needs a GPU).
"""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

SETTINGS = {  # name: (environment, what it is)
    "dense": ({"FLASHPREFILL": "0", "FLASHPREFILL_LOG_DENSITY": "0"}, "FlashPrefill off (stock FlashAttention)"),
    "sparse": ({"FLASHPREFILL": "1", "FLASHPREFILL_LOG_DENSITY": "0"}, "FlashPrefill on"),
    "density": ({"FLASHPREFILL": "1", "FLASHPREFILL_LOG_DENSITY": "1"}, "FlashPrefill on, logging its density"),
}


def passkey_prompt(n_words: int) -> str:
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    body = [filler] * max(1, n_words // 18)
    body.insert(len(body) // 3, "The pass key is 68329. Remember it. 68329 is the pass key. ")
    return ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
            + "".join(body) + "\n\nWhat is the pass key? The pass key is")


def run_child(args) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model=args.model, max_model_len=args.length + 64, gpu_memory_utilization=0.8)
    tok = llm.get_tokenizer()
    # The filler runs at ~1.4 tokens per word; trim from the front (the pass key sits a third of the way in).
    ids = tok.encode(passkey_prompt(int(args.length / 1.3)))
    ids = ids[max(0, len(ids) - args.length):]
    params = SamplingParams(temperature=0.0, max_tokens=1)
    if args.child == "density":
        # One prefill of the prompt, nothing else, so every density line the plugin logs belongs to it.
        llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
        print("RESULT " + json.dumps({"tokens": len(ids)}), flush=True)
        return
    # Warm-up on other tokens than the prompt's start, so the timed run gets no prefix-cache hit from it.
    llm.generate([TokensPrompt(prompt_token_ids=ids[-1024:])], params, use_tqdm=False)
    t = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
    ttft = time.perf_counter() - t
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(temperature=0.0, max_tokens=12),
                       use_tqdm=False)[0].outputs[0].text
    print("RESULT " + json.dumps({"tokens": len(ids), "ttft_s": ttft, "text": out}), flush=True)


def start_child(name: str, args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, "--child", name, "--model", args.model, "--length",
                           str(args.length)], env=env, capture_output=True, text=True)


def cpu_demo_reasons(model) -> list[str]:
    """Which of the TTFT run's needs (a CUDA GPU, vLLM, a model) are missing here."""
    import torch
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("vllm") is None:
        reasons.append("vLLM is not installed")
    if model is None:
        reasons.append("no --model given")
    return reasons


def cpu_demo(length: int, alpha) -> None:
    """The sparse op alone on the CPU, in three announced steps (the reference takes tens of seconds)."""
    import torch

    from flashprefill_vllm import FlashPrefillConfig, block_density, block_sparse_attn_varlen_func
    from flashprefill_vllm import flash_prefill_varlen_func
    from flashprefill_vllm import synthetic

    hq, hkv, d = 4, 1, 64
    cfg = FlashPrefillConfig.from_env().replace(min_sparse_len=0, alpha=alpha)
    path = ("Triton kernels under the interpreter" if os.environ.get("TRITON_INTERPRET") == "1"
            else "plain-torch reference")
    print(f"Running the sparse op alone: {length} tokens, {hq} query / {hkv} KV heads, head_dim {d}, alpha "
          f"{cfg.alpha:g}, block {cfg.block_size}, on the CPU ({path}).", flush=True)

    def step(i: int, what: str, fn):
        print(f"[{i}/3] {what} ...", end="", flush=True)
        t0 = time.perf_counter()
        res = fn()
        print(f" {time.perf_counter() - t0:.1f} s", flush=True)
        return res

    q, k, v, cu = step(1, "structured input (a few attended key blocks per query block)", lambda: synthetic.structured_qkv(
        [length], hq, hkv, d, dtype=torch.bfloat16, device="cpu"))
    out, index = step(2, "sparse prefill: pick key blocks, attend over the kept ones", lambda: flash_prefill_varlen_func(
        q, k, v, cu, cu, length, length, config=cfg, return_index=True))
    dense = step(3, "dense attention over every block, for the error", lambda: block_sparse_attn_varlen_func(
        q, k, v, None, cu, cu, length, length))
    err = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
    print(f"density chosen: {block_density(index, cu, cu):.3f} of causally visible key blocks")
    print(f"output error vs dense attention: rel-L2 {err:.4f}")
    print("No timings on the CPU: the speed-up (time-to-first-token) is a GPU number.")


def _architectures(model: str) -> tuple:
    try:
        with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
            return tuple(json.load(f).get("architectures") or ())
    except (OSError, ValueError, AttributeError):
        return ()


def prompt_density(log_text: str, tokens: int, model: str) -> dict:
    """The density the sparse prefill chose, from the density child's log (chunks folded into the whole prompt)."""
    from flashprefill_vllm.eval import density_log
    from flashprefill_vllm.presets import active_preset

    lines = density_log.parse(log_text)
    block_size = active_preset(model, _architectures(model)).config.block_size
    return {"density": density_log.prompt_density(lines, tokens, block_size),
            "chunks": density_log.by_chunk(lines), "layer_lines": len(lines)}


def plot(path: str, result: dict) -> bool:
    from flashprefill_vllm.eval.plotting import pyplot
    plt = pyplot(quiet=True)
    if plt is None:
        return False
    dense, sparse = result["dense"]["ttft_s"] * 1e3, result["sparse"]["ttft_s"] * 1e3
    fig, ax = plt.subplots(figsize=(5.5, 4))
    bars = ax.bar(["FlashPrefill off\n(FlashAttention)", "FlashPrefill on"], [dense, sparse],
                  color=["#999999", "#1f77b4"])
    for bar, ms in zip(bars, (dense, sparse)):
        ax.annotate(f"{ms:.0f} ms", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom")
    density = result.get("density", {}).get("density")
    ax.set_ylabel("time to first token (ms)")
    ax.margins(y=0.15)
    ax.set_title(f"{os.path.basename(result['model'].rstrip('/'))}, {result['tokens']} tokens, {result['gpu']}\n"
                 f"speed-up x{dense / sparse:.2f}" + (f", density {density:.3f}" if density is not None else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def gpu_run(args) -> None:
    import torch
    gpu = torch.cuda.get_device_name()
    tag = re.sub(r"[^a-z0-9.]+", "-", os.path.basename(args.model.rstrip("/")).lower()).strip("-")
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"offline_inference_{tag}_{args.length}")
    settings = ["dense", "sparse"] + ([] if args.no_density else ["density"])
    result = {"model": args.model, "gpu": gpu, "length": args.length}
    for i, name in enumerate(settings, 1):
        env_changes, what = SETTINGS[name]
        print(f"[{i}/{len(settings)}] {what}: starting vLLM, loading the model, prefilling ~{args.length} tokens ...",
              end="", flush=True)
        t0 = time.perf_counter()
        proc = start_child(name, args, dict(os.environ, **env_changes))
        log = proc.stdout + proc.stderr
        with open(f"{stem}_{name}.log", "w") as f:
            f.write(log)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f" failed\n{log[-4000:]}")
            raise SystemExit(f"{what} failed (exit {proc.returncode}); log: {stem}_{name}.log")
        r = json.loads(lines[-1][7:])
        print(f" {time.perf_counter() - t0:.0f} s")
        if env_changes["FLASHPREFILL"] == "1" and "FlashPrefill: on (" not in log:
            print(f"  WARNING: no 'FlashPrefill: on (...)' line in {stem}_{name}.log: the plugin did not load "
                  f"(python -m flashprefill_vllm info says why)")
        if name == "density":
            result["density"] = prompt_density(log, r["tokens"], args.model)
        else:
            result[name] = r
            result["tokens"] = r["tokens"]
    dense, sparse = result["dense"], result["sparse"]
    print(f"\n{result['tokens']} prompt tokens on {gpu}")
    print(f"TTFT dense (FlashPrefill off): {dense['ttft_s'] * 1e3:8.0f} ms   continuation {dense['text']!r}")
    print(f"TTFT sparse (FlashPrefill on): {sparse['ttft_s'] * 1e3:8.0f} ms   continuation {sparse['text']!r}")
    print(f"speed-up: x{dense['ttft_s'] / sparse['ttft_s']:.2f}")
    if "density" in result:
        d = result["density"]
        if d["layer_lines"]:
            print(f"density chosen: {d['density']:.3f} of causally visible key blocks (mean over layers"
                  f"{', ' + str(len(d['chunks'])) + ' chunks' if len(d['chunks']) > 1 else ''})")
        else:
            print("density: no sparse prefill ran (prompt shorter than FLASHPREFILL_MIN_LEN?): the prompt ran dense")
    with open(f"{stem}.json", "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {stem}.json" + (f" and {stem}.png" if plot(f"{stem}.png", result) else
                                  " (matplotlib not installed: no PNG)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="local HF model folder or hub name (GPU + vLLM run)")
    ap.add_argument("--length", type=int, default=None,
                    help="prompt length in tokens (about); default 31000 with a GPU, 8192 for the CPU demo")
    ap.add_argument("--alpha", type=float, default=None, help="CPU demo: threshold (default FLASHPREFILL_ALPHA or "
                    "0.1); in vLLM set FLASHPREFILL_ALPHA or FLASHPREFILL_PRESET instead")
    ap.add_argument("--out-dir", default=".", help="where the GPU run writes its JSON, PNG and logs")
    ap.add_argument("--no-density", action="store_true", help="skip the third (density-logging) child")
    ap.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_child(args)
    reasons = cpu_demo_reasons(args.model)
    if reasons:
        print(f"CPU demo instead of the TTFT run in vLLM, because: {'; '.join(reasons)}.")
        if args.model is not None:
            print(f"  --model {args.model} is not used: the TTFT run needs a CUDA GPU, vLLM and --model.")
        else:
            print("  The TTFT run needs a CUDA GPU, vLLM and --model PATH.")
        return cpu_demo(min(args.length or 8192, 8192), args.alpha)
    args.length = args.length or 31000
    gpu_run(args)


if __name__ == "__main__":
    main()
