"""FLASHPREFILL* environment variables: defaults, parsing, and errors that name the variable, value and range."""

import pytest

from flashprefill_vllm.config import ENV_VARS, FlashPrefillConfig, env_enabled, env_log_density


def test_unset_or_empty_means_defaults():
    assert FlashPrefillConfig.from_env({}) == FlashPrefillConfig()
    assert FlashPrefillConfig.from_env({v.name: "" for v in ENV_VARS}) == FlashPrefillConfig()
    assert env_enabled({}) is False and env_log_density({}) is False


def test_every_variable_is_declared_once_with_the_prefix_and_matching_default():
    names = [v.name for v in ENV_VARS]
    assert len(names) == len(set(names)) and all(n.startswith("FLASHPREFILL") for n in names)
    defaults = FlashPrefillConfig()
    for var in ENV_VARS:
        assert var.doc and var.allowed and var.type in (bool, int, float)
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
