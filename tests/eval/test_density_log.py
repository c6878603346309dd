"""The density log reader: parsing the plugin's lines and folding chunks back into a prompt's density."""

import pytest

from flashprefill_vllm.eval import density_log as dl

WHOLE = "INFO 11-24 [common.py:188] FlashPrefill model.layers.0.self_attn.attn: 1 prefill(s), 8192 tokens, " \
        "kept 12.5% of causal key blocks"
CHUNK = "FlashPrefill model.layers.1.self_attn.attn: 1 prefill(s), 2048 tokens, kept 9.8% of causal key blocks " \
        "(6144 cached tokens before them)"


def test_parse_both_forms():
    assert dl.parse_line(WHOLE) == dl.DensityLine("model.layers.0.self_attn.attn", 8192, 0, 0.125)
    assert dl.parse_line(CHUNK) == dl.DensityLine("model.layers.1.self_attn.attn", 2048, 6144, pytest.approx(0.098))
    assert dl.parse_line("FlashPrefill: layers with sliding window run stock FlashAttention (dense)") is None
    assert len(dl.parse("\n".join([WHOLE, "noise", CHUNK]))) == 2


def test_visible_blocks_bottom_right():
    assert dl.visible_blocks(1000, 0, 128) == sum(range(1, 9))        # 8 query blocks, block i sees i + 1
    assert dl.visible_blocks(256, 256, 128) == 3 + 4                   # rows 256..511 see blocks 0..2 and 0..3
    assert dl.visible_blocks(0, 100, 128) == 0
    # Block-aligned chunks partition the whole prompt's visible pairs.
    assert sum(dl.visible_blocks(2048, c, 128) for c in range(0, 8192, 2048)) == dl.visible_blocks(8192, 0, 128)


def _line(layer, tokens, cached, density):
    return dl.DensityLine(f"model.layers.{layer}.attn", tokens, cached, density)


def test_prompt_density_weights_chunks_and_counts_uncovered_rows_dense():
    # 512 tokens in two chunks: visible pairs 3 and 7 of 10.
    both = [_line(0, 256, 0, 0.5), _line(0, 256, 256, 0.25)]
    assert dl.prompt_density(both, 512, 128) == pytest.approx((0.5 * 3 + 0.25 * 7) / 10)
    # The first chunk ran stock (no line): its 3 pairs count as kept.
    assert dl.prompt_density(both[1:], 512, 128) == pytest.approx((3 + 0.25 * 7) / 10)
    # Mean over layers; no line at all = dense.
    two_layers = [_line(0, 512, 0, 0.2), _line(1, 512, 0, 0.4)]
    assert dl.prompt_density(two_layers, 512, 128) == pytest.approx(0.3)
    assert dl.prompt_density([], 512, 128) == 1.0
    with pytest.raises(ValueError, match="past the prompt"):
        dl.prompt_density([_line(0, 256, 512, 0.1)], 512, 128)


def test_by_chunk_orders_steps_and_averages_layers():
    lines = [_line(0, 256, 256, 0.2), _line(0, 256, 0, 0.6), _line(1, 256, 256, 0.4), _line(1, 256, 0, 0.8)]
    assert dl.by_chunk(lines) == [{"start": 0, "tokens": 256, "density": pytest.approx(0.7), "layers": 2},
                                  {"start": 256, "tokens": 256, "density": pytest.approx(0.3), "layers": 2}]
