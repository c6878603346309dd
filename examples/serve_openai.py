"""Query a `vllm serve` that runs with FlashPrefill, through the OpenAI client, with concurrent long prompts.

Start the server (one environment variable switches sparse prefill on):

    FLASHPREFILL=1 vllm serve Qwen/Qwen2.5-7B-Instruct --max-model-len 32768

and check its log for ``FlashPrefill: on (backend slots CUSTOM/FLASH_ATTN): prefills of sequences >= 8192 tokens run
sparse (...)``; without that line the plugin did not load (``python -m flashprefill_vllm info`` says why). Then run:

    python examples/serve_openai.py --base-url http://localhost:8000/v1 --concurrency 4

Each request carries a passkey hidden in a long filler text and asks for it back; the script prints each answer,
whether it found the key, and the time to the first token.
"""

import argparse
import concurrent.futures
import random
import time

from openai import OpenAI


def passkey_prompt(n_words: int, seed: int) -> tuple[str, str]:
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    chunks = [filler] * max(1, n_words // 18)
    chunks.insert(rng.randrange(len(chunks)), f"The pass key is {key}. Remember it. {key} is the pass key. ")
    text = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
            + "".join(chunks) + "\n\nWhat is the pass key? The pass key is")
    return text, key


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://localhost:8000/v1")
    ap.add_argument("--model", default=None, help="served model name (default: the server's first model)")
    ap.add_argument("--words", type=int, default=12000, help="filler words per prompt (~1.3 tokens each)")
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="EMPTY")
    model = args.model or client.models.list().data[0].id
    print(f"[serve] {args.concurrency} concurrent requests of ~{int(args.words * 1.3)} tokens to {model} at "
          f"{args.base_url} ...", flush=True)

    def one(i):
        prompt, key = passkey_prompt(args.words, seed=i)
        t0 = time.perf_counter()
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0.0, stream=True)
        first, text = None, ""
        for chunk in stream:
            if first is None:
                first = time.perf_counter() - t0
            text += chunk.choices[0].text
        return i, key, text, first

    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(one, range(args.concurrency)))
    hits = 0
    for i, key, text, ttft in results:
        hits += key in text
        print(f"[serve] request {i}: key {key} -> {text.strip()!r} ({'hit' if key in text else 'MISS'}), "
              f"first token after {ttft:.2f} s")
    print(f"[serve] {hits}/{len(results)} passkeys retrieved")


if __name__ == "__main__":
    main()
