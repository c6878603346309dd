"""Alpha presets: the file format (round trip, every validation error), built-in presets and ``auto`` matching,
the precedence rule against FLASHPREFILL_ALPHA / FLASHPREFILL_BLOCK_SIZE, and per-layer configs from layer names."""

import copy
import json
import logging

import pytest

from flashprefill_vllm import presets
from flashprefill_vllm.config import FlashPrefillConfig
from flashprefill_vllm.presets import (BUILTIN_PRESETS, ActivePreset, Preset, active_preset,
                                       active_preset_for_vllm, builtin_preset, config_for_layer, layer_index,
                                       load_preset, match_builtin, parse_preset, resolve_active, save_preset)

VALID = {
    "format": "flashprefill-preset", "version": 1, "name": "tiny-model",
    "match": {"names": ["*tiny-model"], "architectures": ["Qwen2ForCausalLM"]},
    "block_size": 64, "alpha": 0.12, "layer_alphas": {"0": 0.05, "17": 0.2},
    "provenance": "calibrated by flashprefill_vllm.eval.calibrate on 2026-01-01, target recall 0.97",
    "calibration": {"target": {"recall": 0.97}},
}


def write(tmp_path, data, name="preset.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_round_trip(tmp_path):
    path = write(tmp_path, VALID)
    preset = load_preset(path)
    assert preset.name == "tiny-model" and preset.block_size == 64 and preset.alpha == 0.12
    assert preset.layer_alphas == ((0, 0.05), (17, 0.2))
    assert preset.layer_alpha(17) == 0.2 and preset.layer_alpha(3) is None and preset.layer_alpha(None) is None
    assert preset.calibration == VALID["calibration"] and preset.source == str(path)
    assert preset.to_dict() == VALID
    out = tmp_path / "again.json"
    save_preset(preset, out)
    assert json.loads(out.read_text()) == VALID
    assert load_preset(out) == preset


def test_optional_fields_may_be_absent(tmp_path):
    data = {k: v for k, v in VALID.items() if k not in ("layer_alphas", "calibration")}
    data["match"] = {"names": ["x*"]}
    preset = load_preset(write(tmp_path, data))
    assert preset.layer_alphas == () and preset.calibration is None and preset.architectures == ()
    assert preset.to_dict() == data


def test_load_is_cached_but_sees_rewrites(tmp_path):
    path = write(tmp_path, VALID)
    assert load_preset(path) is load_preset(str(path))
    data = dict(VALID, alpha=0.3)
    path.write_text(json.dumps(data))
    import os
    os.utime(path, ns=(1, 10**18))  # another mtime, as a rewrite would give
    assert load_preset(path).alpha == 0.3


def mutate(path_or_key, value):
    data = copy.deepcopy(VALID)
    *parents, last = path_or_key
    target = data
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return data


@pytest.mark.parametrize("where,value,message", [
    (("format",), "flashprefill", "field 'format' is 'flashprefill'; must be 'flashprefill-preset'"),
    (("version",), 2, "field 'version' is 2; must be one of 1"),
    (("version",), True, "field 'version' is True; must be one of 1"),
    (("name",), "", "field 'name' is ''; must be a non-empty string"),
    (("name",), 3, "field 'name' is 3; must be a non-empty string"),
    (("match",), ["*x"], "field 'match' is ['*x']; must be an object"),
    (("match", "names"), [], "field 'match.names' is []; must be a non-empty list of non-empty strings"),
    (("match", "names"), "*x", "field 'match.names' is '*x'; must be a non-empty list"),
    (("match", "names"), KeyError, "field 'match.names' is None; must be a non-empty list of non-empty strings "
                                   "(it is required)"),
    (("match", "architectures"), [""], "field 'match.architectures' is ['']; must be a list of non-empty strings"),
    (("match", "model"), "x", "field 'match.model' is 'x'; must be absent (allowed fields: names, architectures)"),
    (("block_size",), 96, "field 'block_size' is 96; must be one of 64, 128, 256"),
    (("block_size",), "128", "field 'block_size' is '128'; must be one of 64, 128, 256"),
    (("alpha",), 0, "field 'alpha' is 0; must be a number in (0, 1]"),
    (("alpha",), 1.5, "field 'alpha' is 1.5; must be a number in (0, 1]"),
    (("alpha",), "0.1", "field 'alpha' is '0.1'; must be a number in (0, 1]"),
    (("alpha",), True, "field 'alpha' is True; must be a number in (0, 1]"),
    (("layer_alphas",), [0.1], "field 'layer_alphas' is [0.1]; must be an object mapping layer indices to alphas"),
    (("layer_alphas", "x"), 0.1, "field \"layer_alphas['x']\" is 'x'; must be a layer index written as a decimal "
                                 "string >= 0"),
    (("layer_alphas", "-1"), 0.1, "field \"layer_alphas['-1']\" is '-1'; must be a layer index"),
    (("layer_alphas", "3"), 2.0, "field \"layer_alphas['3']\" is 2.0; must be a number in (0, 1]"),
    (("layer_alphas", "017"), 0.1, "field 'layer_alphas' is"),
    (("provenance",), " ", "field 'provenance' is ' '; must be a non-empty string saying how"),
    (("calibration",), [1], "field 'calibration' is [1]; must be an object (the calibration summary) or null"),
    (("layer_alpha",), {"0": 0.1}, "field 'layer_alpha' is {'0': 0.1}; must be absent (allowed fields: format, "
                                   "version, name, match, block_size, alpha, tau, layer_alphas, provenance, "
                                   "calibration)"),
    (("tau",), 1.2, "field 'tau' is 1.2; must be a number in [0, 1] (the mass floor; 0: off) or absent"),
    (("tau",), "0.9", "field 'tau' is '0.9'; must be a number in [0, 1]"),
    (("alpha",), KeyError, "field 'alpha' is missing; it is required (required fields: format, version, name, "
                           "match, block_size, alpha, provenance)"),
])
def test_validation_errors_name_file_field_value_and_allowed(tmp_path, where, value, message):
    path = write(tmp_path, mutate(where, value))
    with pytest.raises(ValueError) as err:
        load_preset(path)
    assert str(err.value).startswith(f"preset {path}: ")
    assert message in str(err.value)


def test_file_level_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"preset .*missing\.json: cannot read the file"):
        load_preset(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"preset .*bad\.json: not valid JSON \(line 1 column 2"):
        load_preset(write(tmp_path, "{oops", "bad.json"))
    with pytest.raises(ValueError, match=r"preset .*list\.json: field '<top level>' is \[\]; must be a JSON object"):
        load_preset(write(tmp_path, [], "list.json"))


def test_builtins_are_published_values_marked_as_such():
    assert {n: (p.alpha, p.block_size) for n, p in BUILTIN_PRESETS.items()} == {
        "llama-3.1-8b-instruct": (0.18, 128), "qwen2.5-7b-instruct": (0.08, 128),
        "qwen3-30b-a3b-instruct-2507": (0.12, 128)}
    for preset in BUILTIN_PRESETS.values():
        assert preset.provenance.startswith("published, not re-derived under flashprefill_vllm's selection rule")
        assert preset.calibration is None and preset.layer_alphas == ()
        parse_preset(preset.to_dict())  # what a built-in holds is a valid file
    assert builtin_preset(" Qwen2.5-7B-Instruct ") is BUILTIN_PRESETS["qwen2.5-7b-instruct"]
    assert builtin_preset("qwen2.5-coder-0.5b-instruct") is None  # not measured yet: no invented numbers


@pytest.mark.parametrize("model,archs,want", [
    ("meta-llama/Llama-3.1-8B-Instruct", ["LlamaForCausalLM"], "llama-3.1-8b-instruct"),
    ("/models/Meta-Llama-3.1-8B-Instruct/", [], "llama-3.1-8b-instruct"),
    ("Qwen/Qwen2.5-7B-Instruct", ["Qwen2ForCausalLM"], "qwen2.5-7b-instruct"),
    ("Qwen/Qwen3-30B-A3B-Instruct-2507", ["Qwen3MoeForCausalLM"], "qwen3-30b-a3b-instruct-2507"),
    ("Qwen/Qwen2.5-7B-Instruct", ["LlamaForCausalLM"], None),       # name matches, architecture does not
    ("Qwen/Qwen2.5-Coder-0.5B-Instruct", ["Qwen2ForCausalLM"], None),  # same family, other model
    ("Qwen/Qwen2.5-7B-Instruct-1M", ["Qwen2ForCausalLM"], None),
    ("meta-llama/Llama-3.1-70B-Instruct", ["LlamaForCausalLM"], None),
    (None, ["LlamaForCausalLM"], None),
    ("", [], None),
])
def test_auto_matching(model, archs, want):
    got = match_builtin(model, archs)
    assert (got.name if got else None) == want


def test_most_specific_pattern_wins():
    general = parse_preset(dict(VALID, name="family", match={"names": ["*qwen*"]}))
    specific = parse_preset(dict(VALID, name="one", match={"names": ["*org/qwen-7b"]}))
    assert match_builtin("Org/Qwen-7B", [], presets=[general, specific]).name == "one"
    assert match_builtin("Org/Qwen-1B", [], presets=[general, specific]).name == "family"


CFG = FlashPrefillConfig()


def test_no_preset_keeps_config():
    assert resolve_active(None, CFG, frozenset()) == ActivePreset(CFG, None, "")


def test_named_preset_sets_alpha_and_block_size():
    active = resolve_active("qwen2.5-7b-instruct", CFG.replace(block_size=64), frozenset())
    assert active.config == CFG.replace(alpha=0.08, block_size=128)
    assert active.preset is BUILTIN_PRESETS["qwen2.5-7b-instruct"]
    assert (f"preset 'qwen2.5-7b-instruct': alpha=0.08, tau={CFG.tau:g}, block_size=128 (published, not re-derived"
            in active.message)


def test_file_preset_with_layer_alphas(tmp_path):
    path = write(tmp_path, VALID)
    active = resolve_active(str(path), CFG, frozenset())
    assert active.config == CFG.replace(alpha=0.12, block_size=64)
    assert active.preset.layer_alphas == ((0, 0.05), (17, 0.2))
    assert "per-layer alphas for 2 layers" in active.message
    assert config_for_layer(active.config, active.preset, "model.layers.17.self_attn.attn").alpha == 0.2
    assert config_for_layer(active.config, active.preset, "model.layers.5.self_attn.attn").alpha == 0.12


def test_explicit_alpha_beats_preset_and_drops_layer_alphas(tmp_path):
    path = write(tmp_path, VALID)
    active = resolve_active(str(path), CFG.replace(alpha=0.3), frozenset({"alpha"}))
    assert active.config == CFG.replace(alpha=0.3, block_size=64)
    assert active.preset.layer_alphas == ()
    assert "FLASHPREFILL_ALPHA=0.3 overrides its alpha 0.12; its 2 per-layer alphas are not used" in active.message
    for name in ("model.layers.0.self_attn.attn", "model.layers.17.self_attn.attn", "?"):
        assert config_for_layer(active.config, active.preset, name).alpha == 0.3


def test_preset_tau_applies_unless_flashprefill_tau_is_set(tmp_path):
    path = write(tmp_path, {**VALID, "tau": 0.8})
    assert load_preset(path).tau == 0.8 and load_preset(path).to_dict()["tau"] == 0.8
    active = resolve_active(str(path), CFG, frozenset())
    assert active.config.tau == 0.8 and "tau=0.8" in active.message
    explicit = resolve_active(str(path), CFG.replace(tau=0.5), frozenset({"tau"}))
    assert explicit.config.tau == 0.5
    # A preset without tau keeps the configured floor.
    assert resolve_active(str(write(tmp_path, VALID, "p2.json")), CFG.replace(tau=0.3), frozenset()).config.tau == 0.3


def test_explicit_block_size_that_differs(tmp_path):
    path = write(tmp_path, VALID)
    with pytest.raises(ValueError, match=r"invalid FLASHPREFILL_PRESET='.*preset\.json' with FLASHPREFILL_BLOCK_SIZE="
                                         r"128: the preset 'tiny-model' was derived at block size 64; unset"):
        resolve_active(str(path), CFG, frozenset({"block_size"}))
    same = resolve_active(str(path), CFG.replace(block_size=64), frozenset({"block_size"}))
    assert same.config.alpha == 0.12
    # auto: the matching preset is skipped, with the reason.
    active = resolve_active("auto", CFG.replace(block_size=64), frozenset({"block_size"}),
                            "meta-llama/Llama-3.1-8B-Instruct", ("LlamaForCausalLM",))
    assert active.config == CFG.replace(block_size=64) and active.preset is None
    assert (f"derived at block size 128, not FLASHPREFILL_BLOCK_SIZE=64; not using it (alpha={CFG.alpha:g})"
            in active.message)


def test_auto_resolves_or_falls_back_with_reason():
    active = resolve_active("auto", CFG, frozenset(), "Qwen/Qwen3-30B-A3B-Instruct-2507", ("Qwen3MoeForCausalLM",))
    assert active.config.alpha == 0.12 and "FLASHPREFILL_PRESET=auto matched model" in active.message
    miss = resolve_active("AUTO", CFG, frozenset(), "/models/my-model", ("MistralForCausalLM",))
    assert miss.config == CFG and miss.preset is None
    assert miss.message == ("FlashPrefill: FLASHPREFILL_PRESET=auto: no built-in preset matches model "
                            "'/models/my-model' (architectures MistralForCausalLM; built-in: llama-3.1-8b-instruct, "
                            f"qwen2.5-7b-instruct, qwen3-30b-a3b-instruct-2507); using alpha={CFG.alpha:g} (the default)")
    unknown = resolve_active("auto", CFG.replace(alpha=0.2), frozenset({"alpha"}), None)
    assert "model None (architectures unknown" in unknown.message and "alpha=0.2 from FLASHPREFILL_ALPHA" in \
        unknown.message


def test_unknown_spec_raises():
    with pytest.raises(ValueError, match="'nope' is neither a built-in preset"):
        resolve_active("nope", CFG, frozenset())


def test_active_preset_reads_env_once_and_logs_once(monkeypatch, caplog, tmp_path):
    path = write(tmp_path, VALID)
    monkeypatch.setenv("FLASHPREFILL_PRESET", str(path))
    monkeypatch.delenv("FLASHPREFILL_ALPHA", raising=False)
    monkeypatch.delenv("FLASHPREFILL_BLOCK_SIZE", raising=False)
    active_preset.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="flashprefill_vllm"):
            first = active_preset("/models/tiny-model", ("Qwen2ForCausalLM",))
            again = active_preset("/models/tiny-model", ["Qwen2ForCausalLM"])  # a list, as vLLM holds it
        assert first is again and first.config.alpha == 0.12
        assert sum("preset 'tiny-model'" in r.getMessage() for r in caplog.records) == 1
        monkeypatch.setenv("FLASHPREFILL_ALPHA", "0.5")
        assert active_preset("/models/tiny-model", ("Qwen2ForCausalLM",)) is first  # cached per process
    finally:
        active_preset.cache_clear()


def test_active_preset_for_vllm_reads_model_and_architectures(monkeypatch):
    import types
    monkeypatch.setenv("FLASHPREFILL_PRESET", "auto")
    for var in ("FLASHPREFILL_ALPHA", "FLASHPREFILL_BLOCK_SIZE"):
        monkeypatch.delenv(var, raising=False)
    active_preset.cache_clear()
    try:
        vllm_config = types.SimpleNamespace(model_config=types.SimpleNamespace(
            model="Qwen/Qwen2.5-7B-Instruct", hf_config=types.SimpleNamespace(architectures=["Qwen2ForCausalLM"])))
        assert active_preset_for_vllm(vllm_config).config.alpha == 0.08
        assert active_preset_for_vllm(object()).preset is None  # nothing known: auto falls back
    finally:
        active_preset.cache_clear()


@pytest.mark.parametrize("name,index", [
    ("model.layers.17.self_attn.attn", 17),
    ("language_model.model.layers.3.self_attn.attn", 3),
    ("model.layers.0.self_attn", 0),
    ("model.decoder.layers.2.self_attn", 2),
    ("transformer.h.5.attn", 5),
    ("layers.11", 11),
    ("model.layers.x.self_attn.attn", None),
    ("model.mylayers.4.attn", None),
    ("lm_head", None),
    ("?", None),
    ("", None),
])
def test_layer_index(name, index):
    assert layer_index(name) == index


def test_config_for_layer_without_per_layer_alphas_returns_config():
    cfg = CFG.replace(alpha=0.2)
    assert config_for_layer(cfg, None, "model.layers.1.self_attn.attn") is cfg
    assert config_for_layer(cfg, BUILTIN_PRESETS["qwen2.5-7b-instruct"], "model.layers.1.self_attn.attn") is cfg


def test_config_for_layer_unparseable_name_keeps_global():
    preset = parse_preset(VALID)
    cfg = CFG.replace(alpha=0.12, block_size=64)
    assert config_for_layer(cfg, preset, "some.attention") is cfg
    assert config_for_layer(cfg, preset, "model.layers.0.self_attn").alpha == 0.05


def test_dense_layer_runs_dense():
    from flashprefill_vllm.presets import DENSE
    preset = parse_preset({**VALID, "layer_alphas": {"0": DENSE, "3": 0.3}})
    assert preset.layer_alpha(0) == DENSE and preset.to_dict()["layer_alphas"] == {"0": DENSE, "3": 0.3}
    cfg = CFG.replace(block_size=64)
    assert presets.layer_runs_dense(cfg.replace(num_dense_layers=0), preset, "model.layers.0.self_attn.attn")
    assert not presets.layer_runs_dense(cfg.replace(num_dense_layers=0), preset, "model.layers.3.self_attn.attn")
    assert config_for_layer(cfg, preset, "model.layers.0.self_attn.attn") == cfg   # min_sparse_len is not reused
    assert config_for_layer(cfg, preset, "model.layers.3.self_attn.attn").alpha == 0.3
    with pytest.raises(ValueError, match=r'layer_alphas\[\'1\'\].*a number in \(0, 1\] or "dense"'):
        parse_preset({**VALID, "layer_alphas": {"1": "sparse"}})


def test_preset_is_hashable():
    preset = parse_preset(VALID)
    assert hash(preset) == hash(parse_preset(copy.deepcopy(VALID)))
    assert isinstance(preset, Preset) and presets.PRESET_VERSION == 1


def test_named_preset_for_another_model_warns(tmp_path):
    path = write(tmp_path, VALID)
    active = resolve_active(str(path), CFG, frozenset(), "meta-llama/Llama-3.1-8B-Instruct", ("LlamaForCausalLM",))
    assert active.config.alpha == 0.12   # still applied: the user named it
    assert len(active.warnings) == 1
    assert "was made for models matching ['*tiny-model']" in active.warnings[0]
    assert "not the served model 'meta-llama/Llama-3.1-8B-Instruct'" in active.warnings[0]
    assert resolve_active(str(path), CFG, frozenset(), "/models/tiny-model", ("Qwen2ForCausalLM",)).warnings == ()


def test_active_preset_logs_the_other_model_warning(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("FLASHPREFILL_PRESET", str(write(tmp_path, VALID)))
    monkeypatch.delenv("FLASHPREFILL_ALPHA", raising=False)
    monkeypatch.delenv("FLASHPREFILL_BLOCK_SIZE", raising=False)
    active_preset.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="flashprefill_vllm"):
            active_preset("/models/other", ("LlamaForCausalLM",))
        assert any(r.levelno == logging.WARNING and "was made for models matching" in r.getMessage()
                   for r in caplog.records)
    finally:
        active_preset.cache_clear()


def test_layer_indices_past_the_model_are_an_error(monkeypatch, tmp_path):
    import types
    path = write(tmp_path, VALID)     # lists layers 0 and 17
    preset = load_preset(path)
    presets.check_layers(preset, 18)
    presets.check_layers(preset, None)
    with pytest.raises(ValueError, match=r"lists layer\(s\) \[17\]; the served model has 12 decoder layers \(0-11\)"):
        presets.check_layers(preset, 12)
    monkeypatch.setenv("FLASHPREFILL_PRESET", str(path))
    for var in ("FLASHPREFILL_ALPHA", "FLASHPREFILL_BLOCK_SIZE"):
        monkeypatch.delenv(var, raising=False)
    active_preset.cache_clear()
    try:
        vllm_config = types.SimpleNamespace(model_config=types.SimpleNamespace(
            model="/models/tiny-model", hf_config=types.SimpleNamespace(architectures=["Qwen2ForCausalLM"],
                                                                        num_hidden_layers=12)))
        with pytest.raises(ValueError, match="12 decoder layers"):
            active_preset_for_vllm(vllm_config)
    finally:
        active_preset.cache_clear()
