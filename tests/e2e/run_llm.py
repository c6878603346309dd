"""One offline vLLM run for the e2e comparison: greedy tokens and top logprobs of a batch of long and short prompts.

The FlashPrefill settings come from the environment (``FLASHPREFILL=1`` or ``0``, ``FLASHPREFILL_*``): the
plugin's entry point reads them in every process vLLM starts. ``test_vllm_e2e.py`` runs this script once per
setting (``LLM()`` starts its own engine processes, so one process per configuration keeps the runs apart) and
compares the JSON files.

    FLASHPREFILL=1 FLASHPREFILL_LOG_DENSITY=1 python tests/e2e/run_llm.py --model DIR --out on.json
"""

from __future__ import annotations

import argparse
import json
import random


def make_prompts(llm, text_path: str | None, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Token-id prompts of exactly the given lengths: windows of a real text when one is given (real attention
    patterns), else seeded random ids from the model's vocabulary."""
    rng = random.Random(seed)
    if text_path is not None:
        with open(text_path, encoding="utf-8") as f:
            ids = llm.get_tokenizer().encode(f.read(), add_special_tokens=False)
        if len(ids) < max(lengths) + len(lengths):
            raise ValueError(f"{text_path} has {len(ids)} tokens; need more than {max(lengths)}")
        starts = [rng.randrange(0, len(ids) - n) for n in lengths]
        return [ids[s:s + n] for s, n in zip(starts, lengths)]
    vocab = llm.llm_engine.model_config.get_vocab_size()
    return [[rng.randrange(0, vocab) for _ in range(n)] for n in lengths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local HF model directory")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--text", default=None, help="text file to cut prompts from (default: random token ids)")
    parser.add_argument("--lengths", default="9000,100,12000,700,1500",
                        help="comma-separated prompt lengths in tokens, in submission order")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--logprobs", type=int, default=5)
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile / CUDA graphs")
    parser.add_argument("--attention-backend", default=None, help="e.g. CUSTOM (default: vLLM's choice)")
    parser.add_argument("--skip-tokenizer-init", action="store_true", help="for a model without a tokenizer")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="scheduler token budget per step (long prompts are prefilled in chunks of it)")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--hf-overrides", default=None, type=json.loads,
                        help="JSON merged into the model's HF config (e.g. a YaRN RoPE scaling for long prompts)")
    parser.add_argument("--shared-prefix", type=int, default=0,
                        help="after the batch, send one more prompt: the first prompt's first N tokens plus a new "
                             "tail, so it hits the prefix cache")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE before building the LLM (e.g. patches.patch_loader_vllm_0_12_0, the "
                             "explicit loader for that release; the repository root must be on PYTHONPATH)")
    args = parser.parse_args()

    import importlib
    for name in args.imports:
        importlib.import_module(name)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm_kwargs = dict(model=args.model, max_model_len=args.max_model_len, seed=0,
                      gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                      skip_tokenizer_init=args.skip_tokenizer_init)
    if args.attention_backend:
        llm_kwargs["attention_backend"] = args.attention_backend
    if args.max_num_batched_tokens:
        llm_kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    llm_kwargs["enable_prefix_caching"] = not args.no_prefix_caching
    if args.hf_overrides:
        llm_kwargs["hf_overrides"] = args.hf_overrides
    llm = LLM(**llm_kwargs)
    lengths = [int(n) for n in args.lengths.split(",")]
    prompts = make_prompts(llm, args.text, lengths)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=args.logprobs)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    if args.shared_prefix:
        # A second request sharing the first prompt's prefix, sent after the first finished: its prefix blocks are
        # in the prefix cache, so only its new tokens are prefilled (over cached context).
        tail = make_prompts(llm, args.text, [1500], seed=1)[0]
        prompts.append(prompts[0][:args.shared_prefix] + tail)
        lengths.append(len(prompts[-1]))
        outputs += llm.generate([TokensPrompt(prompt_token_ids=prompts[-1])], params)

    results = []
    for n, out in zip(lengths, outputs):
        completion = out.outputs[0]
        results.append({
            "prompt_len": n,
            "token_ids": list(completion.token_ids),
            # Per generated position: {token id: logprob} of the top candidates (and the chosen token).
            "logprobs": [{str(tok): lp.logprob for tok, lp in pos.items()} for pos in completion.logprobs],
        })
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"lengths": lengths, "results": results}, f)


if __name__ == "__main__":
    main()
