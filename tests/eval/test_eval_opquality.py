"""eval.opquality: exact block mass, the top-p oracle, selection quality per rule, capture from a transformers model,
and the command line (tiny shapes on CPU, where the op runs its plain-torch reference)."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb  # noqa: E402

from flashprefill_vllm.config import FlashPrefillConfig  # noqa: E402
from flashprefill_vllm.eval import opquality as oq  # noqa: E402
from flashprefill_vllm.synthetic import structured_qkv  # noqa: E402
from flashprefill_vllm.ops.block_sparse_index import block_density  # noqa: E402

B = 64
# Few always-kept blocks, so the threshold decides most of the 12 x 12 block grid.
CONFIG = FlashPrefillConfig(block_size=B, min_sparse_len=0, num_sink_blocks=1, num_local_blocks=1,
                            num_dense_tail_blocks=1, tau=0.0)   # the alpha rule alone (the floor: own tests)
ALPHAS = (1e-30, 0.01, 0.05, 0.1, 0.3, 0.6, 1.0)   # 1e-30 keeps every scored block


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    # conftest switches the Triton interpreter on without a GPU; the op's reference is much faster on CPU.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def qkv():
    q, k, v, _ = structured_qkv([768], 2, 1, 64, block_size=B, seed=3)
    return q, k, v, 64 ** -0.5


@pytest.fixture(scope="module")
def mass(qkv):
    q, k, _, scale = qkv
    return oq.block_mass(q, k, scale, B)


def brute_force_mass(q, k, scale, block_size):
    length, hq, _ = q.shape
    kk = k.float().repeat_interleave(hq // k.shape[1], 1)
    logits = torch.einsum("qhd,khd->hqk", q.float(), kk) * scale
    logits = logits.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    p = logits.softmax(-1)
    nb = -(-length // block_size)
    p = torch.nn.functional.pad(p, (0, nb * block_size - length, 0, nb * block_size - length))
    per_block = p.view(hq, nb * block_size, nb, block_size).sum(-1)
    rows = torch.tensor([min(block_size, length - i * block_size) for i in range(nb)], dtype=torch.float32)
    return per_block.view(hq, nb, block_size, nb).sum(2) / rows[None, :, None]


def test_block_mass_is_exact_and_chunked(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(200, 4, 16, generator=g) * 2).to(torch.bfloat16)
    k = (torch.randn(200, 2, 16, generator=g) * 2).to(torch.bfloat16)
    want = brute_force_mass(q, k, 0.25, B)
    whole = oq.block_mass(q, k, 0.25, B)
    monkeypatch.setattr(oq, "_MASS_CHUNK_SCORES", 4 * 256 * B)     # one query block per chunk
    chunked = oq.block_mass(q, k, 0.25, B)
    torch.testing.assert_close(whole, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(chunked, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(whole.sum(-1), torch.ones(4, 4), atol=1e-5, rtol=0)
    assert (whole.triu(1) == 0).all()


def test_oracle_top_p(mass):
    full = oq.oracle_top_p(mass, 1.0)
    assert torch.equal(full["mask"], torch.ones_like(full["mask"]).tril())
    assert full["density"] == 1.0 and full["recall_min"] > 1 - 1e-5
    results = [oq.oracle_top_p(mass, p) for p in (0.3, 0.6, 0.8, 0.9, 0.97, 0.99, 1.0)]
    densities = [r["density"] for r in results]
    assert densities == sorted(densities) and densities[0] < 0.5
    for p, r in zip((0.3, 0.6, 0.8, 0.9, 0.97, 0.99), results):
        assert r["recall_min"] >= p - 1e-5
        assert r["mask"].diagonal(dim1=1, dim2=2).all()
    with pytest.raises(ValueError, match=r"p must be a number in \(0, 1\]"):
        oq.oracle_top_p(mass, 0.0)


def test_oracle_index_runs_sparse_attention(qkv, mass):
    q, k, v, scale = qkv
    dense = oq.dense_attention(q, k, v, scale)
    errors = [oq.sparse_rel_l2(q, k, v, scale, oq.index_from_mask(oq.oracle_top_p(mass, p)["mask"], B), dense)
              for p in (0.5, 1.0)]
    assert errors[0] > errors[1] == 0.0


def test_keep_all_alpha_is_dense(qkv, mass):
    q, k, v, scale = qkv
    r = oq.selection_quality(q, k, v, scale, CONFIG.replace(alpha=1e-30))
    assert r["density"] == 1.0 and r["recall_min"] > 1 - 1e-5 and r["rel_l2"] == 0.0
    assert len(r["recall_per_head"]) == 2


@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
@pytest.mark.parametrize("rule", oq.RULES)
def test_selection_monotone_in_alpha(qkv, mass, rule, shared):
    q, k, _, scale = qkv
    cu = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    base = CONFIG.replace(gqa_shared_index=shared)
    energy = None if rule == "op" else oq.rule_log_energies(q, k, scale, base, rule)
    densities, recalls = [], []
    for a in ALPHAS:
        index = oq.selection_index(q, k, scale, base.replace(alpha=a), rule, energy)
        assert index.heads_per_index == (2 if shared else 1)
        keep = oq.reference.index_to_mask(index, 0, q.shape[0], q.shape[0])
        r = oq.mask_quality(keep.repeat_interleave(index.heads_per_index, 0), mass)
        assert r["density"] == pytest.approx(block_density(index, cu, cu))
        densities.append(r["density"])
        recalls.append(r["recall_mean"])
    assert densities == sorted(densities, reverse=True) and recalls == sorted(recalls, reverse=True)
    # The antidiagonal samples see the structured input's heavy entries directly: at alpha 1 they still hold 99.4%.
    top_recall = 0.999 if rule in oq.ANTIDIAGONAL_STRIDES else 0.99
    assert densities[0] == 1.0 and densities[-1] < 0.6 and recalls[0] > 1 - 1e-5 and recalls[-1] < top_recall


def test_sparse_selection_quality(qkv, mass):
    q, k, v, scale = qkv
    dense = oq.dense_attention(q, k, v, scale)
    r = oq.selection_quality(q, k, v, scale, CONFIG.replace(alpha=0.3), mass, dense_out=dense)
    assert 0 < r["density"] < 1 and 0 < r["recall_mean"] < 1 and 0 < r["rel_l2"] < 0.5
    with pytest.raises(ValueError, match="mass must be"):
        oq.selection_quality(q, k, v, scale, CONFIG.replace(block_size=128), mass)
    with pytest.raises(ValueError, match="rule must be one of"):
        oq.selection_index(q, k, scale, CONFIG, "top_k")


def tiny_model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    return Qwen2ForCausalLM(config).to(torch.bfloat16).eval()


def test_capture_qkv_is_post_rope_and_leaves_the_model_alone():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    captured = oq.capture_qkv(model, ids)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after) and model.config._attn_implementation == "sdpa"
    assert sorted(captured) == [0, 1]
    q, k, v, scale = captured[0]
    assert (q.shape, k.shape, v.shape, scale) == ((64, 2, 64), (64, 1, 64), (64, 1, 64), 0.125)
    assert q.dtype == torch.bfloat16
    with torch.no_grad():
        attn = model.model.layers[0].self_attn
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        cos, sin = model.model.rotary_emb(h, torch.arange(64)[None])
        want_q, want_k = apply_rotary_pos_emb(attn.q_proj(h).view(1, 64, 2, 64).transpose(1, 2),
                                              attn.k_proj(h).view(1, 64, 1, 64).transpose(1, 2), cos, sin)
    torch.testing.assert_close(q, want_q[0].transpose(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(k, want_k[0].transpose(0, 1), atol=0, rtol=0)

    seen = []
    assert oq.capture_qkv(model, ids[0], layers=[1], on_layer=lambda i, *_: seen.append(i)) == {}
    assert seen == [1]


@pytest.mark.parametrize("argv, expected", [
    (["--alphas", "0.1,1.5"], ["--alphas", "'1.5' not allowed", "numbers in (0, 1]"]),
    (["--alphas", ","], ["--alphas", "empty"]),
    (["--lengths", "8192,0"], ["--lengths", "'0' not allowed", "integers >= 1"]),
    (["--recall", "1.2"], ["--recall", "'1.2' is not a number in (0, 1]"]),
    (["--layers", "0,x"], ["--layers", "'x' not allowed", "'all' or layer indices"]),
    (["--rules", "op,top_k"], ["--rules", "allowed values are op, max_key, pooled_query"]),
    (["--gqa", "both"], ["--gqa", "allowed values are per_head, shared"]),
    (["--block-size", "100"], ["--block-size", "invalid choice", "64"]),
    (["--offset", "-1"], ["--offset", "an integer >= 0"]),
], ids=["alpha", "alpha-empty", "length", "recall", "layers", "rules", "gqa", "block", "offset"])
def test_cli_rejects_bad_options(tmp_path, capsys, argv, expected):
    text = tmp_path / "t.txt"
    text.write_text("w1 w2")
    with pytest.raises(SystemExit) as e:
        oq.main(["--model", str(tmp_path), "--text", str(text), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    for part in expected:
        assert part in err


def test_cli_rejects_missing_text(tmp_path, capsys):
    with pytest.raises(SystemExit):
        oq.main(["--model", str(tmp_path), "--text", str(tmp_path / "none.txt")])
    assert "--text" in capsys.readouterr().err


def write_tiny_model(path):
    """The model in ``path/model``, a word-level tokenizer in ``path/tokenizer`` (AutoTokenizer would load a model
    folder's tokenizer as the model type's own class)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_model().save_pretrained(path / "model")
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i + 1 for i in range(255)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path / "tokenizer")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Arguments that run the command on a tiny model and a 600-word text."""
    path = tmp_path_factory.mktemp("opquality")
    write_tiny_model(path)
    text = path / "text.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 255, (600,), generator=g)))
    return ["--model", str(path / "model"), "--tokenizer", str(path / "tokenizer"), "--text", str(text),
            "--block-size", "64", "--device", "cpu"]


def test_cli_rejects_layers_past_the_model(tiny_run, capsys):
    with pytest.raises(SystemExit):
        oq.main([*tiny_run, "--lengths", "128", "--layers", "0,2"])
    assert "--layers 0,2: the model has 2 layers (0-1)" in capsys.readouterr().err


def test_cli_end_to_end(tiny_run, tmp_path, capsys):
    oq.main([*tiny_run, "--model-name", "Tiny Qwen2", "--lengths", "256", "--alphas", "1e-30,1", "--recall", "0.9",
             "--rules", "op,max_key", "--layers", "1", "--out-dir", str(tmp_path / "out"), "--tag", "t"])
    report = json.loads((tmp_path / "out" / "opquality_tiny-qwen2_cpu-t.json").read_text())
    assert report["device"] == "cpu" and report["transformers"] and report["config"]["block_size"] == 64
    layer = report["lengths"]["256"]["layers"]["1"]
    assert layer["oracle"]["recall_mean"] >= 0.9
    keep_all = layer["sweep"]["shared"]["max_key"][0]
    assert keep_all["alpha"] == 1e-30 and keep_all["density"] == 1.0 and keep_all["rel_l2"] == 0.0
    summary = report["lengths"]["256"]["summary"]
    assert set(summary["rules"]) == {"per_head/op", "shared/op", "per_head/max_key", "shared/max_key"}
    chosen = summary["rules"]["per_head/op"]["chosen"]
    assert chosen is not None and chosen["recall_mean"] >= 0.9 and math.isfinite(chosen["density_vs_oracle"])
    out = capsys.readouterr().out
    assert "goals: mean recall >= 0.9" in out and "per_head/op" in out


@pytest.mark.gpu
def test_op_rule_on_cuda_agrees_with_cpu_reference():
    """The Triton selection on CUDA against the reference on CPU, on the same structured bf16 inputs."""
    q, k, v, _ = structured_qkv([4096], 8, 2, 64, block_size=128, seed=5)
    cfg = FlashPrefillConfig(alpha=0.1, min_sparse_len=0)
    scale = 0.125
    mass = oq.block_mass(q, k, scale, 128)
    mass_gpu = oq.block_mass(q.cuda(), k.cuda(), scale, 128)
    torch.testing.assert_close(mass_gpu.cpu(), mass, atol=1e-5, rtol=1e-4)
    for shared in (False, True):
        c = cfg.replace(gqa_shared_index=shared)
        want = oq.selection_quality(q, k, v, scale, c, mass)
        got = oq.selection_quality(q.cuda(), k.cuda(), v.cuda(), scale, c, mass_gpu)
        # Blocks within bf16 rounding of the threshold may differ (tests/helpers.py TIE_EPS).
        assert got["density"] == pytest.approx(want["density"], abs=0.01)
        assert got["recall_mean"] == pytest.approx(want["recall_mean"], abs=0.01)
        assert got["rel_l2"] == pytest.approx(want["rel_l2"], abs=0.01)


@pytest.mark.gpu
def test_block_mass_at_32k_on_cuda():
    q, k, _, _ = structured_qkv([32768], 14, 2, 64, device="cuda", seed=1)
    mass = oq.block_mass(q, k, 0.125, 128)
    assert mass.shape == (14, 256, 256)
    torch.testing.assert_close(mass.sum(-1), torch.ones(14, 256, device="cuda"), atol=1e-4, rtol=0)


def test_second_moment_lifts_blocks_whose_keys_vary():
    """The variance term is >= 0, so no block scores below its mean-pooled logit; a block of identical keys scores
    the same; and a block holding one key aligned with the query (a needle in filler) gains the most."""
    torch.manual_seed(3)
    L, bs, d = 512, 64, 64
    q = torch.randn(L, 1, d) * 0.3
    k = torch.randn(L, 1, d) * 0.3
    k[64:128] = k[64]                        # block 1: identical keys, zero variance
    k[300] = q[-1] * 8                       # block 4 holds one key aligned with the last query
    cfg = FlashPrefillConfig(block_size=bs, min_sparse_len=0)
    pooled = oq.reference.block_log_energies(q, oq.reference.pool_keys(k, torch.tensor([0, L], dtype=torch.int32),
                                                                       L, bs)[0], L, bs, 0.125, 1)
    moment = oq.rule_log_energies(q, k, 0.125, cfg, "second_moment")
    assert torch.equal(torch.isfinite(pooled), torch.isfinite(moment))
    # Energies are relative to each rule's tile max: compare gains against the zero-variance block's.
    gain = (moment - pooled)[0, -1]
    gain = gain[torch.isfinite(gain)] - gain[1]
    assert (gain >= -1e-4).all() and int(gain.argmax()) == 4


def test_sweep_points_cover_alpha_and_tau(qkv, mass):
    q, k, v, scale = qkv
    rec = oq.evaluate_layer(q, k, v, scale, CONFIG, [0.05, 0.3], 0.9, rules=("op",), modes=("per_head",),
                            taus=(0.0, 0.95))
    points = rec["sweep"]["per_head"]["op"]
    assert [(p["alpha"], p["tau"]) for p in points] == [(0.05, 0.0), (0.3, 0.0), (0.05, 0.95), (0.3, 0.95)]
    # The floor keeps at least what alpha alone keeps, and reaches more of the mass.
    assert points[3]["density"] >= points[1]["density"] and points[3]["recall_mean"] >= points[1]["recall_mean"]
    assert points[3]["recall_mean"] > points[1]["recall_mean"] or points[1]["recall_mean"] > 0.95


def test_recall_only_sweep_skips_the_outputs(qkv, mass):
    q, k, v, scale = qkv
    full = oq.evaluate_layer(q, k, v, scale, CONFIG, [0.3], 0.9, rules=("op",), modes=("per_head",))
    fast = oq.evaluate_layer(q, k, v, scale, CONFIG, [0.3], 0.9, rules=("op",), modes=("per_head",), rel_l2=False)
    a, b = full["sweep"]["per_head"]["op"][0], fast["sweep"]["per_head"]["op"][0]
    assert math.isnan(b["rel_l2"]) and math.isnan(fast["oracle"]["rel_l2"]) and a["rel_l2"] > 0
    assert (a["density"], a["recall_mean"]) == (b["density"], b["recall_mean"])


def brute_force_antidiagonal(q, k, scale, block_size, stride, heads_per_index):
    """Log-sum-exp of the scored logits with (r + t) % stride == stride - 1, per block, minus the tile's max."""
    length, hq, _ = q.shape
    kk = k.float().repeat_interleave(hq // k.shape[1], 1)
    logits = torch.einsum("qhd,khd->hqk", q.float(), kk) * scale
    r = torch.arange(length)[:, None]
    t = torch.arange(length)[None, :]
    nb = -(-length // block_size)
    block_end = torch.clamp((t // block_size + 1) * block_size, max=length) - 1
    keep = (block_end <= r) & ((r + t) % stride == stride - 1)
    logits = logits.masked_fill(~keep[None], float("-inf"))
    h_idx = hq // heads_per_index
    out = torch.full((h_idx, nb, nb), float("-inf"))
    for h in range(h_idx):
        group = logits[h * heads_per_index:(h + 1) * heads_per_index]
        for i in range(nb):
            rows = group[:, i * block_size:(i + 1) * block_size]
            top = rows.max()
            top = top if torch.isfinite(top) else torch.tensor(0.0)
            for j in range(nb):
                out[h, i, j] = torch.logsumexp(rows[:, :, j * block_size:(j + 1) * block_size].reshape(-1), 0) - top
    return out


@pytest.mark.parametrize("stride", [1, 4, 16])
@pytest.mark.parametrize("heads_per_index", [1, 2])
def test_antidiagonal_energies_match_brute_force(stride, heads_per_index):
    """The sampled entries are exactly one antidiagonal per stride x stride tile of the scored logits (stride 1:
    every scored entry, i.e. the exact block log-sum-exp), on a length that is not a multiple of the block size."""
    torch.manual_seed(5)
    q, k = torch.randn(700, 4, 32), torch.randn(700, 2, 32)
    got = oq.antidiagonal_log_energies(q, k, 0.2, 64, stride, heads_per_index)
    want = brute_force_antidiagonal(q, k, 0.2, 64, stride, heads_per_index)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="must divide the block size"):
        oq.antidiagonal_log_energies(q, k, 0.2, 64, 24, heads_per_index)


def test_antidiagonal_finds_a_needle_the_pooled_key_misses():
    """One key aligned with the last query inside a block of filler: the mean-pooled key dilutes it 64 times, the
    antidiagonal sample that meets it scores the block as the row's heaviest."""
    torch.manual_seed(3)
    L, bs, d = 512, 64, 64
    q = torch.randn(L, 1, d) * 0.3
    k = torch.randn(L, 1, d) * 0.3
    needle = 64 * 4 + 16                          # block 4; the last row (511) samples the keys t with t % 16 == 0
    k[needle] = q[-1] * 12
    cfg = FlashPrefillConfig(block_size=bs, min_sparse_len=0)
    pooled = oq.reference.block_log_energies(q, oq.reference.pool_keys(k, torch.tensor([0, L], dtype=torch.int32),
                                                                       L, bs)[0], L, bs, 0.125, 1)
    anti = oq.rule_log_energies(q, k, 0.125, cfg, "antidiag16")
    last_pooled, last_anti = pooled[0, -1, :7], anti[0, -1, :7]   # the last query block's fully visible key blocks
    assert int(last_anti.argmax()) == 4
    assert last_anti[4] - last_anti.median() > last_pooled[4] - last_pooled.median() + 1.0


def test_mean_correction_is_exact_for_a_skipped_block_of_equal_keys():
    """Skipping a key block whose keys are all equal and adding its mean-key, mean-value estimate gives dense
    attention back exactly; without the estimate the rows that see that block differ; keeping every block is dense."""
    torch.manual_seed(7)
    L, bs = 320, 64
    q, k, v = torch.randn(L, 2, 16), torch.randn(L, 1, 16), torch.randn(L, 1, 16)
    k[64:128] = k[70]                                  # key block 1: equal keys, values differ
    dense = oq.mean_corrected_attention(q, k, v, 0.25, torch.ones(2, 5, 5, dtype=torch.bool), bs)
    kk = k.repeat_interleave(2, 1)
    logits = torch.einsum("qhd,khd->hqk", q, kk) * 0.25
    logits = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(dense, want, rtol=1e-5, atol=1e-5)
    keep = torch.ones(2, 5, 5, dtype=torch.bool)
    keep[:, 3:, 1] = False                             # query blocks 3 and 4 skip key block 1
    corrected = oq.mean_corrected_attention(q, k, v, 0.25, keep, bs)
    plain = oq.mean_corrected_attention(q, k, v, 0.25, keep, bs, correct=False)
    torch.testing.assert_close(corrected, want, rtol=1e-5, atol=1e-5)
    assert (plain[192:] - want[192:]).abs().max() > 1e-2
    torch.testing.assert_close(plain[:192], want[:192], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keep must be"):
        oq.mean_corrected_attention(q, k, v, 0.25, keep[:, :4], bs)


def test_uncorrected_attention_is_the_ops_sparse_attention(qkv):
    """correct=False runs what the op runs for the same kept blocks."""
    q, k, v, scale = qkv
    index = oq.selection_index(q, k, scale, CONFIG.replace(alpha=0.3))
    keep = oq.reference.index_to_mask(index, 0, q.shape[0], q.shape[0])
    cu = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    op = oq.block_sparse_attn_varlen_func(q, k, v, index, cu, cu, q.shape[0], q.shape[0], scale)
    mine = oq.mean_corrected_attention(q, k, v, scale, keep, B, correct=False)
    torch.testing.assert_close(mine, op.float(), rtol=2e-2, atol=2e-2)
    assert oq.rel_l2(mine, op) < 5e-3


def test_default_rules_leave_the_costly_antidiagonal_study_out():
    args = oq.build_parser().parse_args(["--model", "m", "--text", "t"])
    assert args.rules == list(oq.DEFAULT_RULES) and not set(args.rules) & set(oq.ANTIDIAGONAL_STRIDES)
    assert oq.build_parser().parse_args(["--model", "m", "--text", "t", "--rules", "op,antidiag16"]).rules == \
        ["op", "antidiag16"]
