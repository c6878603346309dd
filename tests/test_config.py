import pytest

from flashprefill_vllm.config import FlashPrefillConfig


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
