"""Alpha presets: which ``alpha`` (globally, and optionally per layer) to use for a model, with where it came from.

``FLASHPREFILL_PRESET`` (see :mod:`flashprefill_vllm.config`) names one: a path to a preset file, a built-in preset
name (:data:`BUILTIN_PRESETS`), or ``auto`` (the built-in preset matching the served model, if any).

Preset file format (JSON, ``version`` 1)::

    {
      "format": "flashprefill-preset",          # required, this exact string
      "version": 1,                             # required, 1 is the only version so far
      "name": "qwen2.5-coder-0.5b-instruct",    # required, non-empty string
      "match": {                                # required: which served models the preset is for
        "names": ["*qwen2.5-coder-0.5b-instruct"],   # required, >= 1 glob pattern (fnmatch, case-insensitive),
                                                     # tested against the served model name or path (trailing "/"
                                                     # removed), e.g. "Qwen/Qwen2.5-7B-Instruct" or "/models/x"
        "architectures": ["Qwen2ForCausalLM"]        # optional: if given, the model's architecture must be listed
      },
      "block_size": 128,                        # required, 64/128/256: the block size the alphas were derived at
      "alpha": 0.12,                            # required, in (0, 1]: the global alpha
      "tau": 0.9,                               # optional, in [0, 1]: the mass floor (absent: the default or
                                                # FLASHPREFILL_TAU)
      "layer_alphas": {"0": "dense", "17": 0.2},  # optional: alpha per layer index (decimal string keys >= 0),
                                                # or "dense": that layer's prefills run dense attention (for layers
                                                # no alpha serves); layers not listed use the global alpha
      "provenance": "calibrated by ...",        # required, non-empty: how the numbers were obtained
      "calibration": {...}                      # optional (object or null): the calibration summary
    }

Unknown fields are errors (a misspelled ``layer_alpha`` must not be ignored silently). Every loader error names the
file, the field, the value and what is allowed.

Precedence (applied by :func:`resolve_active`):

- An explicit ``FLASHPREFILL_ALPHA`` beats the preset's global alpha **and** drops its per-layer alphas: the user
  asked for one alpha, every layer gets it (the per-layer values were chosen relative to the calibrated ones).
- The preset's ``block_size`` replaces the default. An explicit ``FLASHPREFILL_BLOCK_SIZE`` that differs is an error
  for a named preset or a file (its alphas mean something else at another block size); with ``auto`` the preset
  is skipped instead, with one log line, and the default alpha is used.
- The preset's ``tau`` (if it has one) replaces the default mass floor; an explicit ``FLASHPREFILL_TAU`` beats it.
- Every other knob comes from its variable or its default; a preset sets only alphas, tau and the block size.

Layer indices follow the model's decoder layers, as in vLLM layer names (``model.layers.17.self_attn.attn``) and
HF module paths (``model.layers.17.self_attn``); see :func:`layer_index` and :func:`config_for_layer`.

Built-in presets are declared below in the file format itself (:data:`_BUILTIN_DATA`) and validated by the same
loader. To add one measured by ``python -m flashprefill_vllm.eval calibrate ... --out preset.json``, paste the
file's JSON object into :data:`_BUILTIN_DATA` (give it a ``match`` that fits only that model).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence

from .config import ALLOWED_BLOCK_SIZES, FlashPrefillConfig, env_explicit_fields, env_value

logger = logging.getLogger(__name__)

PRESET_FORMAT = "flashprefill-preset"
PRESET_VERSION = 1
SUPPORTED_VERSIONS = (1,)
_FIELDS = ("format", "version", "name", "match", "block_size", "alpha", "tau", "layer_alphas", "provenance",
           "calibration")
_REQUIRED = ("format", "version", "name", "match", "block_size", "alpha", "provenance")
_MATCH_FIELDS = ("names", "architectures")
# A ``layer_alphas`` value: the layer's prefills run stock FlashAttention (see layer_runs_dense).
DENSE = "dense"


@dataclasses.dataclass(frozen=True)
class Preset:
    """One validated preset. ``layer_alphas`` is a sorted tuple of ``(layer index, alpha)`` pairs (hashable, so a
    preset can key caches); :meth:`layer_alpha` looks one up. ``source`` says where it was loaded from."""

    name: str
    names: tuple[str, ...]
    architectures: tuple[str, ...]
    block_size: int
    alpha: float
    layer_alphas: tuple[tuple[int, float | str], ...]
    provenance: str
    calibration: dict | None = dataclasses.field(default=None, compare=False, hash=False)
    source: str = dataclasses.field(default="<memory>", compare=False)
    tau: float | None = None

    def layer_alpha(self, index: int | None) -> float | str | None:
        """The alpha listed for layer ``index`` (or :data:`DENSE`), or ``None`` (not listed, or ``index`` is
        ``None``)."""
        if index is not None:
            for idx, alpha in self.layer_alphas:
                if idx == index:
                    return alpha
        return None

    def without_layer_alphas(self) -> "Preset":
        return dataclasses.replace(self, layer_alphas=())

    def to_dict(self) -> dict:
        """The preset as a file-format object (what :func:`save_preset` writes)."""
        match: dict = {"names": list(self.names)}
        if self.architectures:
            match["architectures"] = list(self.architectures)
        data = {"format": PRESET_FORMAT, "version": PRESET_VERSION, "name": self.name, "match": match,
                "block_size": self.block_size, "alpha": self.alpha}
        if self.tau is not None:
            data["tau"] = self.tau
        if self.layer_alphas:
            data["layer_alphas"] = {str(i): a for i, a in self.layer_alphas}
        data["provenance"] = self.provenance
        if self.calibration is not None:
            data["calibration"] = self.calibration
        return data


# ---------------------------------------------------------------------------------------------------------------
# Loading and validation


def _error(source: str, field: str, value, allowed: str) -> ValueError:
    return ValueError(f"preset {source}: field {field!r} is {value!r}; must be {allowed}")


def _alpha(source: str, field: str, value) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not 0.0 < value <= 1.0):
        raise _error(source, field, value, "a number in (0, 1]")
    return float(value)


def _string_list(source: str, field: str, value, required: bool) -> tuple[str, ...]:
    allowed = ("a non-empty list of non-empty strings" if required else "a list of non-empty strings")
    if not isinstance(value, list) or (required and not value):
        raise _error(source, field, value, allowed)
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise _error(source, field, value, allowed)
    return tuple(item.strip() for item in value)


def _match(source: str, value) -> tuple[tuple[str, ...], tuple[str, ...]]:
    allowed = 'an object {"names": [glob, ...], "architectures": [class name, ...] (optional)}'
    if not isinstance(value, dict):
        raise _error(source, "match", value, allowed)
    unknown = sorted(set(value) - set(_MATCH_FIELDS))
    if unknown:
        raise _error(source, f"match.{unknown[0]}", value[unknown[0]],
                     f"absent (allowed fields: {', '.join(_MATCH_FIELDS)})")
    if "names" not in value:
        raise _error(source, "match.names", None, "a non-empty list of non-empty strings (it is required)")
    names = _string_list(source, "match.names", value["names"], required=True)
    archs = _string_list(source, "match.architectures", value.get("architectures", []), required=False)
    return names, archs


def _layer_alphas(source: str, value) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _error(source, "layer_alphas", value, 'an object mapping layer indices to alphas, e.g. {"0": 0.05}')
    pairs = []
    for key, alpha in value.items():
        if not isinstance(key, str) or not key.isdigit() or not key.isascii():
            raise _error(source, f"layer_alphas[{key!r}]", key, "a layer index written as a decimal string >= 0")
        if alpha != DENSE and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                               or not math.isfinite(alpha) or not 0.0 < alpha <= 1.0):
            raise _error(source, f"layer_alphas[{key!r}]", alpha, f'a number in (0, 1] or "{DENSE}"')
        pairs.append((int(key), alpha if alpha == DENSE else float(alpha)))
    indices = [i for i, _ in pairs]
    if len(set(indices)) != len(indices):
        raise _error(source, "layer_alphas", value, "one entry per layer index (found e.g. '7' and '07')")
    return tuple(sorted(pairs))


def parse_preset(data, source: str = "<memory>") -> Preset:
    """Validate a file-format object (see the module docstring) into a :class:`Preset`.

    Raises:
        ValueError: ``preset <source>: field '<field>' is <value>; must be <allowed>`` for the first problem.
    """
    if not isinstance(data, dict):
        raise _error(source, "<top level>", data, "a JSON object")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise _error(source, unknown[0], data[unknown[0]], f"absent (allowed fields: {', '.join(_FIELDS)})")
    for field in _REQUIRED:
        if field not in data:
            raise ValueError(f"preset {source}: field {field!r} is missing; it is required "
                             f"(required fields: {', '.join(_REQUIRED)})")
    if data["format"] != PRESET_FORMAT:
        raise _error(source, "format", data["format"], repr(PRESET_FORMAT))
    version = data["version"]
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise _error(source, "version", version, "one of " + ", ".join(map(str, SUPPORTED_VERSIONS)))
    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        raise _error(source, "name", name, "a non-empty string")
    names, archs = _match(source, data["match"])
    block_size = data["block_size"]
    if isinstance(block_size, bool) or block_size not in ALLOWED_BLOCK_SIZES:
        raise _error(source, "block_size", block_size, "one of " + ", ".join(map(str, ALLOWED_BLOCK_SIZES)))
    alpha = _alpha(source, "alpha", data["alpha"])
    tau = data.get("tau")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau)
                            or not 0.0 <= tau <= 1.0):
        raise _error(source, "tau", tau, "a number in [0, 1] (the mass floor; 0: off) or absent")
    layer_alphas = _layer_alphas(source, data.get("layer_alphas"))
    provenance = data["provenance"]
    if not isinstance(provenance, str) or not provenance.strip():
        raise _error(source, "provenance", provenance, "a non-empty string saying how the values were obtained")
    calibration = data.get("calibration")
    if calibration is not None and not isinstance(calibration, dict):
        raise _error(source, "calibration", calibration, "an object (the calibration summary) or null")
    return Preset(name=name.strip(), names=names, architectures=archs, block_size=int(block_size), alpha=alpha,
                  layer_alphas=layer_alphas, provenance=provenance.strip(), calibration=calibration, source=source,
                  tau=None if tau is None else float(tau))


def load_preset(path: str | os.PathLike) -> Preset:
    """Read and validate a preset file. Cached per (absolute path, modification time): loaded once per process.

    Raises:
        ValueError: naming the file (unreadable, not JSON, or a field as in :func:`parse_preset`).
    """
    path = os.path.abspath(os.fspath(path))
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError as err:
        raise ValueError(f"preset {path}: cannot read the file ({err.strerror or err})") from None
    return _load_cached(path, mtime)


@functools.lru_cache(maxsize=32)
def _load_cached(path: str, mtime: int) -> Preset:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"preset {path}: cannot read the file ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"preset {path}: not valid JSON (line {err.lineno} column {err.colno}: {err.msg})") from None
    return parse_preset(data, source=path)


def save_preset(preset: Preset, path: str | os.PathLike) -> None:
    """Write ``preset`` in the file format (validated first, so what is written always loads)."""
    data = preset.to_dict()
    parse_preset(data, source=os.fspath(path))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------------------------------------
# Built-in presets

_PUBLISHED = ("published, not re-derived under flashprefill_vllm's selection rule: the FlashPrefill authors' value "
              "for {model} at block size 128 (sink 2, local 4, dense tail 2 blocks, one list per query head), set "
              "for their own kernels; by the authors' account alpha was chosen for about 70% of blocks kept on a "
              "4096-token needle-in-a-haystack prompt (a density target, not a recall target). flashprefill_vllm "
              "implements the same max-relative block-energy threshold independently (its energies leave out the "
              "padding rows of a partial last query block, which the authors' kernels count); no recall or "
              "density was measured for this model here")


def _published(name: str, model: str, pattern: str, architecture: str, alpha: float) -> dict:
    return {"format": PRESET_FORMAT, "version": PRESET_VERSION, "name": name,
            "match": {"names": [pattern], "architectures": [architecture]}, "block_size": 128, "alpha": alpha,
            "provenance": _PUBLISHED.format(model=model), "calibration": None}


# Built-in presets in the file format. Patterns are end-anchored so that other sizes and fine-tunes of the family
# do not match (serve those with a calibrated preset file, or name a built-in explicitly).
_BUILTIN_DATA: tuple[dict, ...] = (
    _published("llama-3.1-8b-instruct", "Llama-3.1-8B-Instruct", "*llama-3.1-8b-instruct", "LlamaForCausalLM", 0.18),
    _published("qwen2.5-7b-instruct", "Qwen2.5-7B-Instruct", "*qwen2.5-7b-instruct", "Qwen2ForCausalLM", 0.08),
    _published("qwen3-30b-a3b-instruct-2507", "Qwen3-30B-A3B-Instruct-2507", "*qwen3-30b-a3b-instruct-2507",
               "Qwen3MoeForCausalLM", 0.12),
)

BUILTIN_PRESETS: dict[str, Preset] = {
    p.name: p for p in (parse_preset(d, source=f"built-in {d['name']!r}") for d in _BUILTIN_DATA)}


def builtin_preset(name: str) -> Preset | None:
    """The built-in preset called ``name`` (case-insensitive), or ``None``."""
    return BUILTIN_PRESETS.get(name.strip().lower())


def _normalize_model(model: str) -> str:
    return model.strip().rstrip("/\\").lower()


def match_score(preset: Preset, model: str | None, architectures: Sequence[str] = ()) -> int | None:
    """How specifically ``preset`` matches the served model: the length of its longest matching name pattern
    (wildcards not counted), or ``None`` if no name pattern matches, or if the preset lists architectures, the
    model's are known, and none of them is listed."""
    if not model:
        return None
    name = _normalize_model(model)
    hits = [p for p in preset.names if fnmatch.fnmatchcase(name, p.lower())]
    if not hits:
        return None
    if preset.architectures and architectures and not set(preset.architectures) & set(architectures):
        return None
    return max(len(p.replace("*", "").replace("?", "")) for p in hits)


def match_builtin(model: str | None, architectures: Sequence[str] = (),
                  presets: Iterable[Preset] | None = None) -> Preset | None:
    """The built-in preset (or one of ``presets``) that matches the served model most specifically (ties: the first
    declared), or ``None``."""
    best, best_score = None, -1
    for preset in BUILTIN_PRESETS.values() if presets is None else presets:
        score = match_score(preset, model, architectures)
        if score is not None and score > best_score:
            best, best_score = preset, score
    return best


def lookup_preset(spec: str) -> Preset:
    """The preset a ``FLASHPREFILL_PRESET`` value other than ``auto`` names: a built-in name, else a file path.

    Raises:
        ValueError: no such built-in preset and no such file, or an invalid file.
    """
    preset = builtin_preset(spec)
    if preset is not None:
        return preset
    if os.path.isfile(spec):
        return load_preset(spec)
    raise ValueError(f"{spec!r} is neither a built-in preset ({', '.join(BUILTIN_PRESETS)}) nor an existing file")


# ---------------------------------------------------------------------------------------------------------------
# Applying a preset


@dataclasses.dataclass(frozen=True)
class ActivePreset:
    """What a process serves with: the global ``config`` (the ``FLASHPREFILL_*`` knobs with the preset's block size
    and global alpha applied, per the precedence rule), the ``preset`` whose per-layer alphas apply (``None``: no
    preset, or none applies; its ``layer_alphas`` are emptied when ``FLASHPREFILL_ALPHA`` overrides), and the
    ``message`` logged once to say so; ``warnings`` are logged once too, as warnings (a preset made for another
    model)."""

    config: FlashPrefillConfig
    preset: Preset | None
    message: str
    warnings: tuple[str, ...] = ()


def resolve_active(spec: str | None, config: FlashPrefillConfig, explicit: frozenset[str] | set[str],
                   model: str | None = None, architectures: Sequence[str] = ()) -> ActivePreset:
    """Apply the preset ``spec`` (a ``FLASHPREFILL_PRESET`` value: ``None``, ``"auto"``, a built-in name or a path)
    to ``config`` (from :meth:`FlashPrefillConfig.from_env`); ``explicit`` holds the config fields whose variables
    were set (:func:`~flashprefill_vllm.config.env_explicit_fields`). Pure apart from reading a preset file.

    Raises:
        ValueError: an invalid preset, or a named/file preset whose block size contradicts ``FLASHPREFILL_BLOCK_SIZE``.
    """
    if spec is None:
        return ActivePreset(config, None, "")
    archs = ", ".join(architectures) or "unknown"
    if spec.strip().lower() == "auto":
        preset = match_builtin(model, architectures)
        if preset is None:
            return ActivePreset(config, None, (
                f"FlashPrefill: FLASHPREFILL_PRESET=auto: no built-in preset matches model {model!r} (architectures "
                f"{archs}; built-in: {', '.join(BUILTIN_PRESETS)}); using alpha={config.alpha:g}"
                f"{' from FLASHPREFILL_ALPHA' if 'alpha' in explicit else ' (the default)'}"))
        if "block_size" in explicit and config.block_size != preset.block_size:
            return ActivePreset(config, None, (
                f"FlashPrefill: FLASHPREFILL_PRESET=auto: preset {preset.name!r} matches model {model!r} but was "
                f"derived at block size {preset.block_size}, not FLASHPREFILL_BLOCK_SIZE={config.block_size}; "
                f"not using it (alpha={config.alpha:g})"))
        how = f"FLASHPREFILL_PRESET=auto matched model {model!r}"
    else:
        preset = lookup_preset(spec)
        if "block_size" in explicit and config.block_size != preset.block_size:
            raise ValueError(block_size_conflict(spec, preset, config.block_size))
        how = f"FLASHPREFILL_PRESET={spec}"
        if model and match_score(preset, model, architectures) is None:
            active = _apply(preset, config, explicit, how)
            return dataclasses.replace(active, warnings=(
                f"FlashPrefill: FLASHPREFILL_PRESET={spec}: preset {preset.name!r} was made for models matching "
                f"{list(preset.names)}"
                f"{f' with architectures {list(preset.architectures)}' if preset.architectures else ''}"
                f", not the served model {model!r} (architectures {archs}); its alphas may not suit this model",))
    return _apply(preset, config, explicit, how)


def env_preset(environ=None) -> str | None:
    """The ``FLASHPREFILL_PRESET`` value: ``None`` (unset or empty), ``"auto"``, a built-in preset name (lower
    case) or a path to a preset file, which is loaded and validated here.

    Raises:
        ValueError: ``invalid FLASHPREFILL_PRESET=...: must be ...`` for an unknown name or a missing file; the
            preset loader's error (naming the file, field, value and what is allowed) for an invalid file; or a
            named/file preset derived at another block size than an explicit ``FLASHPREFILL_BLOCK_SIZE``.
    """
    environ = os.environ if environ is None else environ
    name = "FLASHPREFILL_PRESET"
    value = env_value(name, environ)
    if value is None:
        return None
    if value.lower() == "auto":
        return "auto"
    preset = builtin_preset(value)
    if preset is not None:
        spec = preset.name
    elif os.path.isfile(value):
        try:
            preset = load_preset(value)
        except ValueError as err:
            raise ValueError(f"invalid {name}={environ[name]!r}: {err}") from None
        spec = value
    else:
        raise ValueError(f"invalid {name}={environ[name]!r}: must be auto, a built-in preset name "
                         f"({', '.join(BUILTIN_PRESETS)}) or a path to a preset JSON file "
                         f"(no such file: {os.path.abspath(value)})")
    try:
        block_size = env_value("FLASHPREFILL_BLOCK_SIZE", environ)
    except ValueError:
        block_size = None  # reported by FlashPrefillConfig.from_env, naming FLASHPREFILL_BLOCK_SIZE
    if block_size in ALLOWED_BLOCK_SIZES and block_size != preset.block_size:  # others: from_env names the variable
        raise ValueError(block_size_conflict(value, preset, block_size))
    return spec


def env_config(environ=None) -> tuple[FlashPrefillConfig, str | None]:
    """The ``FLASHPREFILL_*`` knobs and the validated ``FLASHPREFILL_PRESET`` (not yet applied: ``auto`` needs the
    served model), what vLLM's start-up checks. Raises ``ValueError`` naming the first invalid variable."""
    environ = os.environ if environ is None else environ
    spec = env_preset(environ)
    return FlashPrefillConfig.from_env(environ), spec


def block_size_conflict(spec: str, preset: Preset, block_size: int) -> str:
    return (f"invalid FLASHPREFILL_PRESET={spec!r} with FLASHPREFILL_BLOCK_SIZE={block_size}: the preset "
            f"{preset.name!r} was derived at block size {preset.block_size}; unset FLASHPREFILL_BLOCK_SIZE or set "
            f"it to {preset.block_size}")


def _apply(preset: Preset, config: FlashPrefillConfig, explicit, how: str) -> ActivePreset:
    config = config.replace(block_size=preset.block_size)
    if preset.tau is not None and "tau" not in explicit:
        config = config.replace(tau=preset.tau)
    if "alpha" in explicit:
        dropped = f"; its {len(preset.layer_alphas)} per-layer alphas are not used" if preset.layer_alphas else ""
        return ActivePreset(config, preset.without_layer_alphas(), (
            f"FlashPrefill: {how}: preset {preset.name!r} (block_size={preset.block_size}), but FLASHPREFILL_ALPHA="
            f"{config.alpha:g} overrides its alpha {preset.alpha:g}{dropped}"))
    config = config.replace(alpha=preset.alpha)
    per_layer = f", per-layer alphas for {len(preset.layer_alphas)} layers" if preset.layer_alphas else ""
    return ActivePreset(config, preset, (
        f"FlashPrefill: {how}: preset {preset.name!r}: alpha={preset.alpha:g}{per_layer}, tau={config.tau:g}, "
        f"block_size="
        f"{preset.block_size} ({preset.provenance.split(':')[0]})"))


def check_layers(preset: Preset | None, num_layers: int | None) -> None:
    """Raise ``ValueError`` if ``preset`` lists per-layer alphas for layers the model does not have (``num_layers``
    decoder layers; ``None``: unknown, nothing checked)."""
    if preset is None or not num_layers or not preset.layer_alphas:
        return
    bad = [i for i, _ in preset.layer_alphas if i >= num_layers]
    if bad:
        raise ValueError(f"preset {preset.source}: field 'layer_alphas' lists layer(s) {bad}; the served model has "
                         f"{num_layers} decoder layers (0-{num_layers - 1}): this preset was made for another model")


def active_preset(model: str | None = None, architectures: Sequence[str] | None = ()) -> ActivePreset:
    """The process's :class:`ActivePreset` for the served ``model`` (name or path, as vLLM's
    ``model_config.model``) and its ``architectures`` (``model_config.hf_config.architectures``), from
    ``os.environ``. Resolved and logged once per process and model (``active_preset.cache_clear()`` forgets).

    Raises:
        ValueError: an invalid ``FLASHPREFILL*`` variable (naming it) or preset.
    """
    return _active_preset(model, tuple(architectures or ()))


@functools.cache
def _active_preset(model: str | None, architectures: tuple[str, ...]) -> ActivePreset:
    environ = os.environ
    config, spec = env_config(environ)
    resolved = resolve_active(spec, config, env_explicit_fields(environ), model, architectures)
    if resolved.message:
        logger.info("%s", resolved.message)
    for warning in resolved.warnings:
        logger.warning("%s", warning)
    return resolved


active_preset.cache_clear = _active_preset.cache_clear  # type: ignore[attr-defined]


def model_identity(vllm_config) -> tuple[str | None, tuple[str, ...]]:
    """What presets are matched on in a vLLM ``VllmConfig``: ``model_config.model`` (the name or path given to
    ``LLM(...)`` / ``vllm serve``, not ``--served-model-name``) and ``model_config.hf_config.architectures``. Missing
    attributes count as unknown (``auto`` then falls back)."""
    model_config = getattr(vllm_config, "model_config", None)
    model = getattr(model_config, "model", None)
    architectures = getattr(getattr(model_config, "hf_config", None), "architectures", None) or ()
    return (model if isinstance(model, str) else None), tuple(architectures)


def model_num_layers(vllm_config) -> int | None:
    """The served model's decoder layer count (``hf_config.num_hidden_layers``), or ``None`` if unknown."""
    hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    n = getattr(hf_config, "num_hidden_layers", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def active_preset_for_vllm(vllm_config) -> ActivePreset:
    """:func:`active_preset` for a vLLM ``VllmConfig`` (see :func:`model_identity`), with the preset's layer indices
    checked against the model (:func:`check_layers`)."""
    active = active_preset(*model_identity(vllm_config))
    check_layers(active.preset, model_num_layers(vllm_config))
    return active


# vLLM layer names ("model.layers.17.self_attn.attn", "language_model.model.layers.3.self_attn.attn") and HF module
# paths ("model.layers.17.self_attn", GPT-2 style "transformer.h.5.attn", "model.decoder.layers.2.self_attn").
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?=\.|$)")


def layer_index(layer_name: str) -> int | None:
    """The decoder-layer index in a vLLM layer name or HF module path (the first ``layers.<n>`` / ``h.<n>`` /
    ``blocks.<n>`` component), or ``None`` if there is none."""
    m = _LAYER_RE.search(layer_name or "")
    return int(m.group(1)) if m else None


@functools.lru_cache(maxsize=4096)
def layer_runs_dense(config: FlashPrefillConfig, preset: Preset | None, layer_name: str) -> bool:
    """Whether the layer ``layer_name`` names runs dense attention: one of the first ``config.num_dense_layers``
    decoder layers, or listed as :data:`DENSE` by ``preset``. Names without a layer index never do."""
    index = layer_index(layer_name)
    if index is None:
        return False
    return index < config.num_dense_layers or (preset is not None and preset.layer_alpha(index) == DENSE)


@functools.lru_cache(maxsize=4096)
def config_for_layer(config: FlashPrefillConfig, preset: Preset | None, layer_name: str) -> FlashPrefillConfig:
    """``config`` with the alpha of the layer ``layer_name`` names, per ``preset``'s per-layer alphas; layers the
    preset does not list, names without a layer index, and ``preset=None`` keep ``config`` (its global alpha). A
    layer listed as :data:`DENSE` never reaches the op: the backend sends it to stock FlashAttention
    (:func:`layer_runs_dense`); it keeps ``config`` here.

    Pass the ``config`` and ``preset`` of an :class:`ActivePreset` (so ``FLASHPREFILL_ALPHA`` precedence holds).
    Pure and cached (the arguments are hashable): cheap to call per layer per step.
    """
    if preset is None or not preset.layer_alphas:
        return config
    alpha = preset.layer_alpha(layer_index(layer_name))
    return config if alpha is None or alpha == DENSE or alpha == config.alpha else config.replace(alpha=alpha)
