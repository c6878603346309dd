"""The accuracy harness (flashprefill_vllm.eval.accuracy) without an engine: arguments, prompts, metrics, density
log parsing, the merged report and its goals, and the parent's whole flow with fake children."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_eval_needles import TEXT, WordTokenizer

from flashprefill_vllm.eval import __main__ as eval_main
from flashprefill_vllm.eval import accuracy as acc


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        acc.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_args_defaults_and_quick(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("x")
    a = acc.parse_args(["--model", "m", "--text", str(text)])
    assert a.lengths == (4096, 8192, 16384, 24576, 31744) and a.depths == (0.1, 0.5, 0.9)
    assert a.tasks == ("passkey", "multikey", "multivalue", "vartrack") and a.settings == ("dense", "sparse")
    assert a.ppl_lengths == (8192, 31744) and a.agree_lengths == a.lengths and a.filler == "text"
    q = acc.parse_args(["--model", "m", "--quick", "--lengths", "4096"])
    assert q.lengths == (4096,) and q.tasks == ("passkey", "multikey") and q.depths == (0.5,)
    assert q.filler == "repeat" and q.agree_samples == 1
    s = acc.parse_args(["--model", "m", "--settings", "sparse,sparse", "--tasks", "vartrack"])
    assert s.settings == ("sparse",) and s.tasks == ("vartrack",)


@pytest.mark.parametrize("argv, words", [
    (["--lengths", "8192,abc"], ["--lengths", "'8192,abc'", "integers"]),
    (["--lengths", "0"], ["--lengths", "'0'"]),
    (["--depths", "0.5,1.5"], ["--depths", "'0.5,1.5'", "[0, 1]"]),
    (["--tasks", "passkey,haystack"], ["--tasks", "haystack", "allowed: passkey, multikey, multivalue, vartrack"]),
    (["--settings", "dense,fast"], ["--settings", "fast", "allowed: dense, sparse"]),
    (["--gpu-memory-utilization", "1.5"], ["--gpu-memory-utilization", "'1.5'", "(0, 1]"]),
    (["--agree-samples", "0"], ["--agree-samples", "'0'"]),
    (["--filler", "text"], ["--filler text needs --text"]),
    (["--text", "/nonexistent/kjv.txt"], ["--text", "/nonexistent/kjv.txt", "no such file"]),
])
def test_args_errors_name_option_and_value(capsys, argv, words):
    err = _error(capsys, ["--model", "m", *argv])
    for w in words:
        assert w in err


def test_args_model_required(capsys):
    assert "--model" in _error(capsys, ["--quick"])


def test_special_prefix():
    assert acc.special_prefix(WordTokenizer()) == []
    assert acc.special_prefix(WordTokenizer(bos=True)) == [0]


def test_ppl_and_agree_requests():
    tok = WordTokenizer()
    ids = tok.encode(TEXT, add_special_tokens=False)
    ppl = acc.ppl_requests(ids, [100, 1000], prefix=[0])
    assert [len(r["token_ids"]) for r in ppl] == [100, 1000]
    assert ppl[1]["token_ids"] == [0] + ids[:999] and ppl[0]["prompt_logprobs"] and ppl[0]["max_tokens"] == 1
    ag = acc.agree_requests(ids, [500, 900], 3)
    assert [len(r["token_ids"]) for r in ag] == [500] * 3 + [900] * 3
    assert len({r["offset"] for r in ag}) == 6
    assert all(r["token_ids"] == ids[r["offset"]:r["offset"] + r["length"]] for r in ag)
    assert all(r["max_tokens"] == 32 and r["ignore_eos"] for r in ag)
    assert acc.agree_requests(ids, [500], 3) == ag[:3]                 # seeded offsets
    with pytest.raises(ValueError, match="--ppl-lengths .* only"):
        acc.ppl_requests(ids, [len(ids) + 10])


def test_model_max_context():
    assert acc.model_max_context(SimpleNamespace(max_position_embeddings=32768)) == 32768
    yarn = SimpleNamespace(max_position_embeddings=32768, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert acc.model_max_context(yarn) == 131072
    llama3 = SimpleNamespace(max_position_embeddings=131072, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    assert acc.model_max_context(llama3) == 131072
    assert acc.model_max_context(SimpleNamespace()) is None


def test_resolve_max_model_len():
    reqs = [{"id": "needle/passkey/1000/0", "kind": "needle", "length": 1000, "token_ids": [1] * 1000,
             "max_tokens": 8},
            {"id": "ppl/1200", "kind": "ppl", "length": 1200, "token_ids": [1] * 1200, "max_tokens": 1}]
    assert acc.resolve_max_model_len(reqs, None, 4096) == 1201
    assert acc.resolve_max_model_len(reqs, 2000, 4096) == 2000
    with pytest.raises(ValueError, match=r"ppl/1200 \(from --ppl-lengths 1200\) needs 1201 .* max context of 1100"):
        acc.resolve_max_model_len(reqs, None, 1100)
    with pytest.raises(ValueError, match="needs 1201 .* --max-model-len 1100"):
        acc.resolve_max_model_len(reqs, 1100, None)
    with pytest.raises(ValueError, match="--max-model-len 5000 is more than .* 4096"):
        acc.resolve_max_model_len(reqs, 5000, 4096)


def test_ppl_stats_and_delta():
    nll = [math.log(10.0)] * 4 + [math.log(20.0)] * 4
    s = acc.ppl_stats(nll, [1, 2, 1, 1, 3, 1, 1, 5])
    assert s["tokens"] == 8 and s["ppl"] == pytest.approx(math.sqrt(200.0))
    assert s["quarters"] == pytest.approx([10.0, 10.0, 20.0, 20.0]) and s["top1"] == pytest.approx(5 / 8)
    assert acc.delta_pct(14.0, 14.07) == pytest.approx(0.5)
    assert acc.delta_pct(14.0, 13.93) == pytest.approx(-0.5)
    with pytest.raises(ValueError):
        acc.ppl_stats([1.0, 2.0])


def test_agreement():
    a = list(range(32))
    assert acc.agreement(a, a) == {"agreement": 1.0, "exact_prefix": 32}
    b = a[:5] + [99] + a[6:]
    assert acc.agreement(a, b) == {"agreement": 31 / 32, "exact_prefix": 5}
    assert acc.agreement(a, a[:16]) == {"agreement": 0.5, "exact_prefix": 16}
    assert acc.agreement(a + [7, 7], a + [8, 8]) == {"agreement": 1.0, "exact_prefix": 32}   # first 32 only


def _density_line(layer: int, tokens: int, pct: float) -> str:
    return (f"(EngineCore pid=42) INFO 11-24 17:32:25 [common.py:104] FlashPrefill model.layers.{layer}.self_attn.attn:"
            f" 1 prefill(s), {tokens} tokens, kept {pct:.1f}% of causal key blocks")


def test_parse_density_log():
    log = "\n".join([
        _density_line(0, 8192, 50.0),                            # before any marker: ignored
        f"{acc.MARK} begin ppl/8192",
        _density_line(0, 8192, 33.2), _density_line(1, 8192, 43.7),
        _density_line(2, 4096, 10.0),                            # another length: ignored
        f"{acc.MARK} end ppl/8192",
        _density_line(0, 8192, 90.0),                            # between requests: ignored
        f"{acc.MARK} begin needle/passkey/16384/1",
        "INFO some other line",
        _density_line(10, 16384, 20.0), _density_line(9, 16384, 30.0),
        f"{acc.MARK} end needle/passkey/16384/1",
        f"{acc.MARK} begin agree/4096/0", f"{acc.MARK} end agree/4096/0",
    ])
    got = acc.parse_density_log(log, {"ppl/8192": 8192, "needle/passkey/16384/1": 16384, "agree/4096/0": 4096})
    assert got == {"ppl/8192": pytest.approx({"model.layers.0.self_attn.attn": 0.332,
                                              "model.layers.1.self_attn.attn": 0.437}),
                   "needle/passkey/16384/1": pytest.approx({"model.layers.10.self_attn.attn": 0.2,
                                                            "model.layers.9.self_attn.attn": 0.3})}


def test_child_env():
    env = acc.child_env("sparse", {"FLASHPREFILL_ALPHA": "0.2", "PYTHONPATH": "/x", "FLASHPREFILL": "0"}, "/repo")
    assert env["FLASHPREFILL"] == "1" and env["FLASHPREFILL_LOG_DENSITY"] == "1"
    assert env["FLASHPREFILL_ALPHA"] == "0.2" and env["PYTHONPATH"].split(":") == ["/repo", "/x"]
    dense = acc.child_env("dense", {"FLASHPREFILL": "1"}, "/repo")
    assert dense["FLASHPREFILL"] == "0" and "FLASHPREFILL_LOG_DENSITY" not in dense and dense["PYTHONPATH"] == "/repo"
    assert acc.flashprefill_vars(env) == {"FLASHPREFILL": "1", "FLASHPREFILL_ALPHA": "0.2",
                                          "FLASHPREFILL_LOG_DENSITY": "1"}


def test_entry_point_visible(tmp_path):
    info = tmp_path / "fp_probe_eval-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fp-probe-eval\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\nfp_probe_eval = fp_probe_eval:register\n")
    env = acc.child_env("sparse", {"PATH": "/usr/bin:/bin"}, str(tmp_path))
    assert acc.entry_point_visible(env, "fp_probe_eval")
    assert not acc.entry_point_visible(env, "fp_no_such_plugin")


def test_record_reads_prompt_logprobs():
    lp = lambda v, r: SimpleNamespace(logprob=v, rank=r)   # noqa: E731
    out = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[9], text=None)],
                          prompt_logprobs=[None, {5: lp(-1.0, 1)}, {6: lp(-2.5, 3)}])
    rec = acc._record(out, {"token_ids": [4, 5, 6], "prompt_logprobs": True})
    assert rec == {"token_ids": [9], "text": "", "nll": [1.0, 2.5], "rank": [1, 3]}


def _plan() -> dict:
    reqs = [{"id": f"needle/passkey/{n}/{i}", "kind": "needle", "task": "passkey", "length": n, "depth": d,
             "answers": [str(11111 * (i + 1))], "token_ids": [1] * n, "max_tokens": 8}
            for n in (4096, 8192) for i, d in enumerate((0.1, 0.9))]
    reqs += [{"id": f"agree/{n}/0", "kind": "agree", "length": n, "sample": 0, "offset": 3, "token_ids": [1] * n,
              "max_tokens": 32, "ignore_eos": True} for n in (4096, 8192)]
    reqs += [{"id": "ppl/8192", "kind": "ppl", "length": 8192, "token_ids": [1] * 8192, "max_tokens": 1,
              "prompt_logprobs": True}]
    return {"model": "/models/tiny", "max_model_len": 8224, "requests": reqs, "filler": "repeat", "prefix": []}


def _fake_results(plan: dict, setting: str, *, lose: str | None = None, nll: float = 2.0,
                  diverge_at: int = 32) -> dict:
    res = {}
    for r in plan["requests"]:
        if r["kind"] == "needle":
            text = "" if r["id"] == lose else f" {r['answers'][0]}. Remember"
            res[r["id"]] = {"token_ids": [1], "text": text}
        elif r["kind"] == "agree":
            ids = list(range(32))
            if setting == "sparse" and r["length"] == 8192:
                ids[diverge_at:] = [0] * (32 - diverge_at)
            res[r["id"]] = {"token_ids": ids, "text": "t"}
        else:
            res[r["id"]] = {"token_ids": [1], "text": "", "nll": [nll] * 100, "rank": [1] * 50 + [2] * 50}
    return {"setting": setting, "device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6",
            "vllm": "0.26.0", "engine_start_s": 1.0, "results": res}


DENSITIES = {"needle/passkey/8192/0": {"l0": 0.4, "l1": 0.6}, "needle/passkey/8192/1": {"l0": 0.3, "l1": 0.5},
             "agree/8192/0": {"l0": 0.2, "l1": 0.4}, "ppl/8192": {"l0": 0.5, "l1": 0.5}}


def test_report_goals_pass():
    plan = _plan()
    results = {"dense": _fake_results(plan, "dense"), "sparse": _fake_results(plan, "sparse", nll=2.004)}
    rep = acc.build_report(plan, results, DENSITIES)
    assert [r["dense"]["hit"] and r["sparse"]["hit"] for r in rep["needles"]] == [True] * 4
    assert rep["needles"][0]["density"] is None and rep["needles"][2]["density"] == pytest.approx(0.5)
    assert rep["ppl"][0]["delta_ppl_pct"] == pytest.approx(100 * (math.exp(0.004) - 1))
    assert rep["ppl"][0]["sparse"]["top1"] == 0.5
    assert [r["agreement"] for r in rep["agreement"]] == [1.0, 1.0]
    dens = {r["length"]: r for r in rep["density"]}
    assert set(dens) == {8192} and dens[8192]["prompts"] == 4
    assert dens[8192]["per_layer"] == pytest.approx({"l0": 0.35, "l1": 0.5})
    assert dens[8192]["min"] == pytest.approx(0.3) and dens[8192]["max"] == pytest.approx(0.5)
    g = rep["goals"]
    assert g["ok"] and g["needles"]["ok"] and g["ppl"]["ok"] and g["agreement"]["ok"] and g["sparse_ran"]
    assert g["agreement"]["prompts"] == 1                      # only the agreement prompt that ran sparse
    text = acc.format_report(rep)
    assert "overall: PASS" in text and "passkey" in text and "FAIL" not in text


def test_report_goals_fail():
    plan = _plan()
    lost = "needle/passkey/8192/1"
    results = {"dense": _fake_results(plan, "dense"),
               "sparse": _fake_results(plan, "sparse", lose=lost, nll=2.01, diverge_at=20)}
    rep = acc.build_report(plan, results, DENSITIES)
    g = rep["goals"]
    assert g["needles"]["lost"] == [lost] and not g["needles"]["ok"]
    assert g["ppl"]["max_delta_pct"] == pytest.approx(100 * (math.exp(0.01) - 1)) and not g["ppl"]["ok"]
    assert g["agreement"]["mean"] == pytest.approx(20 / 32) and not g["agreement"]["ok"]
    assert not g["ok"]
    text = acc.format_report(rep)
    assert f"lost: {lost}" in text and "overall: FAIL" in text


def test_report_sparse_never_ran_fails():
    plan = _plan()
    results = {s: _fake_results(plan, s) for s in ("dense", "sparse")}
    rep = acc.build_report(plan, results, {})
    assert not rep["goals"]["sparse_ran"] and not rep["goals"]["ok"]
    assert "sparse path never ran" in acc.format_report(rep)


def test_report_chunked_is_the_numerics_floor():
    """``chunked`` (stock vLLM, prefill cut in chunks) is compared with dense like sparse is, labelled as the floor,
    and needs no density line (the plugin is off in it)."""
    plan = _plan()
    lost = "needle/passkey/4096/0"
    results = {"dense": _fake_results(plan, "dense"), "chunked": _fake_results(plan, "chunked", lose=lost)}
    rep = acc.build_report(plan, results, {})
    g = rep["goals"]
    assert g["candidate"] == "chunked" and g["needles"]["lost"] == [lost] and g["needles"]["chunked_hits"] == 3
    assert g["ppl"]["ok"] and g["agreement"]["ok"] and not g["ok"]
    assert rep["ppl"][0]["delta_ppl_pct"] == pytest.approx(0.0)
    text = acc.format_report(rep)
    assert "chunked against dense): the numerics floor" in text and "chunked 3/4" in text
    assert "sparse path never ran" not in text
    results["chunked"] = _fake_results(plan, "chunked")
    assert acc.build_report(plan, results, {})["goals"]["ok"]


def test_chunked_setting_runs_stock_vllm():
    env = acc.child_env("chunked", {"FLASHPREFILL": "1", "FLASHPREFILL_ALPHA": "0.2"}, "/repo")
    assert env["FLASHPREFILL"] == "0" and "FLASHPREFILL_LOG_DENSITY" not in env
    assert acc.candidate(("dense", "chunked")) == "chunked" and acc.candidate(("dense",)) is None
    assert acc.candidate(("sparse",)) is None


def test_settings_take_one_candidate(capsys):
    with pytest.raises(SystemExit):
        acc.parse_args(["--model", "m", "--settings", "dense,sparse,chunked"])
    assert "at most one of sparse, chunked" in capsys.readouterr().err
    assert acc.parse_args(["--model", "m", "--settings", "dense,chunked"]).settings == ("dense", "chunked")


def test_report_single_setting():
    plan = _plan()
    rep = acc.build_report(plan, {"dense": _fake_results(plan, "dense")}, {})
    assert rep["goals"] is None and "delta_ppl_pct" not in rep["ppl"][0] and "agreement" not in rep["agreement"][0]
    assert "not checked" in acc.format_report(rep)


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    plan = _plan()
    rep = acc.build_report(plan, {s: _fake_results(plan, s) for s in ("dense", "sparse")}, DENSITIES)
    assert acc.plot_report(rep, tmp_path / "a.png") and (tmp_path / "a.png").stat().st_size > 10_000


@pytest.fixture
def fake_model(monkeypatch):
    """The parent's model loading and children replaced: a word tokenizer, a 32K context, and children that answer
    every needle, logging densities in the sparse one."""
    calls = []
    monkeypatch.setattr(acc, "load_model_info", lambda model: (
        WordTokenizer(), SimpleNamespace(max_position_embeddings=32768, vocab_size=1000)))

    def spawn(setting, env, plan_path, result_path, log_path, total):
        plan = json.loads(Path(plan_path).read_text())
        calls.append((setting, env["FLASHPREFILL"], env.get("FLASHPREFILL_ALPHA"), total, len(plan["requests"])))
        lines = []
        for r in plan["requests"]:
            lines.append(f"{acc.MARK} begin {r['id']}")
            if setting == "sparse" and r["length"] >= 1000:
                lines += [_density_line(k, len(r["token_ids"]), 40.0) for k in range(2)]
            lines.append(f"{acc.MARK} end {r['id']}")
        Path(log_path).write_text("\n".join(lines))
        res = _fake_results(plan, setting)
        Path(result_path).write_text(json.dumps(res))
        return res

    monkeypatch.setattr(acc, "spawn_child", spawn)
    monkeypatch.setattr(acc, "entry_point_visible", lambda env: True)
    return calls


def test_main_end_to_end(tmp_path, fake_model, monkeypatch, capsys):
    monkeypatch.setenv("FLASHPREFILL_ALPHA", "0.15")
    text = tmp_path / "kjv.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    rc = acc.main(["--model", "/models/Tiny-Model", "--text", str(text), "--lengths", "600,1200", "--depths",
                   "0.5", "--tasks", "passkey,vartrack", "--ppl-lengths", "1500", "--agree-samples", "2",
                   "--out-dir", str(out), "--tag", "a1"])
    assert rc == 0
    n_req = 2 * 2 + 2 * 2 + 1
    assert fake_model == [("dense", "0", "0.15", n_req, n_req), ("sparse", "1", "0.15", n_req, n_req)]
    report = json.loads((out / "accuracy_tiny-model-a1_nvidia-h100-80gb-hbm3.json").read_text())
    assert report["sparse_config"]["alpha"] == 0.15 and report["env"]["sparse"]["FLASHPREFILL_LOG_DENSITY"] == "1"
    assert report["vllm"] == "0.26.0" and report["filler"] == "text:kjv.txt"
    assert report["max_model_len"] == 1501                      # the PPL prompt (1500) + 1 new token
    assert len(report["needles"]) == 4 and report["goals"]["ok"]
    assert [r["length"] for r in report["density"]] == [1200, 1500]
    printed = capsys.readouterr().out
    assert "overall: PASS" in printed and "Perplexity" in printed


def test_main_without_text_skips_ppl(tmp_path, fake_model, capsys):
    acc.main(["--model", "m", "--quick", "--lengths", "700", "--out-dir", str(tmp_path), "--settings", "sparse"])
    assert "perplexity and greedy agreement are skipped" in capsys.readouterr().out
    assert fake_model[0][:2] == ("sparse", "1") and fake_model[0][3] == 2    # 2 tasks x 1 length x 1 depth


def test_main_errors_before_engines(tmp_path, fake_model, monkeypatch):
    with pytest.raises(SystemExit, match=r"from --lengths 40000\) needs 40008 .* max context of 32768"):
        acc.main(["--model", "m", "--lengths", "40000", "--depths", "0.5", "--tasks", "passkey",
                  "--out-dir", str(tmp_path)])
    monkeypatch.setenv("FLASHPREFILL_ALPHA", "2")
    with pytest.raises(SystemExit, match="FLASHPREFILL_ALPHA='2'"):
        acc.main(["--model", "m", "--quick", "--out-dir", str(tmp_path)])
    monkeypatch.delenv("FLASHPREFILL_ALPHA")
    monkeypatch.setattr(acc, "entry_point_visible", lambda env: False)
    with pytest.raises(SystemExit, match="no 'flashprefill' entry point"):
        acc.main(["--model", "m", "--quick", "--out-dir", str(tmp_path)])
    assert fake_model == []


def test_eval_dispatch(capsys, monkeypatch):
    assert eval_main.main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    assert eval_main.main([]) == 2 and "accuracy" in capsys.readouterr().out
    monkeypatch.setitem(eval_main.COMMANDS, "notinstalled", ("flashprefill_vllm.eval.notinstalled", "x"))
    assert eval_main.main(["notinstalled"]) == 2 and "not available" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        eval_main.main(["accuracy", "--help"])
    assert e.value.code == 0 and "--max-model-len" in capsys.readouterr().out


def test_module_entry_point():
    """``python -m flashprefill_vllm.eval accuracy`` reaches the accuracy parser (and its errors)."""
    proc = subprocess.run([sys.executable, "-m", "flashprefill_vllm.eval", "accuracy", "--model", "m",
                           "--depths", "2"], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 2 and "argument --depths: invalid value '2'" in proc.stderr


def test_reuse_dense_only_for_the_same_plan_run_to_the_end(tmp_path):
    from flashprefill_vllm.eval.accuracy import load_reused, plan_digest

    plan = {"model": "m", "max_model_len": 64, "gpu_memory_utilization": 0.3,
            "requests": [{"id": "a", "token_ids": [1, 2, 3]}, {"id": "b", "token_ids": [4, 5]}]}
    assert plan_digest(plan) == plan_digest(json.loads(json.dumps(plan)))
    other = {**plan, "requests": [{"id": "a", "token_ids": [1, 2, 4]}, plan["requests"][1]]}
    assert plan_digest(other) != plan_digest(plan)
    done = {"setting": "dense", "plan_sha256": plan_digest(plan), "results": {"a": {}, "b": {}}}
    path = tmp_path / "dense.json"
    path.write_text(json.dumps(done))
    assert load_reused(str(path), plan) == done
    for bad, needle in [({**done, "setting": "sparse"}, "not a dense run"),
                        ({**done, "plan_sha256": plan_digest(other)}, "ran other prompts"),
                        ({**done, "results": {"a": {}}}, r"incomplete \(1 prompts missing, e.g. b\)")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(SystemExit, match=needle):
            load_reused(str(path), plan)
    with pytest.raises(SystemExit, match="cannot read it"):
        load_reused(str(tmp_path / "missing.json"), plan)
