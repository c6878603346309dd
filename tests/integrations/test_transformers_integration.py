"""transformers integration: ``attn_implementation="sparse_prefill"`` runs the op on causal prefills, SDPA otherwise.

A tiny randomly initialised Qwen2 (2 layers, 2 query heads / 1 KV head, head_dim 64) built from a config, no
downloads. On CPU the op runs its plain-torch reference; ``min_sparse_len`` is lowered so 128-token prompts run sparse.
"""

import logging

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AttentionInterface, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from flashprefill_vllm.config import FlashPrefillConfig  # noqa: E402
from flashprefill_vllm.integrations import transformers as fp_tf  # noqa: E402

NAME = fp_tf.ATTN_IMPLEMENTATION
# alpha this small keeps every scored block: the sparse path must then equal dense attention.
KEEP_ALL = FlashPrefillConfig(alpha=1e-9, block_size=64, min_sparse_len=128)
# bf16 logits of a 2-layer model: the reference attends in fp32 and rounds once, SDPA on CPU rounds differently.
BF16_LOGITS = dict(atol=3e-2, rtol=3e-2)


def tiny_config() -> Qwen2Config:
    return Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(tiny_config()).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dense(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").eval()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    # conftest switches the Triton interpreter on without a GPU; the op's reference is much faster on CPU.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(fp_tf, "_config", fp_tf._config)
    fp_tf.reset_counts()


def ids(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_register_is_idempotent_and_reads_env(monkeypatch):
    monkeypatch.setenv("FLASHPREFILL_ALPHA", "0.2")
    assert fp_tf.register() == NAME
    assert fp_tf.register() == NAME
    assert AttentionInterface._global_mapping[NAME] is fp_tf.flashprefill_attention_forward
    assert NAME in AttentionMaskInterface._global_mapping
    assert fp_tf.get_config().alpha == 0.2
    fp_tf.register(KEEP_ALL)
    assert fp_tf.get_config() == KEEP_ALL
    with pytest.raises(ValueError, match="config must be a FlashPrefillConfig"):
        fp_tf.register({"alpha": 0.1})


def test_from_pretrained_keep_all_equals_sdpa(model_dir, dense):
    """Also shows the name is accepted: transformers would try to load a FlashAttention kernel for a "flash" name."""
    fp_tf.register(KEEP_ALL)
    sparse = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=NAME).eval()
    x = ids(200)
    with torch.no_grad():
        got, want = sparse(x).logits, dense(x).logits
    assert fp_tf.CALL_COUNTS == {"sparse": 2}
    torch.testing.assert_close(got.float(), want.float(), **BF16_LOGITS)


def test_sparse_path_drops_blocks(dense):
    fp_tf.register(KEEP_ALL.replace(alpha=1.0, tau=0.0, num_local_blocks=1, num_sink_blocks=0, num_dense_tail_blocks=0))
    x = ids(256)
    dense.set_attn_implementation(NAME)
    try:
        with torch.no_grad():
            got = dense(x).logits
    finally:
        dense.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = dense(x).logits
    assert fp_tf.CALL_COUNTS == {"sparse": 2}
    assert not torch.allclose(got.float(), want.float(), **BF16_LOGITS)


def test_cache_continuation_runs_bottom_right(dense):
    """A second prefill chunk over a cache (q_len < k_len): transformers passes a causal 4-D mask, which qualifies."""
    fp_tf.register(KEEP_ALL)
    x = ids(256)
    outs = {}
    for impl in ("sdpa", NAME):
        dense.set_attn_implementation(impl)
        try:
            with torch.no_grad():
                first = dense(x[:, :128], use_cache=True)
                outs[impl] = dense(x[:, 128:], past_key_values=first.past_key_values, use_cache=True).logits
        finally:
            dense.set_attn_implementation("sdpa")
    assert fp_tf.CALL_COUNTS == {"sparse": 4}
    torch.testing.assert_close(outs[NAME].float(), outs["sdpa"].float(), **BF16_LOGITS)


def test_fallbacks_short_padded_decode(dense, caplog):
    fp_tf.register(KEEP_ALL)
    caplog.set_level(logging.INFO, logger=fp_tf.__name__)
    x = ids(160, batch=2)
    mask = torch.ones_like(x)
    mask[1, :40] = 0
    dense.set_attn_implementation(NAME)
    try:
        with torch.no_grad():
            short = dense(x[:1, :100]).logits
            padded = dense(x, attention_mask=mask).logits
            generated = dense.generate(x[:1], max_new_tokens=3, do_sample=False)
    finally:
        dense.set_attn_implementation("sdpa")
    assert fp_tf.CALL_COUNTS == {"short": 2, "mask": 2, "sparse": 2, "decode": 4}
    with torch.no_grad():
        assert torch.equal(short, dense(x[:1, :100]).logits)
        assert torch.equal(padded, dense(x, attention_mask=mask).logits)
    assert generated.shape == (1, 163)
    decode_logs = [r for r in caplog.records if "decode step" in r.getMessage()]
    assert len(decode_logs) == 1


class _Attention(torch.nn.Module):
    def __init__(self, is_causal=True):
        super().__init__()
        self.is_causal, self.num_key_value_groups, self.layer_idx = is_causal, 2, 0


@pytest.mark.parametrize("case", ["non_causal", "dropout", "head_dim", "dtype", "autograd", "sliding_window",
                                  "softcap"])
def test_unsupported_calls_run_sdpa(case):
    fp_tf.register(KEEP_ALL.replace(min_sparse_len=0))
    g = torch.Generator().manual_seed(1)
    dim = 32 if case == "head_dim" else 64
    dtype = torch.float32 if case == "dtype" else torch.bfloat16
    q = torch.randn(1, 4, 64, dim, generator=g).to(dtype).requires_grad_(case == "autograd")
    k, v = (torch.randn(1, 2, 64, dim, generator=g).to(dtype) for _ in range(2))
    module = _Attention(is_causal=case != "non_causal")
    kwargs = dict(dropout=0.1 if case == "dropout" else 0.0, scaling=dim ** -0.5)
    if case in ("sliding_window", "softcap"):
        kwargs[case] = 32
    torch.manual_seed(2)
    got, _ = fp_tf.flashprefill_attention_forward(module, q, k, v, None, **kwargs)
    torch.manual_seed(2)
    want, _ = sdpa_attention_forward(module, q, k, v, None, **kwargs)
    assert fp_tf.CALL_COUNTS == {case: 1}
    assert torch.equal(got, want)


def test_causal_key_len():
    def bottom_right(q_len, n, kv_len):
        rows = torch.arange(q_len)[:, None] + n - q_len
        return (torch.arange(kv_len)[None, :] <= rows).expand(2, 1, q_len, kv_len)

    assert fp_tf.causal_key_len(None, 8, 8) == 8
    assert fp_tf.causal_key_len(None, 8, 20) == 8          # empty static-cache slots past the prompt
    assert fp_tf.causal_key_len(bottom_right(4, 12, 12), 4, 12) == 12
    assert fp_tf.causal_key_len(bottom_right(4, 12, 16), 4, 16) == 12
    padded = bottom_right(4, 12, 12).clone()
    padded[1, :, :, 0] = False
    assert fp_tf.causal_key_len(padded, 4, 12) is None
    assert fp_tf.causal_key_len(bottom_right(4, 12, 12).float(), 4, 12) is None
    assert fp_tf.causal_key_len(torch.ones(1, 1, 4, 12, dtype=torch.bool), 4, 12) is None


@pytest.mark.gpu
def test_keep_all_equals_sdpa_on_cuda(model_dir):
    """The Triton kernels inside a real forward pass (bf16 on the GPU)."""
    fp_tf.register(KEEP_ALL.replace(block_size=128, min_sparse_len=1024))
    dev = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to(dev).eval()
    x = ids(2000).to(dev)
    with torch.no_grad():
        want = model(x).logits
        model.set_attn_implementation(NAME)
        got = model(x).logits
    assert fp_tf.CALL_COUNTS == {"sparse": 2}
    torch.testing.assert_close(got.float(), want.float(), **BF16_LOGITS)
