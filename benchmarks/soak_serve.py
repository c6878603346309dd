"""Serve soak: ``vllm serve`` with FlashPrefill under bounded bursts of concurrent requests on 127.0.0.1.

Runs up to three phases on the same request plan, each a fresh server on the same model:

- ``stock``  (``FLASHPREFILL=0``): the reference answers;
- ``sparse`` (``FLASHPREFILL=1``, density logging on, your other ``FLASHPREFILL_*`` passed through);
- ``exact``  (``FLASHPREFILL=1``, ``FLASHPREFILL_ALPHA=1e-30``: every block kept, so greedy answers must equal stock's).

Each phase sends ``--bursts`` bursts of ``--burst-size`` concurrent requests (prompt lengths ``--min-len`` ..
``--max-len`` tokens, built from token ids so lengths are exact): greedy and sampled, streamed and not, some cancelled
mid-stream, some passkey retrievals, some malformed or over the context length. Checks (all must hold):

1. every well-formed request answers (HTTP 200 with text; a cancelled one got its first chunk);
2. every malformed or over-length request gets a 4xx, and ``/health`` answers 200 after every burst;
3. passkeys are retrieved by ``sparse`` at least as often as by ``stock`` on the same prompts (``--passkey-slack``);
4. ``exact``'s greedy outputs equal ``stock``'s;
5. GPU memory used after the last burst equals that after the first (within ``--mem-tolerance-mib``);
6. the ``sparse`` server log shows sparse prefills (density lines).

Writes ``benchmarks/results/soak_serve_<tag>.json`` and one server log per phase. Stdlib only (HTTP through urllib
in threads). Needs a GPU and vLLM; ``--help`` and the pure parts (``tests/benchmarks/test_soak_serve.py``) run anywhere.

    python benchmarks/soak_serve.py --model /path/to/hf_model --tag qwen05
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"
KINDS = ("greedy", "sampled", "cancel", "passkey", "malformed", "overlength")
DEFAULT_MIX = {"greedy": 0.3, "sampled": 0.2, "cancel": 0.1, "passkey": 0.2, "malformed": 0.1, "overlength": 0.1}
DENSITY_LINE = re.compile(r"FlashPrefill \S+: 1 prefill\(s\), (\d+) tokens, kept ([\d.]+)% of causal key blocks")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
PHASE_ENV = {"stock": {"FLASHPREFILL": "0"},
             "sparse": {"FLASHPREFILL": "1", "FLASHPREFILL_LOG_DENSITY": "1"},
             "exact": {"FLASHPREFILL": "1", "FLASHPREFILL_ALPHA": "1e-30"}}


# ----------------------------------------------------------------------------------------------------------------
# Pure parts: the request plan, request bodies, and the checks (tested on CPU).


@dataclasses.dataclass(frozen=True)
class Spec:
    """One request of the plan. ``length`` is the prompt's token count; ``passkey`` / ``depth`` only for kind
    ``passkey``; ``seed`` drives sampling (kind ``sampled``) and the prompt's filler offset."""

    index: int
    kind: str
    length: int
    stream: bool
    seed: int
    passkey: str = ""
    depth: float = 0.0

    @property
    def well_formed(self) -> bool:
        return self.kind not in ("malformed", "overlength")


def make_plan(n: int, seed: int, min_len: int, max_len: int, max_model_len: int,
              mix: dict[str, float] | None = None) -> list[Spec]:
    """``n`` requests in a reproducible order: kinds drawn with the weights of ``mix``, lengths log-uniform in
    ``[min_len, max_len]`` (over-length ones just past ``max_model_len``), streamed or not at random (cancelled
    ones always stream)."""
    if not 0 < min_len <= max_len < max_model_len:
        raise ValueError(f"need 0 < min_len <= max_len < max_model_len; got {min_len}, {max_len}, {max_model_len}")
    mix = mix or DEFAULT_MIX
    rng = random.Random(seed)
    kinds, weights = zip(*sorted(mix.items()))
    plan = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        length = int(round(min_len * (max_len / min_len) ** rng.random()))
        if kind == "overlength":
            length = max_model_len + rng.randint(1, 512)
        stream = kind == "cancel" or (kind in ("greedy", "sampled") and rng.random() < 0.5)
        passkey = f"{rng.randint(10000, 99999)}" if kind == "passkey" else ""
        depth = round(rng.uniform(0.05, 0.95), 3) if kind == "passkey" else 0.0
        plan.append(Spec(i, kind, length, stream, rng.randint(0, 2**31 - 1), passkey, depth))
    return plan


def prompt_ids(spec: Spec, filler: list[int], needle: list[int] | None = None,
               question: list[int] | None = None) -> list[int]:
    """The prompt's token ids, exactly ``spec.length`` long: filler tokens from an offset set by the seed, with (for
    passkeys) the needle at ``spec.depth`` and the question at the end."""
    needle, question = needle or [], question or []
    body = spec.length - len(needle) - len(question)
    if body < 1:
        raise ValueError(f"request {spec.index}: {spec.length} tokens cannot hold the needle and the question")
    start = spec.seed % len(filler)
    text = [filler[(start + j) % len(filler)] for j in range(body)]
    at = int(body * spec.depth)
    return text[:at] + needle + text[at:] + question


def request_body(spec: Spec, model: str, ids: list[int], max_tokens: int = 16) -> dict | str:
    """The ``/v1/completions`` body for ``spec`` (a broken JSON string for kind ``malformed``)."""
    if spec.kind == "malformed":
        variants = ['{"model": "%s", "prompt": [1, 2, 3], "max_tokens": -5}' % model,
                    '{"model": "%s", "max_tokens": 4' % model,
                    '{"model": "%s", "prompt": [1, 2], "temperature": "hot"}' % model]
        return variants[spec.seed % len(variants)]
    body = {"model": model, "prompt": ids, "max_tokens": 8 if spec.kind == "passkey" else max_tokens,
            "stream": spec.stream, "temperature": 0.0, "ignore_eos": spec.kind != "passkey"}
    if spec.kind == "sampled":
        body.update(temperature=0.8, top_p=0.95, seed=spec.seed)
    return body


def check_phase(plan: list[Spec], results: dict[int, dict], health: list[bool]) -> dict:
    """Checks 1 and 2 for one phase. ``results[i]``: ``{"status": int | None, "text": str, "error": str}``."""
    unanswered, not_rejected = [], []
    for spec in plan:
        r = results.get(spec.index, {"status": None, "text": ""})
        if spec.well_formed:
            if r.get("status") != 200 or (spec.kind != "cancel" and not r.get("text")):
                unanswered.append(spec.index)
        elif not (isinstance(r.get("status"), int) and 400 <= r["status"] < 500):
            not_rejected.append(spec.index)
    return {"well_formed_answered": not unanswered, "unanswered": unanswered[:50],
            "malformed_rejected_4xx": not not_rejected, "not_rejected": not_rejected[:50],
            "healthy_after_every_burst": bool(health) and all(health)}


def passkey_rate(plan: list[Spec], results: dict[int, dict]) -> float | None:
    """Share of passkey requests whose answer contains their key (``None`` if the plan has none)."""
    keys = [s for s in plan if s.kind == "passkey"]
    if not keys:
        return None
    return sum(s.passkey in results.get(s.index, {}).get("text", "") for s in keys) / len(keys)


def greedy_mismatches(plan: list[Spec], a: dict[int, dict], b: dict[int, dict]) -> list[int]:
    """Greedy, non-cancelled requests (passkeys included) whose texts differ between two phases."""
    return [s.index for s in plan if s.kind in ("greedy", "passkey")
            and a.get(s.index, {}).get("text") != b.get(s.index, {}).get("text")]


def memory_stable(used_mib: list[int], tolerance_mib: int) -> bool:
    """GPU memory after the last burst within ``tolerance_mib`` of that after the first."""
    return len(used_mib) >= 2 and abs(used_mib[-1] - used_mib[0]) <= tolerance_mib


def density_summary(log_text: str) -> dict:
    """How many sparse prefills a server log shows, and their mean kept share."""
    kept = [float(m.group(2)) for m in DENSITY_LINE.finditer(log_text)]
    return {"sparse_prefill_lines": len(kept), "mean_kept_percent": sum(kept) / len(kept) if kept else None}


def verdict(phases: dict[str, dict], passkey_slack: float) -> dict:
    """Checks 3-6 across phases (each absent phase leaves its check out) and the overall pass."""
    checks = {}
    for name, ph in phases.items():
        checks.update({f"{name}: {k}": v for k, v in ph["checks"].items() if isinstance(v, bool)})
        checks[f"{name}: gpu memory stable"] = ph["memory_stable"]
    if "stock" in phases and "sparse" in phases:
        s, p = phases["stock"]["passkey_rate"], phases["sparse"]["passkey_rate"]
        checks["sparse passkeys >= stock's"] = s is None or (p is not None and p + passkey_slack >= s)
    if "stock" in phases and "exact" in phases:
        checks["exact greedy == stock greedy"] = not phases["exact"]["greedy_mismatches_vs_stock"]
    if "sparse" in phases:
        checks["sparse log shows sparse prefills"] = phases["sparse"]["density"]["sparse_prefill_lines"] > 0
    return {"checks": checks, "passed": all(checks.values())}


# ----------------------------------------------------------------------------------------------------------------
# Server and client (GPU machine).


def _post(url: str, body, timeout: float, cancel: bool = False) -> dict:
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if isinstance(body, dict) and body.get("stream"):
                text = []
                for line in resp:
                    line = line.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    text.append(json.loads(line[5:])["choices"][0].get("text", ""))
                    if cancel:
                        break                          # closing the connection cancels the request server-side
                return {"status": resp.status, "text": "".join(text)}
            return {"status": resp.status, "text": json.loads(resp.read())["choices"][0]["text"]}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "text": "", "error": e.read()[:300].decode(errors="replace")}
    except Exception as e:  # noqa: BLE001 - recorded as unanswered
        return {"status": None, "text": "", "error": f"{type(e).__name__}: {e}"}


def _get_ok(url: str, timeout: float = 10.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except Exception:  # noqa: BLE001
        return False


def _tokenize(base: str, model: str, text: str) -> list[int]:
    r = urllib.request.Request(f"{base}/tokenize", data=json.dumps({"model": model, "prompt": text,
                                                                       "add_special_tokens": False}).encode(),
                               headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=60) as resp:
        return json.loads(resp.read())["tokens"]


def _gpu_used_mib() -> int | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout.split()
    return sum(int(x) for x in out) if out else None


def run_phase(name: str, args, plan: list[Spec], log_path: pathlib.Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FLASHPREFILL", "FLASHPREFILL_ALPHA")}
    env.update(PHASE_ENV[name])
    cmd = ["vllm", "serve", args.model, "--host", HOST, "--port", str(args.port), "--served-model-name", "soak",
           "--max-model-len", str(args.max_model_len), *args.serve_args]
    base = f"http://{HOST}:{args.port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + args.start_timeout
            while not _get_ok(f"{base}/health", 5):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: server did not come up (see {log_path})")
                time.sleep(5)
            filler = _tokenize(base, "soak", FILLER * 8)
            question = _tokenize(base, "soak", " What is the pass key? The pass key is")
            results, health, mem = {}, [], []
            for b in range(args.bursts):
                burst = plan[b * args.burst_size:(b + 1) * args.burst_size]
                with concurrent.futures.ThreadPoolExecutor(max_workers=len(burst)) as pool:
                    futures = {}
                    for spec in burst:
                        needle = (_tokenize(base, "soak", f" The pass key is {spec.passkey}. Remember it. ")
                                  if spec.kind == "passkey" else None)
                        ids = [] if spec.kind == "malformed" else prompt_ids(
                            spec, filler, needle, question if spec.kind == "passkey" else None)
                        body = request_body(spec, "soak", ids)
                        futures[pool.submit(_post, f"{base}/v1/completions", body, args.request_timeout,
                                            spec.kind == "cancel")] = spec.index
                    for f in concurrent.futures.as_completed(futures):
                        results[futures[f]] = f.result()
                health.append(_get_ok(f"{base}/health"))
                time.sleep(2)
                mem.append(_gpu_used_mib())
                print(f"[{name}] burst {b + 1}/{args.bursts}: healthy={health[-1]} gpu_mib={mem[-1]}", flush=True)
        finally:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    mem_known = [m for m in mem if m is not None]
    return {"results": {str(k): v for k, v in sorted(results.items())}, "health": health, "gpu_used_mib": mem,
            "checks": check_phase(plan, results, health), "passkey_rate": passkey_rate(plan, results),
            "memory_stable": memory_stable(mem_known, args.mem_tolerance_mib),
            "density": density_summary(log_path.read_text(errors="replace")), "log": log_path.name,
            "_results": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, help="model path or name passed to vllm serve")
    p.add_argument("--tag", default="run", help="suffix of the result files")
    p.add_argument("--phases", default="stock,sparse,exact", help="subset of stock,sparse,exact (in this order)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--bursts", type=int, default=3)
    p.add_argument("--burst-size", type=int, default=300, help="concurrent requests per burst")
    p.add_argument("--min-len", type=int, default=500)
    p.add_argument("--max-len", type=int, default=31000)
    p.add_argument("--max-model-len", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--passkey-slack", type=float, default=0.0, help="allowed drop of the sparse passkey rate")
    p.add_argument("--mem-tolerance-mib", type=int, default=256)
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--out-dir", type=pathlib.Path, default=RESULTS)
    p.add_argument("serve_args", nargs="*", help="extra vllm serve arguments (after --)")
    args = p.parse_args(argv)
    phases = [x for x in args.phases.split(",") if x]
    if not set(phases) <= set(PHASE_ENV):
        p.error(f"--phases: unknown {sorted(set(phases) - set(PHASE_ENV))}")
    plan = make_plan(args.bursts * args.burst_size, args.seed, args.min_len, args.max_len, args.max_model_len)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in phases:
        out[name] = run_phase(name, args, plan, args.out_dir / f"soak_serve_{args.tag}_{name}.log")
    if "stock" in out and "exact" in out:
        out["exact"]["greedy_mismatches_vs_stock"] = greedy_mismatches(plan, out["stock"]["_results"],
                                                                       out["exact"]["_results"])
    for ph in out.values():
        ph.pop("_results")
    summary = verdict(out, args.passkey_slack)
    record = {"model": args.model, "args": {k: str(v) for k, v in vars(args).items()},
              "plan": [dataclasses.asdict(s) for s in plan], "phases": out, **summary}
    path = args.out_dir / f"soak_serve_{args.tag}.json"
    path.write_text(json.dumps(record, indent=1))
    for check, ok in summary["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {check}")
    print(f"{'PASSED' if summary['passed'] else 'FAILED'}; {path}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
