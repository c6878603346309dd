"""config.py: the knobs' validation, and the FLASHPREFILL* environment variables (defaults, parsing, errors that name
the variable, the value and what is allowed)."""

import pytest

from flashprefill_vllm.config import ENV_VARS, FlashPrefillConfig, env_enabled, env_explicit_fields, env_log_density
from flashprefill_vllm.presets import env_config, env_preset


def test_defaults_are_valid():
    cfg = FlashPrefillConfig()
    assert 0 < cfg.alpha <= 1 and cfg.block_size == 128 and cfg.num_local_blocks >= 1


@pytest.mark.parametrize("field,value,needle", [
    ("alpha", 0.0, "alpha must be a number in (0, 1]"),
    ("alpha", 1.5, "alpha"),
    ("alpha", float("nan"), "alpha"),
    ("alpha", "0.1", "alpha"),
    ("block_size", 96, "block_size must be one of (64, 128, 256); got 96"),
    ("num_local_blocks", 0, "num_local_blocks must be an integer >= 1; got 0"),
    ("num_sink_blocks", -1, "num_sink_blocks"),
    ("num_dense_tail_blocks", 1.5, "num_dense_tail_blocks"),
    ("min_sparse_len", True, "min_sparse_len"),
    ("gqa_shared_index", 1, "gqa_shared_index must be a bool"),
])
def test_invalid_values_name_the_field(field, value, needle):
    with pytest.raises(ValueError, match=None) as err:
        FlashPrefillConfig(**{field: value})
    assert needle in str(err.value)


def test_replace_ignores_none_and_rejects_unknown():
    cfg = FlashPrefillConfig()
    assert cfg.replace(alpha=None) is cfg
    assert cfg.replace(alpha=0.3).alpha == 0.3
    with pytest.raises(ValueError, match="unknown FlashPrefillConfig field"):
        cfg.replace(alfa=0.3)
    with pytest.raises(ValueError, match="alpha"):
        cfg.replace(alpha=2.0)


def test_unset_or_empty_means_defaults():
    assert FlashPrefillConfig.from_env({}) == FlashPrefillConfig()
    assert FlashPrefillConfig.from_env({v.name: "" for v in ENV_VARS}) == FlashPrefillConfig()
    assert env_enabled({}) is False and env_log_density({}) is False


def test_every_variable_is_declared_once_with_the_prefix_and_matching_default():
    names = [v.name for v in ENV_VARS]
    assert len(names) == len(set(names)) and all(n.startswith("FLASHPREFILL") for n in names)
    defaults = FlashPrefillConfig()
    for var in ENV_VARS:
        assert var.doc and var.allowed and var.type in (bool, int, float, str)
        if var.field is not None:
            assert getattr(defaults, var.field) == var.default


def test_all_knobs_parse():
    cfg = FlashPrefillConfig.from_env({
        "FLASHPREFILL_ALPHA": "1e-30", "FLASHPREFILL_BLOCK_SIZE": "64", "FLASHPREFILL_MIN_LEN": " 1024 ",
        "FLASHPREFILL_SINK_BLOCKS": "0", "FLASHPREFILL_LOCAL_BLOCKS": "3", "FLASHPREFILL_TAIL_BLOCKS": "1",
        "FLASHPREFILL_GQA_SHARED": "False"})
    assert cfg == FlashPrefillConfig(alpha=1e-30, block_size=64, min_sparse_len=1024, num_sink_blocks=0,
                                     num_local_blocks=3, num_dense_tail_blocks=1, gqa_shared_index=False)


@pytest.mark.parametrize("raw,want", [("1", True), ("true", True), ("TRUE", True), ("0", False), ("false", False)])
def test_switches_parse(raw, want):
    assert env_enabled({"FLASHPREFILL": raw}) is want
    assert env_log_density({"FLASHPREFILL_LOG_DENSITY": raw}) is want


@pytest.mark.parametrize("name,raw,allowed", [
    ("FLASHPREFILL_ALPHA", "2", "a number in (0, 1]"),
    ("FLASHPREFILL_ALPHA", "0", "a number in (0, 1]"),
    ("FLASHPREFILL_ALPHA", "nan", "a number in (0, 1]"),
    ("FLASHPREFILL_ALPHA", "high", "a number in (0, 1]"),
    ("FLASHPREFILL_BLOCK_SIZE", "96", "one of 64, 128, 256"),
    ("FLASHPREFILL_BLOCK_SIZE", "128.0", "one of 64, 128, 256"),
    ("FLASHPREFILL_MIN_LEN", "-1", "an integer >= 0"),
    ("FLASHPREFILL_MIN_LEN", "8k", "an integer >= 0"),
    ("FLASHPREFILL_SINK_BLOCKS", "-2", "an integer >= 0"),
    ("FLASHPREFILL_LOCAL_BLOCKS", "0", "an integer >= 1"),
    ("FLASHPREFILL_TAIL_BLOCKS", "x", "an integer >= 0"),
    ("FLASHPREFILL_GQA_SHARED", "yes", "1, 0, true or false"),
])
def test_invalid_knob_names_variable_value_and_allowed(name, raw, allowed):
    with pytest.raises(ValueError) as err:
        FlashPrefillConfig.from_env({name: raw})
    assert str(err.value) == f"invalid {name}={raw!r}: must be {allowed}"


@pytest.mark.parametrize("name,fn", [("FLASHPREFILL", env_enabled), ("FLASHPREFILL_LOG_DENSITY", env_log_density)])
def test_invalid_switch_names_variable(name, fn):
    with pytest.raises(ValueError, match=f"invalid {name}='on': must be 1, 0, true or false"):
        fn({name: "on"})


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("FLASHPREFILL", "1")
    monkeypatch.setenv("FLASHPREFILL_ALPHA", "0.25")
    assert env_enabled() is True
    assert FlashPrefillConfig.from_env().alpha == 0.25


PRESET = {"format": "flashprefill-preset", "version": 1, "name": "mine", "match": {"names": ["*mine"]},
          "block_size": 128, "alpha": 0.2, "provenance": "test"}


def test_preset_unset_empty_auto_and_builtin_names():
    assert env_preset({}) is None and env_preset({"FLASHPREFILL_PRESET": "  "}) is None
    assert env_preset({"FLASHPREFILL_PRESET": "Auto"}) == "auto"
    assert env_preset({"FLASHPREFILL_PRESET": "Llama-3.1-8B-Instruct"}) == "llama-3.1-8b-instruct"


def test_preset_path_is_loaded_and_validated(tmp_path):
    import json
    good = tmp_path / "Preset.json"
    good.write_text(json.dumps(PRESET))
    assert env_preset({"FLASHPREFILL_PRESET": f" {good} "}) == str(good)  # case of the path kept
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(PRESET, alpha=3)))
    with pytest.raises(ValueError) as err:
        env_config({"FLASHPREFILL_PRESET": str(bad)})
    assert str(err.value) == (f"invalid FLASHPREFILL_PRESET={str(bad)!r}: preset {bad}: field 'alpha' is 3; "
                              "must be a number in (0, 1]")


def test_invalid_preset_names_variable_value_and_allowed(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError) as err:
        env_config({"FLASHPREFILL_PRESET": str(missing)})
    assert str(err.value) == (f"invalid FLASHPREFILL_PRESET={str(missing)!r}: must be auto, a built-in preset name "
                              "(llama-3.1-8b-instruct, qwen2.5-7b-instruct, qwen3-30b-a3b-instruct-2507) or a path "
                              f"to a preset JSON file (no such file: {missing})")


def test_preset_block_size_conflict_is_reported_at_start_up():
    env = {"FLASHPREFILL_PRESET": "qwen2.5-7b-instruct", "FLASHPREFILL_BLOCK_SIZE": "64"}
    with pytest.raises(ValueError, match="invalid FLASHPREFILL_PRESET='qwen2.5-7b-instruct' with "
                                         "FLASHPREFILL_BLOCK_SIZE=64: the preset 'qwen2.5-7b-instruct' was derived "
                                         "at block size 128"):
        env_config(env)
    # auto cannot know its preset yet; an invalid block size is still reported by name.
    assert env_config(dict(env, FLASHPREFILL_PRESET="auto"))[0].block_size == 64
    with pytest.raises(ValueError, match="invalid FLASHPREFILL_BLOCK_SIZE='96'"):
        env_config(dict(env, FLASHPREFILL_BLOCK_SIZE="96"))


def test_from_env_does_not_apply_the_preset():
    assert FlashPrefillConfig.from_env({"FLASHPREFILL_PRESET": "qwen2.5-7b-instruct"}) == FlashPrefillConfig()


def test_explicit_fields():
    assert env_explicit_fields({}) == frozenset()
    assert env_explicit_fields({"FLASHPREFILL_ALPHA": "0.2", "FLASHPREFILL_BLOCK_SIZE": " ", "FLASHPREFILL": "1",
                                "FLASHPREFILL_PRESET": "auto", "FLASHPREFILL_GQA_SHARED": "0"}) == \
        frozenset({"alpha", "gqa_shared_index"})


def test_precedence_end_to_end_from_env(tmp_path):
    """FLASHPREFILL_ALPHA beats a preset's alpha and its per-layer alphas; without it the preset applies."""
    import json

    from flashprefill_vllm.presets import config_for_layer, resolve_active
    path = tmp_path / "p.json"
    path.write_text(json.dumps(dict(PRESET, layer_alphas={"3": 0.4})))
    for env, want_global, want_layer3 in (
            ({"FLASHPREFILL_PRESET": str(path)}, 0.2, 0.4),
            ({"FLASHPREFILL_PRESET": str(path), "FLASHPREFILL_ALPHA": "0.05"}, 0.05, 0.05)):
        active = resolve_active(env_preset(env), FlashPrefillConfig.from_env(env), env_explicit_fields(env),
                                "/models/mine", ())
        assert active.config.alpha == want_global
        assert config_for_layer(active.config, active.preset, "model.layers.3.self_attn.attn").alpha == want_layer3


def test_misspelled_variables_are_reported_with_the_closest_name():
    from flashprefill_vllm.config import env_unknown_warnings
    warnings = env_unknown_warnings({"FLASHPREFILL_APLHA": "0.2", "FLASHPREFILL_TAU": "0.9", "FLASHPREFILL": "1",
                                     "FLASHPREFILL_TEST_MODEL": "/m", "FLASHPREFILL_MINLEN": "4096",
                                     "flashprefill_alpha": "0.3", "OTHER": "x"})
    assert len(warnings) == 3
    assert "FLASHPREFILL_APLHA='0.2': did you mean FLASHPREFILL_ALPHA?" in warnings[0]
    assert "FLASHPREFILL_MINLEN='4096': did you mean FLASHPREFILL_MIN_LEN?" in warnings[1]
    assert "flashprefill_alpha='0.3': did you mean FLASHPREFILL_ALPHA?" in warnings[2]
    assert "ignoring unknown environment variable FLASHPREFILL_X_Y" in env_unknown_warnings({"FLASHPREFILL_X_Y": "1"})[0]
