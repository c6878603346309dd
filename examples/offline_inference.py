"""Prefill one long prompt with FlashPrefill off and on, in vLLM, and print time-to-first-token and the first tokens.

    python examples/offline_inference.py --model /path/to/hf_model --length 31000

Each setting runs in its own process (the plugin reads ``FLASHPREFILL*`` when vLLM starts). Without a GPU or
without vLLM, the same command runs the sparse op itself on the CPU through the plain-torch reference on a
structured input and prints the density it chose and its error against dense attention (TTFT needs a GPU).
"""

import argparse
import json
import os
import subprocess
import sys
import time


def passkey_prompt(n_words: int) -> str:
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    body = [filler] * max(1, n_words // 18)
    body.insert(len(body) // 3, "The pass key is 68329. Remember it. 68329 is the pass key. ")
    return ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
            + "".join(body) + "\n\nWhat is the pass key? The pass key is")


def run_one(args) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    # vLLM's defaults otherwise: chunked prefill (long prompts go through in chunks, each later chunk sparse over
    # the cached context) and prefix caching stay on.
    llm = LLM(model=args.model, max_model_len=args.length + 64, gpu_memory_utilization=0.8)
    tok = llm.get_tokenizer()
    # The filler runs at ~1.4 tokens per word; trim from the front (the pass key sits a third of the way in).
    ids = tok.encode(passkey_prompt(int(args.length / 1.3)))
    ids = ids[max(0, len(ids) - args.length):]
    params = SamplingParams(temperature=0.0, max_tokens=1)
    # Warm-up on other tokens than the prompt's start, so the timed run gets no prefix-cache hit from it.
    llm.generate([TokensPrompt(prompt_token_ids=ids[-1024:])], params, use_tqdm=False)
    t = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
    ttft = time.perf_counter() - t
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(temperature=0.0, max_tokens=12),
                       use_tqdm=False)[0].outputs[0].text
    print("RESULT " + json.dumps({"tokens": len(ids), "ttft_s": ttft, "text": out}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="local HF model folder (GPU + vLLM path)")
    ap.add_argument("--length", type=int, default=31000, help="prompt length in tokens (about)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_one(args)
    try:
        import torch
        import vllm  # noqa: F401
        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if not gpu or args.model is None:
        print("No GPU, no vLLM or no --model: running the op itself (examples/op_quickstart.py) instead.\n")
        sys.argv = [sys.argv[0], "--length", str(min(args.length, 8192))]
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import op_quickstart
        return op_quickstart.main()
    for flag in ("0", "1"):
        env = dict(os.environ, FLASHPREFILL=flag)
        proc = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--length",
                               str(args.length)], env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-2000:], proc.stderr[-3000:])
            raise SystemExit(f"FLASHPREFILL={flag} run failed")
        r = json.loads(lines[-1][7:])
        print(f"FlashPrefill {'on ' if flag == '1' else 'off'}: {r['tokens']} prompt tokens, "
              f"TTFT {r['ttft_s'] * 1e3:.0f} ms, continuation {r['text']!r}")


if __name__ == "__main__":
    main()
