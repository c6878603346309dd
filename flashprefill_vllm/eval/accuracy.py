"""Accuracy of sparse prefill in vLLM: the same prompts with FlashPrefill off (dense) and on (sparse), side by side.

    python -m flashprefill_vllm.eval accuracy --model /path/to/hf_model --text /path/to/long_text.txt
    python -m flashprefill_vllm.eval accuracy --model /path/to/hf_model --quick          # built-in filler, needles only

The parent builds every prompt once (token ids, with the model's tokenizer), then starts one child process per
setting, since the plugin reads ``FLASHPREFILL*`` when vLLM starts:

- ``dense``: ``FLASHPREFILL=0`` (stock vLLM);
- ``sparse``: ``FLASHPREFILL=1 FLASHPREFILL_LOG_DENSITY=1``; every other ``FLASHPREFILL_*`` variable set by the
  user (e.g. ``FLASHPREFILL_ALPHA``) passes through;
- ``chunked``: stock vLLM again, each prompt prefilled in chunks of ``CHUNK_TOKENS`` (2048) tokens: the numerics
  floor. Run against ``dense`` (``--settings dense,chunked``, ``--reuse-dense`` skips the dense engine), it shows
  how far two dense runs that differ only in how the prefill is cut drift apart (greedy agreement, perplexity,
  needles); sparse results are judged against that floor, not against zero.

Each child builds ``vllm.LLM`` with prefix caching off and ``max_num_batched_tokens = max_model_len`` (every prompt
is one whole fresh prefill, the case the sparse path takes; ``chunked`` cuts it) and runs the prompts one request at a time, so each
density line the plugin logs belongs to one prompt. Measured:

(a) needles (:mod:`.needles`): greedy answers, hit or miss per (task, length, depth);
(b) perplexity of the first N tokens of ``--text`` (vLLM prompt logprobs), whole and per quarter, and its change;
(c) greedy agreement: the first 32 greedy tokens after prompts cut from ``--text`` at several lengths,
    position-wise agreement fraction and length of the identical prefix;
(d) the density the sparse run chose (kept fraction of causal key blocks), per prompt, length and layer.

Goals (checked and printed): no needle case that dense gets right is lost; ΔPPL <= +0.5%; first-32-token
agreement >= 95% (mean over the prompts that ran sparse). The parent writes
``accuracy_<model>_<device>.{json,png}`` (plus each child's JSON and log) under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import density_log, needles
from .plotting import pyplot

SETTINGS = ("dense", "sparse", "chunked")
DEFAULT_SETTINGS = ("dense", "sparse")
# The settings compared against dense (a run has at most one).
CANDIDATES = ("sparse", "chunked")
# Prefill chunk of the ``chunked`` setting (vLLM's max_num_batched_tokens).
CHUNK_TOKENS = 2048
DEFAULT_PPL_LENGTHS = (8192, 31744)
DEFAULT_AGREE_SAMPLES = 3
DEFAULT_GPU_MEMORY_UTILIZATION = 0.3
AGREE_TOKENS = 32
PPL_QUARTERS = 4
GOAL_MAX_DELTA_PPL_PCT = 0.5
GOAL_MIN_AGREEMENT = 0.95
# --quick: a small subset (two tasks, two lengths above the default length gate, one depth).
QUICK = {"tasks": ("passkey", "multikey"), "lengths": (8192, 16384), "depths": (0.5,), "ppl_lengths": (8192,),
         "agree_samples": 1}
# Bytes per (prompt token x vocab entry) that vLLM's prompt logprobs allocate at once outside its memory pool:
# model-dtype logits, the float32 copy and the float32 log-softmax.
PROMPT_LOGPROB_BYTES = 10

# Printed by the child around each request; the plugin's density lines in between belong to that request.
MARK = "@@flashprefill-eval"
_MARK_RE = re.compile(re.escape(MARK) + r" (begin|end) (\S+)")
PLUGIN_ENTRY_POINT = "flashprefill"
_OPTION_OF_KIND = {"needle": "--lengths", "agree": "--agree-lengths", "ppl": "--ppl-lengths"}


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be comma-separated integers >= 2, "
                                         "e.g. 8192,16384")
    return values


def _depths(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be comma-separated numbers in [0, 1], "
                                         "e.g. 0.1,0.5,0.9")
    return values


def _names(allowed: Sequence[str], what: str):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: unknown {what} {bad}; allowed: "
                                             + ", ".join(allowed))
        return values
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be a number in (0, 1]")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be an integer >= 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m flashprefill_vllm.eval accuracy",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF model folder or hub name (as vllm.LLM takes it)")
    ap.add_argument("--text", default=None,
                    help="UTF-8 text file (e.g. the KJV Bible): needle filler, perplexity and agreement prompts; "
                         "without it needles use the built-in filler and PPL/agreement are skipped")
    ap.add_argument("--filler", choices=("text", "repeat"), default=None,
                    help="needle filler: slices of --text (default when --text is given) or the repeated sentence")
    ap.add_argument("--tasks", type=_names(tuple(needles.TASKS), "task"), default=None,
                    help=f"needle tasks (default: all of {','.join(needles.TASKS)})")
    ap.add_argument("--lengths", type=_positive_ints, default=None,
                    help="needle prompt lengths in tokens (default: "
                         + ",".join(map(str, needles.DEFAULT_LENGTHS)) + ")")
    ap.add_argument("--depths", type=_depths, default=None,
                    help="relative needle depths (default: " + ",".join(map(str, needles.DEFAULT_DEPTHS)) + ")")
    ap.add_argument("--ppl-lengths", type=_positive_ints, default=None,
                    help="perplexity of the first N tokens of --text, for each N (default: "
                         + ",".join(map(str, DEFAULT_PPL_LENGTHS)) + ")")
    ap.add_argument("--agree-lengths", type=_positive_ints, default=None,
                    help="prompt lengths of the greedy-agreement prompts (default: --lengths)")
    ap.add_argument("--agree-samples", type=_count, default=None,
                    help=f"agreement prompts per length, at seeded text offsets (default {DEFAULT_AGREE_SAMPLES})")
    ap.add_argument("--settings", type=_names(SETTINGS, "setting"), default=DEFAULT_SETTINGS,
                    help="which runs: dense, and at most one of sparse and chunked (stock vLLM with the prefill cut "
                         f"in {CHUNK_TOKENS}-token chunks: the numerics floor); default dense,sparse")
    ap.add_argument("--max-model-len", type=_count, default=None,
                    help="vLLM max_model_len (default: the longest prompt plus its new tokens)")
    ap.add_argument("--gpu-memory-utilization", type=_fraction, default=DEFAULT_GPU_MEMORY_UTILIZATION,
                    help="vLLM gpu_memory_utilization (default %(default)s: prompt logprobs of a long perplexity "
                         "prompt need GPU memory outside vLLM's pool)")
    ap.add_argument("--reuse-dense", default=None, metavar="JSON",
                    help="a dense run's result JSON (<stem>_dense.json) from an earlier run of the same prompts: "
                         "used instead of running dense again (checked by the plan's fingerprint)")
    ap.add_argument("--out-dir", default="benchmarks/results", help="where results go (default %(default)s)")
    ap.add_argument("--tag", default="", help="added to the file names")
    ap.add_argument("--quick", action="store_true",
                    help="small subset: passkey and multikey at 8192 and 16384, depth 0.5, PPL at 8192, one "
                         "agreement prompt per length (options given explicitly win)")
    return ap


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parsed and completed options; invalid ones exit with argparse's message naming the option and value."""
    ap = build_parser()
    args = ap.parse_args(list(argv))
    defaults = {"tasks": tuple(needles.TASKS), "lengths": needles.DEFAULT_LENGTHS, "depths": needles.DEFAULT_DEPTHS,
                "ppl_lengths": DEFAULT_PPL_LENGTHS, "agree_samples": DEFAULT_AGREE_SAMPLES}
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick and name in QUICK else default)
    if args.agree_lengths is None:
        args.agree_lengths = args.lengths
    if sum(s in CANDIDATES for s in args.settings) > 1:
        ap.error(f"--settings {','.join(args.settings)}: at most one of {', '.join(CANDIDATES)} per run (each is "
                 "compared with dense; run them one after the other, --reuse-dense skips the second dense run)")
    if args.filler is None:
        args.filler = "text" if args.text else "repeat"
    if args.filler == "text" and not args.text:
        ap.error("--filler text needs --text FILE")
    if args.text and not Path(args.text).is_file():
        ap.error(f"--text {args.text!r}: no such file")
    return args


def special_prefix(tokenizer) -> list[int]:
    """The BOS token when the tokenizer adds one to plain text (Llama), else nothing (Qwen): token-id prompts skip
    the tokenizer, so the prompts carry it themselves (it counts toward their length)."""
    ids = list(tokenizer.encode("", add_special_tokens=True))
    bos = getattr(tokenizer, "bos_token_id", None)
    return ids[:1] if ids and bos is not None and ids[0] == bos else []


def needle_requests(prompts: Sequence[needles.NeedlePrompt]) -> list[dict]:
    return [{"id": p.id, "kind": "needle", "task": p.task, "length": p.length, "depth": p.depth,
             "answers": list(p.answers), "token_ids": list(p.token_ids), "max_tokens": p.max_new_tokens}
            for p in prompts]


def _check_text(text_ids: Sequence[int], need: int, option: str, value: int) -> None:
    if need > len(text_ids):
        raise ValueError(f"{option} {value}: --text has only {len(text_ids)} tokens")


def ppl_requests(text_ids: Sequence[int], lengths: Sequence[int], prefix: Sequence[int] = ()) -> list[dict]:
    """One prompt per N: ``prefix`` + the first tokens of the text, N tokens in all; one new token."""
    out = []
    for n in lengths:
        _check_text(text_ids, n - len(prefix), "--ppl-lengths", n)
        out.append({"id": f"ppl/{n}", "kind": "ppl", "length": n, "max_tokens": 1, "prompt_logprobs": True,
                    "token_ids": list(prefix) + list(text_ids[:n - len(prefix)])})
    return out


def agree_requests(text_ids: Sequence[int], lengths: Sequence[int], samples: int,
                   prefix: Sequence[int] = ()) -> list[dict]:
    """``samples`` prompts per length cut from the text at seeded offsets; 32 greedy tokens, EOS ignored."""
    out = []
    for n in lengths:
        _check_text(text_ids, n - len(prefix), "--agree-lengths", n)
        for s in range(samples):
            start = random.Random(f"agree/{n}/{s}").randrange(len(text_ids) - (n - len(prefix)) + 1)
            out.append({"id": f"agree/{n}/{s}", "kind": "agree", "length": n, "sample": s, "offset": start,
                        "max_tokens": AGREE_TOKENS, "ignore_eos": True,
                        "token_ids": list(prefix) + list(text_ids[start:start + n - len(prefix)])})
    return out


def _text_config(hf_config):
    """The language model's part of a (possibly multimodal) HF config."""
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def model_max_context(hf_config) -> int | None:
    """The context length vLLM derives from a HF config: ``max_position_embeddings``, times the RoPE factor for
    scalings that stretch it (yarn, linear, dynamic). ``None`` when the config does not say."""
    cfg = _text_config(hf_config)
    n = getattr(cfg, "max_position_embeddings", None)
    if n is None:
        return None
    rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", rope.get("type")) in ("yarn", "linear", "dynamic") and rope.get("factor"):
        n = int(n * rope["factor"])
    return n


def resolve_max_model_len(requests: Sequence[dict], max_model_len: int | None, model_max: int | None) -> int:
    """``max_model_len`` for the engines: the given one, or the longest prompt plus its new tokens.

    Raises:
        ValueError: naming the request and the option that set its length, when a request does not fit the given
            ``max_model_len`` or the model's context.
    """
    need = {r["id"]: len(r["token_ids"]) + r["max_tokens"] for r in requests}
    longest = max(need, key=need.get)
    req = next(r for r in requests if r["id"] == longest)
    what = (f"prompt {longest} (from {_OPTION_OF_KIND[req['kind']]} {req['length']}) needs {need[longest]} tokens "
            f"({len(req['token_ids'])} prompt + {req['max_tokens']} new)")
    if model_max is not None and max_model_len is not None and max_model_len > model_max:
        raise ValueError(f"--max-model-len {max_model_len} is more than the model's max context of {model_max} "
                         "tokens")
    if model_max is not None and need[longest] > model_max:
        raise ValueError(f"{what}, more than the model's max context of {model_max} tokens: use shorter lengths")
    if max_model_len is not None and need[longest] > max_model_len:
        raise ValueError(f"{what}, more than --max-model-len {max_model_len}")
    return max_model_len or need[longest]


def _sampling_params(req: dict):
    from vllm import SamplingParams
    if req.get("prompt_logprobs"):
        return SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    return SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], ignore_eos=req.get("ignore_eos", False))


def _record(output, req: dict) -> dict:
    """What the parent needs from one vLLM ``RequestOutput``: generated ids and text; for perplexity prompts the
    NLL and rank of every prompt token after the first."""
    gen = output.outputs[0]
    rec = {"token_ids": list(gen.token_ids), "text": gen.text or ""}
    if req.get("prompt_logprobs"):
        ids = req["token_ids"]
        entries = [output.prompt_logprobs[i][ids[i]] for i in range(1, len(ids))]
        rec["nll"] = [-e.logprob for e in entries]
        rec["rank"] = [e.rank for e in entries]
    return rec


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def run_child(setting: str, plan_path: Path, result_path: Path) -> None:
    """One engine, every request of the plan one at a time, results written after each (kept if a later one
    fails)."""
    import torch
    import vllm
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    plan = json.loads(plan_path.read_text())
    t0 = time.perf_counter()
    step_tokens = CHUNK_TOKENS if setting == "chunked" else plan["max_model_len"]
    llm = LLM(model=plan["model"], max_model_len=plan["max_model_len"],
              max_num_batched_tokens=step_tokens, enable_prefix_caching=False,
              gpu_memory_utilization=plan["gpu_memory_utilization"], seed=0)
    res = {"setting": setting, "max_num_batched_tokens": step_tokens, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "vllm": vllm.__version__, "triton": _triton_version(),
           "engine_start_s": time.perf_counter() - t0, "plan_sha256": plan_digest(plan), "results": {}}
    for req in plan["requests"]:
        print(f"{MARK} begin {req['id']}", flush=True)
        t = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=req["token_ids"])], _sampling_params(req),
                           use_tqdm=False)[0]
        res["results"][req["id"]] = dict(_record(out, req), seconds=time.perf_counter() - t)
        print(f"{MARK} end {req['id']}", flush=True)
        _write_json(result_path, res)


def plan_digest(plan: Mapping) -> str:
    """A fingerprint of what a run computes: the model, the engine settings and every request (prompt tokens and
    sampling). Two runs with equal digests ran the same prompts the same way."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def load_reused(path: str, plan: Mapping) -> dict:
    """A dense child's result from an earlier run, if it ran this exact plan to the end (``--reuse-dense``)."""
    try:
        res = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --reuse-dense {path!r}: cannot read it ({e})") from None
    if res.get("setting") != "dense":
        raise SystemExit(f"error: --reuse-dense {path!r}: not a dense run (setting {res.get('setting')!r})")
    if res.get("plan_sha256") != plan_digest(plan):
        raise SystemExit(f"error: --reuse-dense {path!r}: it ran other prompts or settings (model, lengths, text, "
                         "tasks, depths or max_model_len differ); run dense again")
    missing = [r["id"] for r in plan["requests"] if r["id"] not in res.get("results", {})]
    if missing:
        raise SystemExit(f"error: --reuse-dense {path!r}: incomplete ({len(missing)} prompts missing, e.g. "
                         f"{missing[0]}); run dense again")
    return res


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def child_main(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="accuracy --child")
    ap.add_argument("--child", choices=SETTINGS, required=True)
    ap.add_argument("--plan", type=Path, required=True)
    ap.add_argument("--result", type=Path, required=True)
    args = ap.parse_args(list(argv))
    run_child(args.child, args.plan, args.result)


def child_env(setting: str, environ: Mapping[str, str], package_root: str) -> dict[str, str]:
    """The environment of a setting's child: the caller's (user ``FLASHPREFILL_*`` knobs pass through), the switch
    for the setting, density logging for ``sparse``, and this package importable (with its vLLM entry point)."""
    env = dict(environ)
    env["FLASHPREFILL"] = "1" if setting == "sparse" else "0"
    if setting == "sparse":
        env["FLASHPREFILL_LOG_DENSITY"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, environ.get("PYTHONPATH", "")) if p)
    return env


def flashprefill_vars(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(env.items()) if k.startswith("FLASHPREFILL")}


def entry_point_visible(env: Mapping[str, str], name: str = PLUGIN_ENTRY_POINT) -> bool:
    """Whether a Python started with ``env`` sees the ``vllm.general_plugins`` entry point ``name`` (how vLLM
    finds the plugin in each of its processes: without it, ``FLASHPREFILL=1`` changes nothing)."""
    code = ("import importlib.metadata as m, sys; sys.exit(0 if any(e.name == %r for e in "
            "m.entry_points(group='vllm.general_plugins')) else 1)" % name)
    return subprocess.run([sys.executable, "-c", code], env=dict(env)).returncode == 0


def spawn_child(setting: str, env: Mapping[str, str], plan_path: Path, result_path: Path, log_path: Path,
                total: int) -> dict:
    """Run one setting's child, its output (and its engine's) into ``log_path``, a progress bar per request."""
    from tqdm import tqdm

    cmd = [sys.executable, "-m", "flashprefill_vllm.eval", "accuracy", "--child", setting, "--plan", str(plan_path),
           "--result", str(result_path)]
    result_path.unlink(missing_ok=True)
    with open(log_path, "w") as log, tqdm(total=total, desc=f"{setting:>6}", unit="prompt") as bar:
        proc = subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        for line in proc.stdout:
            log.write(line)
            m = _MARK_RE.search(line)
            if m and m.group(1) == "end":
                bar.update(1)
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        partial = f"; results so far in {result_path}" if result_path.exists() else ""
        raise SystemExit(f"{tail}\n{setting} run failed (exit code {rc}); full log {log_path}{partial}")
    return json.loads(result_path.read_text())


def parse_density_log(text: str, lengths: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """Per request id, the kept fraction per layer from the plugin's ``FLASHPREFILL_LOG_DENSITY`` lines, e.g.
    ``FlashPrefill model.layers.0.self_attn.attn: 1 prefill(s), 8192 tokens, kept 33.2% of causal key blocks``.

    A line belongs to the request whose begin/end markers enclose it; lines outside markers, or whose token count
    is not that request's prompt length (``lengths``), are ignored.
    """
    out: dict[str, dict[str, float]] = {}
    current = None
    for line in text.splitlines():
        m = _MARK_RE.search(line)
        if m:
            current = m.group(2) if m.group(1) == "begin" else None
            continue
        d = density_log.parse_line(line)
        if d and current is not None and d.tokens == lengths.get(current):
            out.setdefault(current, {})[d.layer] = d.density
    return out


def ppl_stats(nll: Sequence[float], ranks: Sequence[int] | None = None, quarters: int = PPL_QUARTERS) -> dict:
    """Mean NLL, perplexity, perplexity of each contiguous ``quarters``-th of the tokens and top-1 accuracy
    (fraction of tokens of rank 1)."""
    n = len(nll)
    if n < quarters:
        raise ValueError(f"need at least {quarters} scored tokens; got {n}")
    bounds = [round(n * q / quarters) for q in range(quarters + 1)]
    stats = {"tokens": n, "nll": statistics.fmean(nll), "ppl": math.exp(statistics.fmean(nll)),
             "quarters": [math.exp(statistics.fmean(nll[a:b])) for a, b in zip(bounds, bounds[1:])]}
    if ranks is not None:
        stats["top1"] = sum(r == 1 for r in ranks) / len(ranks)
    return stats


def delta_pct(dense: float, sparse: float) -> float:
    """Relative change of sparse against dense, in percent."""
    return 100.0 * (sparse / dense - 1.0)


def agreement(dense: Sequence[int], sparse: Sequence[int], n: int = AGREE_TOKENS) -> dict:
    """Position-wise agreement of the first ``n`` generated tokens (a missing token disagrees) and the length of
    the identical prefix."""
    a, b = list(dense[:n]), list(sparse[:n])
    width = max(len(a), len(b))
    same = [x == y for x, y in zip(a, b)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return {"agreement": sum(same) / width if width else 1.0, "exact_prefix": prefix}


def candidate(settings: Sequence[str]) -> str | None:
    """The setting compared with dense (``sparse`` or ``chunked``), or ``None`` when the run has no such pair."""
    others = [s for s in settings if s in CANDIDATES]
    return others[0] if "dense" in settings and len(others) == 1 else None


def _mean_density(layers: Mapping[str, float] | None) -> float | None:
    return statistics.fmean(layers.values()) if layers else None


def _needle_rows(requests, results, densities) -> list[dict]:
    rows = []
    for r in (r for r in requests if r["kind"] == "needle"):
        row = {"id": r["id"], "task": r["task"], "length": r["length"], "depth": r["depth"],
               "answers": r["answers"], "density": _mean_density(densities.get(r["id"]))}
        for s, res in results.items():
            text = res["results"][r["id"]]["text"]
            sc = needles.score_answers(r["answers"], text)
            row[s] = {"hit": sc.hit, "found": sc.found, "text": text}
        rows.append(row)
    return rows


def _ppl_rows(requests, results, densities) -> list[dict]:
    rows = []
    for r in (r for r in requests if r["kind"] == "ppl"):
        row = {"id": r["id"], "tokens": r["length"], "density": _mean_density(densities.get(r["id"]))}
        for s, res in results.items():
            rec = res["results"][r["id"]]
            row[s] = ppl_stats(rec["nll"], rec["rank"])
        cand = candidate(list(results))
        if cand:
            row["delta_ppl_pct"] = delta_pct(row["dense"]["ppl"], row[cand]["ppl"])
            row["delta_quarters_pct"] = [delta_pct(d, s) for d, s in zip(row["dense"]["quarters"],
                                                                          row[cand]["quarters"])]
        rows.append(row)
    return rows


def _agree_rows(requests, results, densities) -> list[dict]:
    rows = []
    for r in (r for r in requests if r["kind"] == "agree"):
        row = {"id": r["id"], "length": r["length"], "offset": r["offset"],
               "density": _mean_density(densities.get(r["id"]))}
        for s, res in results.items():
            row[f"{s}_text"] = res["results"][r["id"]]["text"]
        cand = candidate(list(results))
        if cand:
            row.update(agreement(results["dense"]["results"][r["id"]]["token_ids"],
                                 results[cand]["results"][r["id"]]["token_ids"]))
        rows.append(row)
    return rows


def _density_rows(requests, densities) -> list[dict]:
    """Per prompt length: mean / min / max over the prompts that ran sparse of their mean density, and the mean
    per layer."""
    by_length: dict[int, list[dict[str, float]]] = {}
    for r in requests:
        if r["id"] in densities:
            by_length.setdefault(len(r["token_ids"]), []).append(densities[r["id"]])
    rows = []
    for n, per_prompt in sorted(by_length.items()):
        means = [_mean_density(d) for d in per_prompt]
        layers = sorted({layer for d in per_prompt for layer in d}, key=_layer_order)
        rows.append({"length": n, "prompts": len(per_prompt), "mean": statistics.fmean(means), "min": min(means),
                     "max": max(means), "per_layer": {layer: statistics.fmean(d[layer] for d in per_prompt
                                                                               if layer in d)
                                                      for layer in layers}})
    return rows


def _layer_order(name: str) -> tuple:
    """Sort key putting ``model.layers.10`` after ``model.layers.9``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def check_goals(report: dict) -> dict | None:
    """The three goals of the candidate (``sparse`` or ``chunked``) against dense, from the merged rows (``None``
    unless dense and a candidate ran). For ``chunked`` they describe the numerics floor; ``sparse_ran`` is only
    required of ``sparse``."""
    cand = candidate(report["settings"])
    if cand is None:
        return None
    needle_rows = report["needles"]
    lost = [r["id"] for r in needle_rows if r["dense"]["hit"] and not r[cand]["hit"]]
    gained = [r["id"] for r in needle_rows if r[cand]["hit"] and not r["dense"]["hit"]]
    goals = {"candidate": cand,
             "needles": {"ok": not lost, "lost": lost, "gained": gained,
                         "dense_hits": sum(r["dense"]["hit"] for r in needle_rows),
                         f"{cand}_hits": sum(r[cand]["hit"] for r in needle_rows), "cases": len(needle_rows)}}
    if report["ppl"]:
        worst = max(report["ppl"], key=lambda r: r["delta_ppl_pct"])
        goals["ppl"] = {"ok": worst["delta_ppl_pct"] <= GOAL_MAX_DELTA_PPL_PCT,
                        "max_delta_pct": worst["delta_ppl_pct"], "at_tokens": worst["tokens"],
                        "limit_pct": GOAL_MAX_DELTA_PPL_PCT}
    if report["agreement"]:
        ran = [r for r in report["agreement"] if r["density"] is not None]
        over = ran or report["agreement"]
        mean = statistics.fmean(r["agreement"] for r in over)
        goals["agreement"] = {"ok": mean >= GOAL_MIN_AGREEMENT, "mean": mean, "prompts": len(over),
                              "over": "that ran sparse" if ran else "in all (none ran sparse)",
                              "limit": GOAL_MIN_AGREEMENT}
    goals["sparse_ran"] = bool(report["density"])
    goals["ok"] = (all(g["ok"] for g in goals.values() if isinstance(g, dict))
                   and (goals["sparse_ran"] or cand != "sparse"))
    return goals


def build_report(plan: dict, results: Mapping[str, dict], densities: Mapping[str, dict[str, float]],
                 meta: Mapping | None = None) -> dict:
    """Both children's results as one report: needle, perplexity, agreement and density rows, and the goals."""
    requests = plan["requests"]
    report = dict(meta or {}, model=plan["model"], max_model_len=plan["max_model_len"],
                  settings=list(results), needles=_needle_rows(requests, results, densities),
                  ppl=_ppl_rows(requests, results, densities), agreement=_agree_rows(requests, results, densities),
                  density=_density_rows(requests, densities))
    report["goals"] = check_goals(report)
    return report


def _hits(rows: Sequence[dict], setting: str) -> str:
    return f"{sum(r[setting]['hit'] for r in rows)}/{len(rows)}"


def _fmt_density(d: float | None) -> str:
    return "-" if d is None else f"{d:.2f}"


def format_report(report: dict) -> str:
    """The side-by-side table and the goals, as printed at the end of a run."""
    settings = report["settings"]
    lines = [f"model {report['model']}" + (f", {report['device']}" if "device" in report else "")]
    if report["needles"]:
        lines += ["", "Needles: hits over depths, " + " | ".join(settings) + "; density = mean kept fraction"]
        lines.append(f"{'task':<11}{'length':>8}  " + "".join(f"{s:>8}" for s in settings) + f"{'density':>9}")
        groups: dict[tuple, list[dict]] = {}
        for r in report["needles"]:
            groups.setdefault((r["task"], r["length"]), []).append(r)
        for (task, n), rows in groups.items():
            dens = [r["density"] for r in rows if r["density"] is not None]
            lines.append(f"{task:<11}{n:>8}  " + "".join(f"{_hits(rows, s):>8}" for s in settings)
                         + f"{_fmt_density(statistics.fmean(dens) if dens else None):>9}")
    if report["ppl"]:
        lines += ["", "Perplexity of the text's first N tokens (quarters in brackets)"]
        for r in report["ppl"]:
            parts = [f"{s} {r[s]['ppl']:.3f} [" + ", ".join(f"{q:.2f}" for q in r[s]["quarters"]) + "]"
                     for s in settings]
            delta = f"  dPPL {r['delta_ppl_pct']:+.2f}%" if "delta_ppl_pct" in r else ""
            lines.append(f"N={r['tokens']:<6} " + "  ".join(parts) + delta + f"  density {_fmt_density(r['density'])}")
    if report["agreement"] and "agreement" in report["agreement"][0]:
        lines += ["", f"Greedy agreement of the first {AGREE_TOKENS} tokens (mean over prompts)"]
        by_len: dict[int, list[dict]] = {}
        for r in report["agreement"]:
            by_len.setdefault(r["length"], []).append(r)
        for n, rows in by_len.items():
            dens = [r["density"] for r in rows if r["density"] is not None]
            lines.append(f"length {n:<6} agreement {statistics.fmean(r['agreement'] for r in rows):6.1%}  "
                         f"exact prefix {statistics.fmean(r['exact_prefix'] for r in rows):5.1f}  "
                         f"density {_fmt_density(statistics.fmean(dens) if dens else None)}")
    if report["density"]:
        lines += ["", "Density the sparse run chose, per prompt length (mean over prompts; min-max)"]
        lines += [f"length {r['length']:<6} {r['mean']:.3f} ({r['min']:.3f}-{r['max']:.3f}) over {r['prompts']} "
                  f"prompt(s)" for r in report["density"]]
    lines += ["", *format_goals(report["goals"])]
    return "\n".join(lines)


def format_goals(goals: dict | None) -> list[str]:
    if goals is None:
        return ["Goals: not checked (they compare dense with sparse or chunked; run dense and one of them)"]
    verdict = {True: "PASS", False: "FAIL"}
    cand = goals.get("candidate", "sparse")
    g = goals["needles"]
    lines = [f"Goals ({cand} against dense)" + (": the numerics floor of two dense runs" if cand == "chunked"
                                                else "") + ":",
             f"  needles: no case that dense gets right is lost: {verdict[g['ok']]} "
             f"(dense {g['dense_hits']}/{g['cases']}, {cand} {g[f'{cand}_hits']}/{g['cases']}"
             + (f"; lost: {', '.join(g['lost'])}" if g["lost"] else "") + ")"]
    if "ppl" in goals:
        g = goals["ppl"]
        lines.append(f"  perplexity: dPPL <= +{g['limit_pct']}%: {verdict[g['ok']]} "
                     f"(worst {g['max_delta_pct']:+.2f}% at N={g['at_tokens']})")
    if "agreement" in goals:
        g = goals["agreement"]
        lines.append(f"  agreement: first {AGREE_TOKENS} greedy tokens >= {g['limit']:.0%}: {verdict[g['ok']]} "
                     f"({g['mean']:.1%} over {g['prompts']} prompt(s) {g['over']})")
    if cand == "sparse" and not goals["sparse_ran"]:
        lines.append("  WARNING: no density line was logged: the sparse path never ran (is the plugin installed, "
                     "and are the prompts >= FLASHPREFILL_MIN_LEN?)")
    lines.append(f"  overall: {verdict[goals['ok']]}")
    return lines


def plot_report(report: dict, path: Path) -> bool:
    """A 2x2 PNG: needle hits per task x length (dense | sparse), dPPL per N, agreement per length, density per
    length (mean over layers, with the per-layer range). Returns False when matplotlib is missing."""
    plt = pyplot(quiet=True)
    if plt is None:
        return False
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    _plot_needles(ax[0, 0], report)
    _plot_ppl(ax[0, 1], report)
    _plot_agreement(ax[1, 0], report)
    _plot_density(ax[1, 1], report)
    fig.suptitle(f"FlashPrefill accuracy, {report['model']}" + (f", {report['device']}" if "device" in report
                                                                else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_needles(ax, report: dict) -> None:
    rows, settings = report["needles"], report["settings"]
    ax.set_title("needle hits over depths (" + " | ".join(settings) + "); red: a dense hit lost", fontsize=9)
    if not rows:
        ax.axis("off")
        return
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    grid = [[0.0] * len(lengths) for _ in tasks]
    for i, t in enumerate(tasks):
        for j, n in enumerate(lengths):
            cell = [r for r in rows if r["task"] == t and r["length"] == n]
            cand = candidate(settings)
            lost = any(r["dense"]["hit"] and not r[cand]["hit"] for r in cell) if cand else False
            grid[i][j] = -1.0 if lost else sum(r[settings[-1]]["hit"] for r in cell) / len(cell)
            ax.text(j, i, " | ".join(_hits(cell, s) for s in settings), ha="center", va="center", fontsize=8)
    ax.imshow(grid, cmap="RdYlGn", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xlabel("prompt tokens")


def _plot_ppl(ax, report: dict) -> None:
    rows = [r for r in report["ppl"] if "delta_ppl_pct" in r]
    ax.set_title(f"perplexity change {candidate(report['settings']) or 'sparse'} vs dense, whole (blue) and quarters (orange); goal <= "
                 f"+{GOAL_MAX_DELTA_PPL_PCT}%", fontsize=9)
    if not rows:
        ax.text(0.5, 0.5, "not measured (needs --text and both settings)", ha="center", transform=ax.transAxes)
        return
    width = 0.8 / (PPL_QUARTERS + 1)
    for k, r in enumerate(rows):
        vals = [r["delta_ppl_pct"]] + r["delta_quarters_pct"]
        ax.bar([k + (q - PPL_QUARTERS / 2) * width for q in range(len(vals))], vals, width,
               color=["C0"] + ["C1"] * PPL_QUARTERS, edgecolor="white")
    ax.axhline(GOAL_MAX_DELTA_PPL_PCT, color="red", lw=0.8, ls="--")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(rows)), [f"N={r['tokens']}" for r in rows], fontsize=8)
    ax.set_ylabel("dPPL %")


def _plot_agreement(ax, report: dict) -> None:
    rows = [r for r in report["agreement"] if "agreement" in r]
    ax.set_title(f"greedy agreement, first {AGREE_TOKENS} tokens (goal >= {GOAL_MIN_AGREEMENT:.0%})", fontsize=9)
    if not rows:
        ax.text(0.5, 0.5, "not measured (needs --text and both settings)", ha="center", transform=ax.transAxes)
        return
    lengths = sorted({r["length"] for r in rows})
    agree = [statistics.fmean(r["agreement"] for r in rows if r["length"] == n) for n in lengths]
    prefix = [statistics.fmean(r["exact_prefix"] for r in rows if r["length"] == n) / AGREE_TOKENS
              for n in lengths]
    ax.plot(lengths, agree, "o-", label="position-wise agreement")
    ax.plot(lengths, prefix, "s--", label=f"exact prefix / {AGREE_TOKENS}")
    ax.axhline(GOAL_MIN_AGREEMENT, color="red", lw=0.8, ls="--")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("prompt tokens")
    ax.legend(fontsize=8)


def _plot_density(ax, report: dict) -> None:
    rows = report["density"]
    ax.set_title("kept fraction of causal key blocks (sparse run)", fontsize=9)
    if not rows:
        ax.text(0.5, 0.5, "no density logged", ha="center", transform=ax.transAxes)
        return
    lengths, mean = [r["length"] for r in rows], [r["mean"] for r in rows]
    low = [m - min(r["per_layer"].values()) for m, r in zip(mean, rows)]
    high = [max(r["per_layer"].values()) - m for m, r in zip(mean, rows)]
    ax.errorbar(lengths, mean, yerr=[low, high], fmt="o-", capsize=4,
                label="mean over layers and prompts (bars: range of the per-layer means)")
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("prompt tokens")
    ax.legend(fontsize=8)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def load_model_info(model: str):
    """The model's tokenizer and HF config (the parent needs no GPU and no vLLM)."""
    from transformers import AutoConfig, AutoTokenizer
    return AutoTokenizer.from_pretrained(model), AutoConfig.from_pretrained(model)


def build_plan(args: argparse.Namespace, tokenizer, model_max: int | None) -> dict:
    """Every request of the run (needles, then agreement, then perplexity: its large logprob allocation last) and
    the engine settings; raises ValueError on a length that cannot be built or does not fit."""
    prefix = special_prefix(tokenizer)
    text_ids = None
    if args.text:
        print(f"tokenizing {args.text} ...", flush=True)
        text_ids = tokenizer.encode(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=False)
    filler = (needles.Filler(f"text:{Path(args.text).name}", text_ids, seeded_offset=True)
              if args.filler == "text" else needles.Filler.repeat(tokenizer))
    requests = needle_requests(needles.generate(tokenizer, filler, tasks=args.tasks, lengths=args.lengths,
                                                depths=args.depths, prefix=prefix))
    if text_ids is not None:
        requests += agree_requests(text_ids, args.agree_lengths, args.agree_samples, prefix)
        requests += ppl_requests(text_ids, args.ppl_lengths, prefix)
    return {"model": args.model, "filler": filler.name, "prefix": prefix,
            "max_model_len": resolve_max_model_len(requests, args.max_model_len, model_max),
            "gpu_memory_utilization": args.gpu_memory_utilization, "requests": requests}


def prepare(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[dict, dict, dict]:
    """Everything checked before an engine starts: the children's environments, the plan and the run's metadata.
    Exits with a message on an invalid ``FLASHPREFILL_*`` value, a prompt that does not fit, or a missing plugin."""
    from ..config import FlashPrefillConfig

    envs = {s: child_env(s, environ, str(Path(__file__).resolve().parents[2])) for s in args.settings}
    try:
        sparse_config = dataclasses.asdict(FlashPrefillConfig.from_env(envs["sparse"])) if "sparse" in envs else None
        tokenizer, hf_config = load_model_info(args.model)
        plan = build_plan(args, tokenizer, model_max_context(hf_config))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if "sparse" in envs and not entry_point_visible(envs["sparse"]):
        raise SystemExit(f"error: vLLM would not load the plugin: no '{PLUGIN_ENTRY_POINT}' entry point in group "
                         "vllm.general_plugins is visible; install this package (pip install -e .)")
    if not args.text:
        print("note: no --text given: needles use the built-in repeated filler; perplexity and greedy agreement "
              "are skipped (they need a long natural text)")
    ppl_max = max((len(r["token_ids"]) for r in plan["requests"] if r["kind"] == "ppl"), default=0)
    if ppl_max:
        vocab = getattr(_text_config(hf_config), "vocab_size", 0) or 0
        print(f"note: prompt logprobs over {ppl_max} tokens take about "
              f"{ppl_max * vocab * PROMPT_LOGPROB_BYTES / 2 ** 30:.1f} GiB of GPU memory outside vLLM's pool "
              f"(--gpu-memory-utilization {args.gpu_memory_utilization})")
    meta = {"filler": plan["filler"], "text": args.text, "sparse_config": sparse_config,
            "env": {s: flashprefill_vars(e) for s, e in envs.items()}}
    return envs, plan, meta


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--child" in argv:
        child_main(argv)
        return 0
    args = parse_args(argv)
    envs, plan, meta = prepare(args, os.environ)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"accuracy_{slug(Path(args.model.rstrip('/')).name)}" + (f"-{slug(args.tag)}" if args.tag else "")
    print(f"{len(plan['requests'])} prompts per setting, max_model_len {plan['max_model_len']}, "
          f"settings {','.join(args.settings)}", flush=True)
    results, logs = {}, {}
    with tempfile.TemporaryDirectory(prefix="fp_accuracy_") as tmp:
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(json.dumps(plan))
        for s in args.settings:
            if s == "dense" and args.reuse_dense:
                results[s] = load_reused(args.reuse_dense, plan)
                print(f"dense: reusing {args.reuse_dense}", flush=True)
                continue
            logs[s] = out_dir / f"{stem}_{s}.log"
            results[s] = spawn_child(s, envs[s], plan_path, out_dir / f"{stem}_{s}.json", logs[s],
                                     len(plan["requests"]))
    lengths = {r["id"]: len(r["token_ids"]) for r in plan["requests"]}
    densities = parse_density_log(logs["sparse"].read_text(), lengths) if "sparse" in logs else {}
    first = results[args.settings[0]]
    meta.update({k: first[k] for k in ("device", "torch", "triton", "vllm")},
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                engine_start_s={s: r["engine_start_s"] for s, r in results.items()})
    report = build_report(plan, results, densities, meta)
    base = out_dir / f"{stem}_{slug(report['device'])}"
    Path(f"{base}.json").write_text(json.dumps(report, indent=1))
    print("\n" + format_report(report))
    plotted = plot_report(report, Path(f"{base}.png"))
    print(f"\nwrote {base}.json" + (f" and {base}.png" if plotted else " (matplotlib missing: no plot)"))
    return 0
