"""The serve soak's pure parts (``benchmarks/soak_serve.py``): the request plan, prompt and body construction, and
the checks it applies to a run. The soak itself needs a GPU and vLLM; ``--help`` works anywhere."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "soak_serve.py"
spec = importlib.util.spec_from_file_location("soak_serve", PATH)
soak = importlib.util.module_from_spec(spec)
sys.modules["soak_serve"] = soak
spec.loader.exec_module(soak)


def test_help_runs_without_vllm_or_a_gpu():
    proc = subprocess.run([sys.executable, str(PATH), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--burst-size" in proc.stdout and "exact" in proc.stdout


def test_plan_is_reproducible_and_covers_every_kind():
    plan = soak.make_plan(600, seed=3, min_len=500, max_len=31000, max_model_len=32768)
    assert plan == soak.make_plan(600, seed=3, min_len=500, max_len=31000, max_model_len=32768)
    assert {s.kind for s in plan} == set(soak.KINDS)
    for s in plan:
        if s.kind == "overlength":
            assert s.length > 32768 and not s.well_formed
        else:
            assert 500 <= s.length <= 31000
        assert s.stream or s.kind != "cancel"
        assert (len(s.passkey) == 5 and 0 < s.depth < 1) if s.kind == "passkey" else s.passkey == ""
    assert any(s.stream for s in plan if s.kind == "greedy") and any(not s.stream for s in plan if s.kind == "greedy")
    with pytest.raises(ValueError, match="max_model_len"):
        soak.make_plan(10, seed=0, min_len=500, max_len=40000, max_model_len=32768)


def test_prompt_has_the_exact_length_and_the_needle_at_its_depth():
    s = soak.Spec(index=0, kind="passkey", length=1000, stream=False, seed=7, passkey="12345", depth=0.25)
    needle, question = [900, 901, 902], [800, 801]
    ids = soak.prompt_ids(s, filler=list(range(50)), needle=needle, question=question)
    assert len(ids) == 1000 and ids[-2:] == question
    at = ids.index(900)
    assert ids[at:at + 3] == needle and at == int((1000 - 5) * 0.25)
    with pytest.raises(ValueError, match="cannot hold"):
        soak.prompt_ids(soak.Spec(1, "passkey", 4, False, 0, "1", 0.5), list(range(9)), needle, question)


def test_request_bodies():
    greedy = soak.Spec(0, "greedy", 600, True, 1)
    body = soak.request_body(greedy, "soak", [1, 2, 3])
    assert body["temperature"] == 0.0 and body["stream"] is True and body["prompt"] == [1, 2, 3]
    sampled = soak.request_body(soak.Spec(1, "sampled", 600, False, 99), "soak", [4])
    assert sampled["temperature"] > 0 and sampled["seed"] == 99
    for seed in range(3):
        bad = soak.request_body(soak.Spec(2, "malformed", 600, False, seed), "soak", [])
        assert isinstance(bad, str)
        try:
            parsed = json.loads(bad)
        except json.JSONDecodeError:
            continue                                   # broken JSON
        assert parsed.get("max_tokens", 1) < 0 or isinstance(parsed.get("temperature"), str)


def test_phase_checks():
    plan = [soak.Spec(0, "greedy", 600, False, 0), soak.Spec(1, "cancel", 600, True, 0),
            soak.Spec(2, "malformed", 600, False, 0), soak.Spec(3, "overlength", 40000, False, 0),
            soak.Spec(4, "passkey", 900, False, 0, "55555", 0.5)]
    good = {0: {"status": 200, "text": "abc"}, 1: {"status": 200, "text": ""}, 2: {"status": 400, "text": ""},
            3: {"status": 400, "text": ""}, 4: {"status": 200, "text": " 55555."}}
    c = soak.check_phase(plan, good, [True, True])
    assert c["well_formed_answered"] and c["malformed_rejected_4xx"] and c["healthy_after_every_burst"]
    bad = {**good, 0: {"status": None, "text": "", "error": "timeout"}, 3: {"status": 500, "text": ""}}
    c = soak.check_phase(plan, bad, [True, False])
    assert c["unanswered"] == [0] and c["not_rejected"] == [3] and not c["healthy_after_every_burst"]
    assert soak.passkey_rate(plan, good) == 1.0 and soak.passkey_rate(plan, bad | {4: {"text": "no"}}) == 0.0
    assert soak.greedy_mismatches(plan, good, good) == []
    assert soak.greedy_mismatches(plan, good, {**good, 4: {"text": "x"}}) == [4]


def test_memory_density_and_verdict():
    assert soak.memory_stable([70000, 70100, 70150], 256) and not soak.memory_stable([70000, 71000], 256)
    assert not soak.memory_stable([70000], 256)
    log = ("INFO FlashPrefill model.layers.0.self_attn.attn: 1 prefill(s), 8192 tokens, kept 33.2% of causal key "
           "blocks\nINFO FlashPrefill model.layers.1.self_attn.attn: 1 prefill(s), 2048 tokens, kept 10.0% of causal "
           "key blocks (6144 cached tokens before them)\n")
    d = soak.density_summary(log)
    assert d["sparse_prefill_lines"] == 2 and abs(d["mean_kept_percent"] - 21.6) < 1e-9
    ok = {"well_formed_answered": True, "malformed_rejected_4xx": True, "healthy_after_every_burst": True}
    phases = {"stock": {"checks": ok, "memory_stable": True, "passkey_rate": 0.9},
              "sparse": {"checks": ok, "memory_stable": True, "passkey_rate": 0.9, "density": d},
              "exact": {"checks": ok, "memory_stable": True, "passkey_rate": 0.9, "greedy_mismatches_vs_stock": []}}
    assert soak.verdict(phases, 0.0)["passed"]
    phases["sparse"]["passkey_rate"] = 0.8
    v = soak.verdict(phases, 0.0)
    assert not v["passed"] and not v["checks"]["sparse passkeys >= stock's"]
    assert soak.verdict(phases, 0.1)["passed"]
    phases["exact"]["greedy_mismatches_vs_stock"] = [3]
    assert not soak.verdict(phases, 0.1)["checks"]["exact greedy == stock greedy"]
