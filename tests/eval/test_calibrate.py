"""Alpha calibration: the decision rule on recorded tables (global / per layer, recall / density targets,
unreachable targets), prompt slicing, the measuring loop with stand-ins, and the command end to end on a tiny
random-weight model (with stand-in quality functions, and with the real ``opquality`` when it is importable)."""

import importlib.util
import json
import math
import sys
import types

import pytest

from flashprefill_vllm.config import FlashPrefillConfig
from flashprefill_vllm.eval.calibrate import (CalibrationError, Measurement, Target, alpha_stats, build_preset,
                                              choose_alpha, main, make_prompts, measure)
from flashprefill_vllm.presets import load_preset, resolve_active

ALPHAS = (0.01, 0.05, 0.1, 0.2, 0.4)
LENGTHS = (8192, 16384)


def table(recall, density, layers=(0, 1, 2), alphas=ALPHAS, lengths=LENGTHS, samples=1):
    """Rows for every (alpha, layer, length, sample) from ``recall(a, layer, length)`` / ``density(...)``."""
    return [Measurement(a, layer, n, recall(a, layer, n), density(a, layer, n))
            for a in alphas for layer in layers for n in lengths for _ in range(samples)]


# Recall falls and density falls as alpha grows; layer 2 is the hard one, longer prompts are sparser.
RECALL = {0.01: 0.995, 0.05: 0.985, 0.1: 0.975, 0.2: 0.95, 0.4: 0.9}
DENSITY = {0.01: 0.6, 0.05: 0.4, 0.1: 0.3, 0.2: 0.2, 0.4: 0.1}


def recall_fn(a, layer, n):
    return RECALL[a] - (0.02 if layer == 2 else 0.0) + (0.002 if n == 8192 else 0.0)


def density_fn(a, layer, n):
    return DENSITY[a] + (0.05 if n == 8192 else -0.05)


def test_target_validation():
    assert Target().describe() == "recall >= 0.97, worst layer >= 0.95"
    assert Target(recall=0.9, min_layer_recall=None).describe() == "recall >= 0.9"
    assert Target(recall=None, min_layer_recall=None, density=0.2).describe() == "density <= 0.2"
    with pytest.raises(ValueError, match="exactly one"):
        Target(recall=0.9, density=0.2)
    with pytest.raises(ValueError, match="target recall must be in"):
        Target(recall=1.5)


def test_stats_average_samples_then_cells():
    rows = table(recall_fn, density_fn, samples=2)
    rows[0] = Measurement(rows[0].alpha, rows[0].layer, rows[0].length, rows[0].recall - 0.1, rows[0].density)
    stats = alpha_stats(rows, Target())
    assert [s.alpha for s in stats] == sorted(ALPHAS)
    s = stats[0]  # alpha 0.01: layer 0 / 8192 has samples 0.897 and 0.997 -> 0.947 (worst cell)
    assert s.worst_layer == 0 and s.worst_length == 8192 and s.worst_recall == pytest.approx(0.947)
    assert s.density == pytest.approx(0.6)


def test_global_recall_target():
    choice = choose_alpha(table(recall_fn, density_fn), Target())
    # mean recall at 0.1: 0.975 - 0.02/3 + 0.001 = 0.9693 < 0.97 -> 0.05 (mean 0.9793, worst 0.965)
    assert choice.alpha == 0.05 and choice.layer_alphas == {}
    assert "alpha 0.05 is the largest of the grid meeting recall >= 0.97, worst layer >= 0.95" in choice.reason
    assert "the next, 0.1, gives recall 0.9693" in choice.reason
    assert choice.stats.meets and not choice.grid[2].meets


def test_worst_layer_floor_binds():
    choice = choose_alpha(table(recall_fn, density_fn), Target(recall=0.95, min_layer_recall=0.95))
    # 0.2: mean 0.9443 fails; 0.1: mean 0.9693, worst layer 2 at 16384 = 0.955 -> meets
    assert choice.alpha == 0.1
    floor = choose_alpha(table(recall_fn, density_fn), Target(recall=0.95, min_layer_recall=0.96))
    assert floor.alpha == 0.05 and floor.stats.worst_layer == 2 and floor.stats.worst_length == 16384


def test_prefix_rule_ignores_a_noisy_pass_after_a_failure():
    noisy = {**RECALL, 0.2: 0.99}  # 0.1 fails, 0.2 passes by noise: not chosen
    choice = choose_alpha(table(lambda a, layer, n: noisy[a] - (0.02 if layer == 2 else 0), density_fn), Target())
    assert choice.alpha == 0.05


def test_largest_alpha_meeting_says_extend_the_grid():
    choice = choose_alpha(table(lambda *_: 1.0, density_fn), Target())
    assert choice.alpha == 0.4 and "extend --alphas" in choice.reason


def test_density_target():
    choice = choose_alpha(table(recall_fn, density_fn), Target(recall=None, min_layer_recall=None, density=0.3))
    assert choice.alpha == 0.1 and choice.stats.density == pytest.approx(0.3)
    assert "alpha 0.1 is the smallest of the grid keeping density <= 0.3" in choice.reason
    assert "the previous, 0.05, keeps density 0.400" in choice.reason


def test_unreachable_recall_names_the_closest_alpha_and_what_to_change():
    with pytest.raises(CalibrationError) as err:
        choose_alpha(table(recall_fn, density_fn), Target(recall=0.999))
    msg = str(err.value)
    assert msg.startswith("all layers: target recall >= 0.999, worst layer >= 0.95 is not reached even at the "
                          "smallest alpha of the grid, 0.01 (recall 0.9893")
    assert "add smaller alphas (--alphas) or lower the target" in msg


def test_unreachable_density():
    with pytest.raises(CalibrationError, match=r"target density <= 0.05 is not reached even at the largest alpha of "
                                               r"the grid, 0.4 \(density 0.100\).*raise --target-density"):
        choose_alpha(table(recall_fn, density_fn), Target(recall=None, min_layer_recall=None, density=0.05))


def test_per_layer_recall():
    choice = choose_alpha(table(recall_fn, density_fn), Target(recall=0.97, min_layer_recall=None), per_layer=True)
    # layers 0/1: 0.1 gives 0.976 >= 0.97, 0.2 fails; layer 2: 0.05 gives 0.966 < 0.97 -> 0.01 (0.976)
    assert choice.layer_alphas == {0: 0.1, 1: 0.1, 2: 0.01}
    assert choice.alpha == 0.05  # the global rule, for layers the preset does not list
    assert dict((layer, s.alpha) for layer, s in choice.layers) == choice.layer_alphas
    assert "Per layer, the same rule chose alphas from 0.01 to 0.1 (with them: recall 0.9760, density" in \
        choice.reason


def test_per_layer_density():
    dens = lambda a, layer, n: DENSITY[a] + 0.1 * layer  # noqa: E731
    choice = choose_alpha(table(recall_fn, dens), Target(recall=None, min_layer_recall=None, density=0.4),
                          per_layer=True)
    assert choice.layer_alphas == {0: 0.05, 1: 0.1, 2: 0.2}


def test_per_layer_unreachable_lists_the_layers():
    with pytest.raises(CalibrationError) as err:
        choose_alpha(table(recall_fn, density_fn), Target(recall=0.98, min_layer_recall=None), per_layer=True)
    msg = str(err.value)
    assert msg.startswith("per-layer: 1 layer(s) cannot reach the target:")
    assert "layer 2: target recall >= 0.98 is not reached even at the smallest alpha of the grid, 0.01" in msg


def test_per_layer_dense_fallback_marks_only_the_hopeless_layers_dense():
    from flashprefill_vllm.presets import DENSE
    # Recall 0.98: layer 2 tops out at 0.977 (alpha 0.01, 8K) / 0.975 (16K) and fails; layers 0 and 1 pass at 0.01.
    choice = choose_alpha(table(recall_fn, density_fn), Target(recall=0.98, min_layer_recall=None), per_layer=True,
                          dense_fallback=True)
    assert choice.layer_alphas == {0: 0.05, 1: 0.05, 2: DENSE}
    assert choice.alpha == 0.05      # chosen over the two sparse layers only
    assert choice.reason.startswith("the 2 sparse layers: alpha 0.05")
    assert "layer(s) 2 reach the target at no alpha and run dense" in choice.reason
    # The dense layer's cells count with recall 1 and density 1: recall (4 x 0.986 + 2) / 6, density (4 x 0.4 + 2) / 6.
    assert "(with them: recall 0.9907, density 0.600)" in choice.reason
    with pytest.raises(CalibrationError, match="no layer reaches"):
        choose_alpha(table(recall_fn, density_fn), Target(recall=0.999, min_layer_recall=None), per_layer=True,
                     dense_fallback=True)


def test_incomplete_or_empty_table():
    rows = table(recall_fn, density_fn)
    with pytest.raises(CalibrationError, match=r"alpha 0.4 has no measurement for \(layer, length\) \(2, 16384\)"):
        choose_alpha(rows[:-1], Target())
    with pytest.raises(CalibrationError, match="no measurements"):
        choose_alpha([], Target())


def test_make_prompts():
    prompts, repeated = make_prompts(list(range(100)), [10, 20], per_length=3, bos_id=7)
    assert not repeated and set(prompts) == {10, 20}
    assert [len(p) for p in prompts[10]] == [10, 10, 10] and all(p[0] == 7 for p in prompts[10])
    assert [p[1] for p in prompts[20]] == [0, 40, 81]  # offsets spread over the text
    short, repeated = make_prompts([1, 2, 3], [8])
    assert repeated and short[8] == [[1, 2, 3, 1, 2, 3, 1, 2]]
    with pytest.raises(ValueError, match="no tokens"):
        make_prompts([], [8])


def fake_quality(num_layers: int, calls: list):
    """Stand-ins for opquality: random q/k/v per layer, recall/density as simple functions of alpha and layer."""
    import torch

    def capture_qkv(model, input_ids, layers=None, on_layer=None):
        assert input_ids.dim() == 2 and input_ids.shape[0] == 1 and input_ids.dtype == torch.long
        calls.append(input_ids.shape[1])
        length = input_ids.shape[1]
        for layer in range(num_layers):
            q = torch.randn(length, 4, 16)
            k = v = torch.randn(length, 2, 16)
            on_layer(layer, q, k, v, 0.25)

    def block_mass(q, k, scale, block_size):
        return ("mass", q.shape[0], block_size)

    def selection_quality(q, k, v, scale, config, mass=None):
        assert mass == ("mass", q.shape[0], config.block_size) and config.min_sparse_len == 0
        a = config.alpha
        return {"density": 1.0 - a, "recall_mean": 1.0 - a / 10, "recall_min": 1.0 - a, "rel_l2": a / 100}

    return types.SimpleNamespace(capture_qkv=capture_qkv, block_mass=block_mass,
                                 selection_quality=selection_quality)


def test_measure_with_stand_ins():
    import torch

    calls, ticks = [], []
    prompts, _ = make_prompts(list(range(50)), [16, 24], per_length=2)
    rows = measure(torch.nn.Linear(2, 2), prompts, [0.1, 0.5], FlashPrefillConfig(block_size=64, min_sparse_len=0),
                   quality=fake_quality(3, calls), progress=ticks.append)
    assert calls == [16, 16, 24, 24] and len(ticks) == 4 * 3
    assert len(rows) == 4 * 3 * 2
    r = next(m for m in rows if m.alpha == 0.5 and m.layer == 2 and m.length == 24)
    assert (r.recall, r.density, r.recall_min, r.rel_l2) == (0.95, 0.5, 0.5, 0.005)


def test_built_preset_is_what_flashprefill_preset_reads(tmp_path):
    from flashprefill_vllm.presets import save_preset
    choice = choose_alpha(table(recall_fn, density_fn), Target(recall=0.97, min_layer_recall=None), per_layer=True)
    summary = {"date": "2026-01-02T00:00:00+00:00", "device": "NVIDIA H100", "num_prompts": 2, "text": "kjv.txt",
               "lengths": [8192, 16384]}
    cfg = FlashPrefillConfig(min_sparse_len=0, tau=0.85)
    preset = build_preset(choice, Target(recall=0.97, min_layer_recall=None), name="my-model",
                          model_path="/models/My-Model/", architectures=["Qwen2ForCausalLM"], config=cfg,
                          summary=summary)
    path = tmp_path / "preset.json"
    save_preset(preset, path)
    loaded = load_preset(path)
    assert loaded.alpha == 0.05 and loaded.layer_alphas == ((0, 0.1), (1, 0.1), (2, 0.01))
    assert loaded.provenance == ("calibrated by flashprefill_vllm.eval.calibrate on 2026-01-02 (NVIDIA H100): "
                                 "My-Model, 2 prompt(s) from kjv.txt at [8192, 16384] tokens, target recall >= 0.97, "
                                 "per layer, tau 0.85")
    assert loaded.tau == 0.85
    active = resolve_active(str(path), FlashPrefillConfig(), frozenset(), "/models/My-Model", ())
    assert active.config.alpha == 0.05 and active.config.tau == 0.85 and active.preset.layer_alpha(2) == 0.01


# ---------------------------------------------------------------------------------------------------------------
# The command on a tiny random-weight model (no downloads).

TEXT = ("in the beginning god created the heaven and the earth and the earth was without form and void and darkness "
        "was upon the face of the deep ") * 40


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer Qwen2 with random weights (GQA 2:1), a word-level tokenizer (its own directory, since AutoTokenizer
    would pick Qwen2's class for the model directory) and a small text."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("calibrate")
    vocab = {"[UNK]": 0}
    for word in TEXT.split():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps(
        {"backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "unk_token": "[UNK]"}))
    # head_dim 64: a size the op supports (the real opquality runs it).
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                   max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(root / "Tiny-Qwen")
    (root / "text.txt").write_text(TEXT)
    return root


def run_main(tiny_model, *extra):
    return main([str(tiny_model / "Tiny-Qwen"), "--text", str(tiny_model / "text.txt"), "--tokenizer",
                 str(tiny_model / "tok"), "--block-size", "64", "--device", "cpu", *extra])


def test_cli_with_stand_ins(tiny_model, tmp_path, monkeypatch, capsys):
    calls = []
    stand_in = fake_quality(2, calls)
    monkeypatch.setitem(sys.modules, "flashprefill_vllm.eval.opquality", stand_in)
    import flashprefill_vllm.eval as eval_pkg
    monkeypatch.setattr(eval_pkg, "opquality", stand_in, raising=False)
    out = tmp_path / "preset.json"
    table_out = tmp_path / "table.json"
    rc = run_main(tiny_model, "--lengths", "256,1024", "--alphas", "0.1,0.3,0.5", "--target-recall", "0.96",
                  "--per-layer", "--out", str(out), "--table-out", str(table_out))
    printed = capsys.readouterr().out
    assert rc == 0
    assert calls == [256, 512]  # 1024 capped at max_position_embeddings
    assert "lengths capped at the model's max context 512: [256, 512]" in printed
    assert "calibrate: chose alpha 0.3:" in printed and "per-layer alphas: 0:0.3, 1:0.3" in printed
    preset = load_preset(out)
    assert preset.name == "tiny-qwen" and preset.block_size == 64 and preset.alpha == 0.3
    assert preset.names == ("*tiny-qwen",) and preset.architectures == ("Qwen2ForCausalLM",)
    assert preset.layer_alphas == ((0, 0.3), (1, 0.3))
    cal = preset.calibration
    assert cal["lengths"] == [256, 512] and cal["alphas"] == [0.1, 0.3, 0.5] and cal["per_layer"] is True
    assert cal["target"] == {"recall": 0.96, "min_layer_recall": 0.95} and cal["text_repeated"] is False
    assert cal["selection"]["block_size"] == 64 and len(cal["grid"]) == 3 and len(cal["layers"]) == 2
    assert len(json.loads(table_out.read_text())) == 2 * 2 * 3


def test_cli_unreachable_target_writes_nothing(tiny_model, tmp_path, monkeypatch, capsys):
    stand_in = fake_quality(2, [])
    monkeypatch.setitem(sys.modules, "flashprefill_vllm.eval.opquality", stand_in)
    import flashprefill_vllm.eval as eval_pkg
    monkeypatch.setattr(eval_pkg, "opquality", stand_in, raising=False)
    out = tmp_path / "preset.json"
    rc = run_main(tiny_model, "--lengths", "128", "--alphas", "0.5,0.7", "--target-density", "0.2", "--out", str(out))
    printed = capsys.readouterr().out
    assert rc == 2 and not out.exists()
    assert "no alpha chosen: all layers: target density <= 0.2 is not reached even at the largest alpha" in printed


def test_cli_argument_errors(capsys):
    with pytest.raises(SystemExit) as err:
        main(["m", "--text", "t", "--target-recall", "0.9", "--target-density", "0.2"])
    assert err.value.code == 2 and "either --target-recall or --target-density" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["m", "--text", "t", "--alphas", "0,0.1"])
    assert "--alphas must be numbers in (0, 1]" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("flashprefill_vllm.eval.opquality") is None,
                    reason="flashprefill_vllm.eval.opquality is not available")
def test_cli_end_to_end_with_opquality(tiny_model, tmp_path, capsys):
    out = tmp_path / "preset.json"
    # One short prompt and two alphas: the op's kernels run under the Triton interpreter here (slow).
    rc = run_main(tiny_model, "--lengths", "192", "--alphas", "0.05,0.6", "--target-recall", "0.5",
                  "--min-layer-recall", "0", "--out", str(out))
    printed = capsys.readouterr().out
    print(printed)
    assert rc == 0, printed
    preset = load_preset(out)
    assert preset.alpha in (0.05, 0.6) and preset.block_size == 64 and preset.calibration["lengths"] == [192]
    for row in preset.calibration["grid"]:
        assert 0.0 < row["density"] <= 1.0 and 0.0 <= row["recall"] <= 1.0 + 1e-6
        assert math.isfinite(row["worst_recall"])
