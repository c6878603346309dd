"""Knobs of sparse prefill, in one frozen dataclass, and the ``FLASHPREFILL*`` environment variables that set them.

Every consumer (the op, the vLLM backend, benchmarks) receives a :class:`FlashPrefillConfig`; only this module
validates values, so every error names the knob, the value and what is allowed. This is also the only module that
reads ``FLASHPREFILL*`` variables (:data:`ENV_VARS`, :meth:`FlashPrefillConfig.from_env`, :func:`env_enabled`,
:func:`env_log_density`, :func:`env_value`, :func:`env_explicit_fields`). It imports nothing of the package.

``FLASHPREFILL_PRESET`` names an alpha preset: :mod:`flashprefill_vllm.presets` validates it
(:func:`flashprefill_vllm.presets.env_preset`) and applies it (:func:`flashprefill_vllm.presets.active_preset`, once
per process and served model), with this precedence: an explicit ``FLASHPREFILL_ALPHA`` beats the preset's global alpha and drops its
per-layer alphas; the preset's block size applies unless ``FLASHPREFILL_BLOCK_SIZE`` is set (a different explicit
block size is an error for a named preset or file, and skips the preset with ``auto``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

# Selection block sizes the kernels are built for (tokens per query block and per key block).
ALLOWED_BLOCK_SIZES = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class FlashPrefillConfig:
    # Max-relative threshold: keep key block j iff its energy >= alpha * (largest energy of the row). Larger alpha
    # keeps fewer blocks. With the mass floor on, alpha sets the sparsity tried for and tau the share kept at least.
    # Defaults (alpha 0.3, tau 0.99, first layer dense): alpha and the dense first layer picked by
    # benchmarks/choose_defaults.py from operator-level sweeps of Qwen2.5-Coder-0.5B (8K-31.7K) and -1.5B (8K), the
    # sparsest point with mean recall >= 0.97 and every layer >= 0.95 on both; tau then raised from that rule's 0.98
    # to 0.99 by the accuracy harness in vLLM, the lowest floor tried that keeps perplexity within +0.5% of dense on
    # both models (README "Choosing alpha and tau").
    alpha: float = 0.3
    # Mass floor: each (index head, query block) row also keeps its highest-energy blocks until the kept blocks hold
    # at least this share of the row's total estimated energy (sink and local blocks count as kept). 0 turns the
    # floor off (alpha alone decides); 1 keeps every scored block within 2**-24 of the row's largest energy.
    tau: float = 0.99
    # First decoder layers whose prefills run stock (dense) attention in vLLM: the mean-pooled estimate ranks key
    # blocks worst in layer 0 (measured on Qwen2.5-Coder-0.5B and -1.5B). Read by the serving backends, not the op.
    num_dense_layers: int = 1
    # Tokens per query block and per key block (selection granularity).
    block_size: int = 128
    # First key blocks every query block keeps (attention sinks).
    num_sink_blocks: int = 2
    # Key blocks kept up to the diagonal (local window, diagonal included); at least 1 so no row is left empty.
    num_local_blocks: int = 4
    # Last query blocks of each sequence that attend densely (they produce the first generated token).
    num_dense_tail_blocks: int = 2
    # Sequences whose key length is below this attend densely (selection does not pay off on short prompts). In vLLM
    # on an H100 (Qwen2.5-Coder-0.5B, tau 0.99, FA4 route), a prompt's first 16K step kept 0.79 of its blocks and
    # ran 0.74x of dense, while every later 16K step (density <= 0.67) gained: 24576 runs the first step dense.
    min_sparse_len: int = 24576
    # False: one block list per query head (measured faster to select on H100, same attention speed); True: one list
    # per KV group, shared by its query heads (g times smaller index).
    gqa_shared_index: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not 0.0 < a <= 1.0:
            raise ValueError(f"alpha must be a number in (0, 1]; got {a!r}")
        t = self.tau
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.0 <= t <= 1.0:
            raise ValueError(f"tau must be a number in [0, 1] (0: no mass floor); got {t!r}")
        if self.block_size not in ALLOWED_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {ALLOWED_BLOCK_SIZES}; got {self.block_size!r}")
        for name, lo in (("num_sink_blocks", 0), ("num_local_blocks", 1), ("num_dense_tail_blocks", 0),
                         ("min_sparse_len", 0), ("num_dense_layers", 0)):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"{name} must be an integer >= {lo}; got {val!r}")
        if not isinstance(self.gqa_shared_index, bool):
            raise ValueError(f"gqa_shared_index must be a bool; got {self.gqa_shared_index!r}")

    def replace(self, **changes) -> "FlashPrefillConfig":
        """A copy with some fields changed; ``None`` values are ignored (so callers can forward optional kwargs)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown FlashPrefillConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "FlashPrefillConfig":
        """The config that the ``FLASHPREFILL_*`` knob variables of :data:`ENV_VARS` describe (``os.environ`` by
        default); unset or empty variables keep the field defaults. ``FLASHPREFILL_PRESET`` is not read here: see
        :func:`flashprefill_vllm.presets.env_preset` and :func:`flashprefill_vllm.presets.active_preset`.

        Raises:
            ValueError: naming the variable, its value and what is allowed, for the first invalid one.
        """
        environ = os.environ if environ is None else environ
        cfg = cls()
        for var in ENV_VARS:
            if var.field is None:
                continue
            value = _read(var, environ)
            if value is None:
                continue
            try:
                cfg = cfg.replace(**{var.field: value})
            except ValueError:
                raise _invalid(var, environ[var.name]) from None
        return cfg


@dataclasses.dataclass(frozen=True)
class EnvVar:
    """One ``FLASHPREFILL*`` environment variable: the type it parses to, its default (the value used when it is
    unset or empty), the :class:`FlashPrefillConfig` field it sets (``None`` for plugin-level switches), what values
    are allowed (quoted in errors) and what it does."""

    name: str
    type: type
    default: object
    field: str | None
    allowed: str
    doc: str


_DEFAULTS = FlashPrefillConfig()

# Every variable, declared once. Booleans accept 1/0/true/false (any case); unset or empty means the default.
ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("FLASHPREFILL", bool, False, None, "1, 0, true or false",
           "master switch: serve the FLASH_ATTN backend slot with FlashPrefill (long prefills, whole or in chunks, run sparse)"),
    EnvVar("FLASHPREFILL_ALPHA", float, _DEFAULTS.alpha, "alpha", "a number in (0, 1]",
           "max-relative threshold: keep a key block iff its energy >= alpha * the row's largest; larger keeps fewer"),
    EnvVar("FLASHPREFILL_TAU", float, _DEFAULTS.tau, "tau", "a number in [0, 1]",
           "mass floor: each query block also keeps its highest-energy key blocks until they hold this share of its "
           "estimated attention energy (0: alpha alone decides)"),
    EnvVar("FLASHPREFILL_BLOCK_SIZE", int, _DEFAULTS.block_size, "block_size",
           "one of " + ", ".join(map(str, ALLOWED_BLOCK_SIZES)), "tokens per query block and per key block"),
    EnvVar("FLASHPREFILL_MIN_LEN", int, _DEFAULTS.min_sparse_len, "min_sparse_len", "an integer >= 0",
           "prompts shorter than this many tokens run dense (stock FlashAttention)"),
    EnvVar("FLASHPREFILL_SINK_BLOCKS", int, _DEFAULTS.num_sink_blocks, "num_sink_blocks", "an integer >= 0",
           "first key blocks every query block keeps (attention sinks)"),
    EnvVar("FLASHPREFILL_LOCAL_BLOCKS", int, _DEFAULTS.num_local_blocks, "num_local_blocks", "an integer >= 1",
           "key blocks kept up to the diagonal (local window, diagonal included)"),
    EnvVar("FLASHPREFILL_TAIL_BLOCKS", int, _DEFAULTS.num_dense_tail_blocks, "num_dense_tail_blocks",
           "an integer >= 0", "last query blocks of each prompt that attend densely (they produce the first token)"),
    EnvVar("FLASHPREFILL_DENSE_LAYERS", int, _DEFAULTS.num_dense_layers, "num_dense_layers", "an integer >= 0",
           "first decoder layers whose prefills run stock (dense) FlashAttention"),
    EnvVar("FLASHPREFILL_GQA_SHARED", bool, _DEFAULTS.gqa_shared_index, "gqa_shared_index", "1, 0, true or false",
           "one block list per KV group (1) or one per query head (0)"),
    EnvVar("FLASHPREFILL_LOG_DENSITY", bool, False, None, "1, 0, true or false",
           "log the block density each sparse prefill chose, per layer (reads the GPU: one host sync per layer)"),
    EnvVar("FLASHPREFILL_KERNEL", str, "auto", None, "auto, fa4 or triton",
           "the sparse attention kernel: fa4 (vLLM's FlashAttention-4 block-sparse forward, Hopper, head_dim 64-128, "
           "128-token blocks), triton (ours), or auto (fa4 where it runs, else triton)"),
    EnvVar("FLASHPREFILL_PRESET", str, None, None,
           "auto, a built-in preset name (see flashprefill_vllm.presets) or a path to a preset JSON file",
           "alpha preset (global and per-layer alphas, block size): a file, a built-in name, or auto (the built-in "
           "preset matching the served model; none matching: the default alpha); FLASHPREFILL_ALPHA overrides it"),
)
_ENV_BY_NAME = {var.name: var for var in ENV_VARS}
# Variables of the tests and tools (not knobs): known, so they are not reported as misspellings.
TOOL_ENV_VARS = ("FLASHPREFILL_TEST_MODEL", "FLASHPREFILL_TEST_TEXT", "FLASHPREFILL_TEST_LONG_OVERRIDES",
                 "FLASHPREFILL_TEST_ARGS", "FLASHPREFILL_GPU_SEEDS", "FLASHPREFILL_GPU_PAGED_SEEDS",
                 "FLASHPREFILL_OFFLINE", "FLASHPREFILL_VLLM_SRC_CACHE")
_TRUE, _FALSE = ("1", "true"), ("0", "false")


def _invalid(var: EnvVar, raw: str) -> ValueError:
    return ValueError(f"invalid {var.name}={raw!r}: must be {var.allowed}")


def _read(var: EnvVar, environ: Mapping[str, str]):
    """The parsed value of ``var`` in ``environ``, or ``None`` when it is unset or empty."""
    raw = environ.get(var.name)
    if raw is None or not raw.strip():
        return None
    if var.type is str:
        return raw.strip()
    text = raw.strip().lower()
    if var.type is bool:
        if text in _TRUE + _FALSE:
            return text in _TRUE
        raise _invalid(var, raw)
    try:
        return var.type(text)
    except ValueError:
        raise _invalid(var, raw) from None


def _flag(name: str, environ: Mapping[str, str] | None) -> bool:
    var = _ENV_BY_NAME[name]
    value = _read(var, os.environ if environ is None else environ)
    return var.default if value is None else value


def env_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``FLASHPREFILL`` switches the plugin on (off when unset). Raises ``ValueError`` on an invalid value."""
    return _flag("FLASHPREFILL", environ)


def env_log_density(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``FLASHPREFILL_LOG_DENSITY`` asks to log each sparse prefill's density (off when unset)."""
    return _flag("FLASHPREFILL_LOG_DENSITY", environ)


KERNEL_CHOICES = ("auto", "fa4", "triton")


def env_kernel(environ: Mapping[str, str] | None = None) -> str:
    """``FLASHPREFILL_KERNEL`` (``auto`` when unset), lower-cased. Raises ``ValueError`` on a value outside
    :data:`KERNEL_CHOICES`."""
    var = _ENV_BY_NAME["FLASHPREFILL_KERNEL"]
    value = _read(var, os.environ if environ is None else environ)
    if value is None:
        return var.default
    if value.lower() not in KERNEL_CHOICES:
        raise _invalid(var, value)
    return value.lower()


def env_unknown_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per set ``FLASHPREFILL*`` variable that no part of the package reads (a misspelling would
    otherwise be ignored without a word), naming the closest known variable."""
    import difflib

    environ = os.environ if environ is None else environ
    known = [var.name for var in ENV_VARS] + list(TOOL_ENV_VARS)
    warnings = []
    for name in sorted(n for n in environ if n.upper().startswith("FLASHPREFILL") and n not in known):
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"known variables: {', '.join(v.name for v in ENV_VARS)}"
        warnings.append(f"FlashPrefill: ignoring unknown environment variable {name}={environ[name]!r}: {hint}")
    return warnings


def env_explicit_fields(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The :class:`FlashPrefillConfig` fields whose ``FLASHPREFILL_*`` variable is set (non-empty): what a preset
    must not override. Values are not validated here (:meth:`FlashPrefillConfig.from_env` does)."""
    environ = os.environ if environ is None else environ
    return frozenset(var.field for var in ENV_VARS
                     if var.field is not None and (environ.get(var.name) or "").strip())


def env_value(name: str, environ: Mapping[str, str] | None = None):
    """The parsed value of the ``FLASHPREFILL*`` variable ``name`` (one of :data:`ENV_VARS`), ``None`` when unset or
    empty. Raises ``ValueError`` (``invalid NAME='raw': must be ...``) on an invalid value."""
    return _read(_ENV_BY_NAME[name], os.environ if environ is None else environ)
