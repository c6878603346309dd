"""Calibrate alpha for a model: ``python -m flashprefill_vllm.eval calibrate MODEL --text FILE --out preset.json``.

Runs the model (transformers, bf16, SDPA; CUDA if available) over prompts cut from a long text at several lengths,
captures each layer's post-RoPE q/k/v, and for every alpha of a grid measures what the selection keeps
(:func:`flashprefill_vllm.eval.opquality.selection_quality`): the recall (the share of the exact softmax mass that
falls in the kept blocks, averaged over heads and query blocks) and the density (the share of causally visible
blocks kept). Then it picks alpha for a target (:func:`choose_alpha`, a pure function of the measured table):

- ``--target-recall R`` (default 0.97) with ``--min-layer-recall F`` (default 0.95): the largest alpha (the
  sparsest) whose recall, averaged over layers and lengths, is >= R and whose worst (layer, length) recall is >= F,
  provided every smaller alpha of the grid meets the target too.
- ``--target-density D``: the smallest alpha (the most accurate) whose density, averaged over layers and lengths,
  is <= D, provided every larger alpha of the grid meets it too.
- ``--per-layer``: the same rule per layer (a layer's recall averaged over lengths >= R and its worst length >= F;
  or its density <= D), giving one alpha per layer; the global alpha is still chosen as above for layers the preset
  does not reach.

The alpha grid is swept at one mass floor, ``--tau`` (default: the config default); the preset records it, so serving
with the preset uses the same floor unless ``FLASHPREFILL_TAU`` overrides it. The selection runs with
``min_sparse_len=0`` (every measured length runs sparse) and the sink / local / tail / GQA settings given on the
command line (defaults: :class:`~flashprefill_vllm.config.FlashPrefillConfig`'s); serve with
the same settings for the preset's numbers to hold. The result is a preset file
(:mod:`flashprefill_vllm.presets`) that ``FLASHPREFILL_PRESET=/path/preset.json`` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence

from ..config import ALLOWED_BLOCK_SIZES, FlashPrefillConfig
from ..presets import DENSE, PRESET_FORMAT, PRESET_VERSION, Preset, parse_preset, save_preset

DEFAULT_LENGTHS = (8192, 16384, 31744)
DEFAULT_ALPHAS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.12, 0.15, 0.18, 0.22, 0.27, 0.33, 0.4,
                  0.5, 0.7)


class CalibrationError(ValueError):
    """The target cannot be met on the measured grid (the message says by how much and what to change)."""


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What the selection did at one ``alpha`` in one ``layer`` on one prompt of ``length`` tokens."""

    alpha: float
    layer: int
    length: int
    recall: float                 # mean over heads and query blocks of the kept share of the softmax mass
    density: float                # share of causally visible blocks kept
    recall_min: float = math.nan  # worst (head, query block)
    rel_l2: float = math.nan      # relative L2 error of the sparse output against dense attention


@dataclasses.dataclass(frozen=True)
class Target:
    """A recall target (``recall``, with the worst-(layer, length) floor ``min_layer_recall``; ``None``: no floor)
    or a density target (``density``); exactly one of ``recall`` and ``density``."""

    recall: float | None = 0.97
    min_layer_recall: float | None = 0.95
    density: float | None = None

    def __post_init__(self) -> None:
        if (self.recall is None) == (self.density is None):
            raise ValueError("give exactly one of a recall target and a density target")
        for name in ("recall", "min_layer_recall", "density"):
            val = getattr(self, name)
            if val is not None and not 0.0 < val <= 1.0:
                raise ValueError(f"target {name} must be in (0, 1]; got {val!r}")

    def describe(self) -> str:
        if self.density is not None:
            return f"density <= {self.density:g}"
        floor = f", worst layer >= {self.min_layer_recall:g}" if self.min_layer_recall is not None else ""
        return f"recall >= {self.recall:g}{floor}"

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class AlphaStats:
    """One alpha over a set of layers: mean recall and density over (layer, length) cells (samples averaged first),
    the worst cell's recall and where it is, and whether the target holds."""

    alpha: float
    recall: float
    worst_recall: float
    worst_layer: int
    worst_length: int
    density: float
    rel_l2: float
    meets: bool

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in d.items()
                if not (isinstance(v, float) and math.isnan(v))}


@dataclasses.dataclass(frozen=True)
class Choice:
    """What :func:`choose_alpha` picked: the global ``alpha``, ``layer_alphas`` (empty unless per layer), the global
    grid (``grid``), per-layer stats at each layer's alpha (``layers``) and the ``reason`` in words."""

    alpha: float
    layer_alphas: dict[int, float | str]
    grid: tuple[AlphaStats, ...]
    layers: tuple[tuple[int, AlphaStats], ...]
    reason: str

    @property
    def stats(self) -> AlphaStats:
        return next(s for s in self.grid if s.alpha == self.alpha)


def _cells(table: Sequence[Measurement]) -> dict[tuple[float, int, int], tuple[float, float, float, int]]:
    """(alpha, layer, length) -> (recall, density, rel_l2, samples), averaged over the prompts of that length."""
    acc: dict[tuple[float, int, int], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for m in table:
        a = acc[(m.alpha, m.layer, m.length)]
        a[0] += m.recall
        a[1] += m.density
        a[2] += m.rel_l2
        a[3] += 1
    return {k: (r / n, d / n, e / n, n) for k, (r, d, e, n) in acc.items()}


def alpha_stats(table: Sequence[Measurement], target: Target, layers: Sequence[int] | None = None
                ) -> list[AlphaStats]:
    """Per alpha (ascending), the stats over ``layers`` (all measured layers by default) and whether ``target``
    holds.

    Raises:
        CalibrationError: an empty table, or an alpha that lacks a (layer, length) cell the others have.
    """
    cells = _cells(table)
    if not cells:
        raise CalibrationError("no measurements: nothing to choose alpha from")
    alphas = sorted({a for a, _, _ in cells})
    wanted = set(layers) if layers is not None else {layer for _, layer, _ in cells}
    grid = sorted({(layer, length) for _, layer, length in cells if layer in wanted})
    out = []
    for a in alphas:
        missing = [c for c in grid if (a, *c) not in cells]
        if missing:
            raise CalibrationError(f"alpha {a:g} has no measurement for (layer, length) {missing[0]}; "
                                   "every alpha needs the same cells")
        vals = [(cells[(a, *c)], c) for c in grid]
        recall = sum(v[0] for v, _ in vals) / len(vals)
        density = sum(v[1] for v, _ in vals) / len(vals)
        rel_l2 = sum(v[2] for v, _ in vals) / len(vals)
        (worst, _, _, _), (w_layer, w_len) = min(vals, key=lambda x: x[0][0])
        if target.density is not None:
            meets = density <= target.density
        else:
            meets = recall >= target.recall and (target.min_layer_recall is None or worst >= target.min_layer_recall)
        out.append(AlphaStats(a, recall, worst, w_layer, w_len, density, rel_l2, meets))
    return out


def _pick(stats: Sequence[AlphaStats], target: Target, what: str) -> tuple[AlphaStats, str]:
    """The chosen alpha's stats and why, by the rule of the module docstring; ``what`` names the scope (for
    messages: "all layers", "layer 7")."""
    if target.density is None:
        # Largest alpha of the ascending prefix that meets the target (recall falls as alpha grows).
        if not stats[0].meets:
            s = stats[0]
            raise CalibrationError(
                f"{what}: target {target.describe()} is not reached even at the smallest alpha of the grid, "
                f"{s.alpha:g} (recall {s.recall:.4f}, worst {s.worst_recall:.4f} at layer {s.worst_layer}, "
                f"{s.worst_length} tokens, density {s.density:.3f}); add smaller alphas (--alphas) or lower the "
                f"target (--target-recall / --min-layer-recall)")
        i = 0
        while i + 1 < len(stats) and stats[i + 1].meets:
            i += 1
        s = stats[i]
        why = (f"{what}: alpha {s.alpha:g} is the largest of the grid meeting {target.describe()} with every smaller "
               f"alpha meeting it too: recall {s.recall:.4f}, worst {s.worst_recall:.4f} (layer {s.worst_layer}, "
               f"{s.worst_length} tokens), density {s.density:.3f}")
        if i + 1 < len(stats):
            n = stats[i + 1]
            why += (f"; the next, {n.alpha:g}, gives recall {n.recall:.4f}, worst {n.worst_recall:.4f}, density "
                    f"{n.density:.3f}")
        else:
            why += "; it is the largest alpha measured (larger ones may meet the target too: extend --alphas)"
        return s, why
    # Smallest alpha of the descending suffix that meets the density budget (density falls as alpha grows).
    if not stats[-1].meets:
        s = stats[-1]
        raise CalibrationError(
            f"{what}: target {target.describe()} is not reached even at the largest alpha of the grid, {s.alpha:g} "
            f"(density {s.density:.3f}); the always-kept blocks (sink, local window, dense tail) may keep more than "
            f"that at these lengths: add larger alphas (--alphas), longer --lengths, or raise --target-density")
    i = len(stats) - 1
    while i > 0 and stats[i - 1].meets:
        i -= 1
    s = stats[i]
    why = (f"{what}: alpha {s.alpha:g} is the smallest of the grid keeping {target.describe()} with every larger "
           f"alpha within it too: density {s.density:.3f}, recall {s.recall:.4f}, worst {s.worst_recall:.4f} "
           f"(layer {s.worst_layer}, {s.worst_length} tokens)")
    if i > 0:
        p = stats[i - 1]
        why += f"; the previous, {p.alpha:g}, keeps density {p.density:.3f}"
    return s, why


def choose_alpha(table: Sequence[Measurement], target: Target, per_layer: bool = False,
                 dense_fallback: bool = False) -> Choice:
    """Choose the global alpha (and with ``per_layer`` one alpha per layer) from measured ``table`` rows.

    Pure: no model, no GPU; every prompt of a length counts equally, and every (layer, length) cell counts equally.
    With ``per_layer`` and ``dense_fallback``, layers that reach the target at no alpha of the grid are listed as
    :data:`~flashprefill_vllm.presets.DENSE` (they run dense attention) instead of failing the choice, and the
    global alpha is chosen over the other layers.

    Raises:
        CalibrationError: the target is not reached on the grid (naming the closest alpha, its numbers and what to
            change), or the table is incomplete.
    """
    all_layers = sorted({m.layer for m in table})
    dense: list[int] = []
    if per_layer and dense_fallback:
        for layer in all_layers:
            try:
                _pick(alpha_stats(table, target, [layer]), target, f"layer {layer}")
            except CalibrationError:
                dense.append(layer)
        if dense and len(dense) == len(all_layers):
            raise CalibrationError(f"no layer reaches {target.describe()} at any alpha of the grid")
    sparse_layers = [layer for layer in all_layers if layer not in dense]
    grid = alpha_stats(table, target, sparse_layers if dense else None)
    chosen, why = _pick(grid, target, f"the {len(sparse_layers)} sparse layers" if dense else "all layers")
    layer_alphas: dict[int, float | str] = {layer: DENSE for layer in dense}
    layers: list[tuple[int, AlphaStats]] = []
    if per_layer:
        failures = []
        for layer in sparse_layers:
            try:
                s, _ = _pick(alpha_stats(table, target, [layer]), target, f"layer {layer}")
            except CalibrationError as err:
                failures.append(str(err))
                continue
            layer_alphas[layer] = s.alpha
            layers.append((layer, s))
        if failures:
            raise CalibrationError("per-layer: " + str(len(failures)) + " layer(s) cannot reach the target:\n  "
                                   + "\n  ".join(failures))
        alphas = [a for a in layer_alphas.values() if a != DENSE]
        why += f". Per layer, the same rule chose alphas from {min(alphas):g} to {max(alphas):g}"
        if dense:
            why += f"; layer(s) {', '.join(map(str, dense))} reach the target at no alpha and run dense"
        why += _per_layer_effect(table, layer_alphas)
    return Choice(chosen.alpha, layer_alphas, tuple(grid), tuple(layers), why)


def _per_layer_effect(table: Sequence[Measurement], layer_alphas: dict[int, float | str]) -> str:
    """Mean recall and density over (layer, length) cells with each layer at its own alpha (a dense layer keeps
    all of its mass and every block)."""
    cells = _cells(table)
    vals = [v for (a, layer, _), v in cells.items() if layer_alphas.get(layer) == a]
    vals += [(1.0, 1.0, 0.0, 1) for layer, length in sorted({(m.layer, m.length) for m in table})
             if layer_alphas.get(layer) == DENSE]
    if not vals:
        return ""
    recall = sum(v[0] for v in vals) / len(vals)
    density = sum(v[1] for v in vals) / len(vals)
    return f" (with them: recall {recall:.4f}, density {density:.3f})"


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def make_prompts(token_ids: Sequence[int], lengths: Sequence[int], per_length: int = 1,
                 bos_id: int | None = None) -> tuple[dict[int, list[list[int]]], bool]:
    """``per_length`` prompts of each length, cut from ``token_ids`` at offsets spread over the text (each starts
    with ``bos_id`` if given). A text shorter than a prompt is repeated; the second value says whether that
    happened."""
    if not token_ids:
        raise ValueError("the text has no tokens")
    repeated = False
    prompts: dict[int, list[list[int]]] = {}
    for length in lengths:
        body = length - (bos_id is not None)
        stream = list(token_ids)
        if len(stream) < body:
            repeated = True
            stream = stream * (body // len(stream) + 1)
        room = len(stream) - body
        offsets = [room * s // max(per_length - 1, 1) for s in range(per_length)] if per_length > 1 else [0]
        prompts[length] = [([bos_id] if bos_id is not None else []) + stream[o:o + body] for o in offsets]
    return prompts, repeated


def measure(model, prompts: dict[int, list[list[int]]], alphas: Sequence[float], config: FlashPrefillConfig,
            quality=None, progress: Callable[[int], None] | None = None) -> list[Measurement]:
    """Run each prompt through ``model`` once and measure every alpha on every layer's q/k/v.

    ``quality``: a module with ``capture_qkv``, ``block_mass`` and ``selection_quality`` (default:
    :mod:`flashprefill_vllm.eval.opquality`); its ``dense_attention``, if any, computes the dense output once per
    layer for every alpha's rel_l2. ``progress(1)`` is called after each layer of each prompt.
    """
    import torch

    if quality is None:
        from . import opquality as quality
    dense_attention = getattr(quality, "dense_attention", None)
    table: list[Measurement] = []
    device = next(model.parameters()).device
    for length, samples in prompts.items():
        for ids in samples:
            def on_layer(layer_idx, q, k, v, scale, length=length):
                mass = quality.block_mass(q, k, scale, config.block_size)
                extra = {"dense_out": dense_attention(q, k, v, scale)} if dense_attention is not None else {}
                for a in alphas:
                    r = quality.selection_quality(q, k, v, scale, config.replace(alpha=a), mass=mass, **extra)
                    table.append(Measurement(float(a), int(layer_idx), length, float(r["recall_mean"]),
                                             float(r["density"]), float(r.get("recall_min", math.nan)),
                                             float(r.get("rel_l2", math.nan))))
                del mass, extra
                if progress is not None:
                    progress(1)

            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            with torch.no_grad():
                quality.capture_qkv(model, input_ids, on_layer=on_layer)
    return table


# ---------------------------------------------------------------------------------------------------------------
# The command


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers; got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = FlashPrefillConfig()
    p = argparse.ArgumentParser(
        prog="python -m flashprefill_vllm.eval calibrate",
        description="Choose FlashPrefill's alpha for a model by measuring recall and density on real prompts, and "
                    "write a preset file for FLASHPREFILL_PRESET.")
    p.add_argument("model", help="HF model directory or id (loaded with transformers, bf16, SDPA)")
    p.add_argument("--text", required=True, help="a long UTF-8 text file; prompts are slices of it")
    p.add_argument("--tokenizer", help="tokenizer directory or id (default: the model's)")
    p.add_argument("--lengths", type=_ints, default=list(DEFAULT_LENGTHS),
                   help="prompt lengths in tokens, comma-separated (capped at the model's max context); default "
                        + ",".join(map(str, DEFAULT_LENGTHS)))
    p.add_argument("--prompts-per-length", type=int, default=1, help="prompts per length (default 1)")
    p.add_argument("--alphas", type=_floats, default=list(DEFAULT_ALPHAS), help="alpha grid, comma-separated")
    p.add_argument("--target-recall", type=float, default=None,
                   help="mean recall to reach (default 0.97 unless --target-density is given)")
    p.add_argument("--min-layer-recall", type=float, default=0.95,
                   help="floor on the worst (layer, length) recall; 0 disables it (default 0.95)")
    p.add_argument("--target-density", type=float, default=None,
                   help="instead of recall: the largest mean density to allow (picks the smallest such alpha)")
    p.add_argument("--per-layer", action="store_true", help="also choose one alpha per layer")
    p.add_argument("--dense-layers", action="store_true",
                   help='with --per-layer: layers that reach the target at no alpha of the grid run dense ("dense" '
                        "in the preset) instead of failing the calibration")
    p.add_argument("--tau", type=float, default=d.tau,
                   help=f"mass floor the alphas are swept at, in [0, 1] (default {d.tau:g}); written to the preset")
    p.add_argument("--block-size", type=int, default=d.block_size, choices=ALLOWED_BLOCK_SIZES)
    p.add_argument("--sink-blocks", type=int, default=d.num_sink_blocks)
    p.add_argument("--local-blocks", type=int, default=d.num_local_blocks)
    p.add_argument("--tail-blocks", type=int, default=d.num_dense_tail_blocks)
    p.add_argument("--gqa-shared", action="store_true", help="one block list per KV group (FLASHPREFILL_GQA_SHARED=1)")
    p.add_argument("--out", help="preset file to write (default: print only)")
    p.add_argument("--name", help="preset name (default: the model directory's name, lower case)")
    p.add_argument("--table-out", help="also write every measurement as JSON")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    return p


def _target(args, parser: argparse.ArgumentParser) -> Target:
    if args.target_density is not None and args.target_recall is not None:
        parser.error("give either --target-recall or --target-density, not both")
    try:
        if args.target_density is not None:
            return Target(recall=None, min_layer_recall=None, density=args.target_density)
        return Target(recall=0.97 if args.target_recall is None else args.target_recall,
                      min_layer_recall=args.min_layer_recall or None)
    except ValueError as err:
        parser.error(str(err))


def _load(model_path: str, tokenizer_path: str | None, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.to(device).eval(), tokenizer


def _max_context(model) -> int | None:
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else None


def _num_layers(model) -> int:
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    return int(cfg.num_hidden_layers)


def _print_grid(choice_grid: Sequence[AlphaStats], out=sys.stdout) -> None:
    print(f"{'alpha':>8} {'recall':>8} {'worst':>8} {'(layer, tokens)':>16} {'density':>8} {'rel_l2':>8}  target",
          file=out)
    for s in choice_grid:
        where = f"({s.worst_layer}, {s.worst_length})"
        rel = f"{s.rel_l2:8.4f}" if math.isfinite(s.rel_l2) else f"{'-':>8}"
        print(f"{s.alpha:8g} {s.recall:8.4f} {s.worst_recall:8.4f} {where:>16} {s.density:8.3f} {rel}  "
              f"{'meets' if s.meets else '-'}", file=out)


def build_preset(choice: Choice, target: Target, *, name: str, model_path: str, architectures: Sequence[str],
                 config: FlashPrefillConfig, summary: dict) -> Preset:
    """The preset file object for a :class:`Choice` (validated by the preset loader)."""
    date = summary.get("date", "")[:10]
    provenance = (f"calibrated by flashprefill_vllm.eval.calibrate on {date} ({summary.get('device', '?')}): "
                  f"{os.path.basename(model_path.rstrip('/')) or model_path}, {summary.get('num_prompts', '?')} "
                  f"prompt(s) from {summary.get('text', '?')} at {summary.get('lengths')} tokens, target "
                  f"{target.describe()}{', per layer' if choice.layer_alphas else ''}, tau {config.tau:g}")
    data = {"format": PRESET_FORMAT, "version": PRESET_VERSION, "name": name,
            "match": {"names": ["*" + name.lower()]}, "block_size": config.block_size, "alpha": choice.alpha,
            "tau": config.tau, "provenance": provenance, "calibration": summary}
    if architectures:
        data["match"]["architectures"] = list(architectures)
    if choice.layer_alphas:
        data["layer_alphas"] = {str(k): v for k, v in sorted(choice.layer_alphas.items())}
    return parse_preset(data, source=name)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``calibrate`` sub-command. Returns 0, or 2 when the target cannot be met (nothing is written)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    target = _target(args, parser)
    if args.dense_layers and not args.per_layer:
        parser.error("--dense-layers needs --per-layer (it decides per layer)")
    if not args.alphas or any(not 0.0 < a <= 1.0 for a in args.alphas):
        parser.error(f"--alphas must be numbers in (0, 1]; got {args.alphas}")
    if not args.lengths or any(n < 1 for n in args.lengths) or args.prompts_per_length < 1:
        parser.error("--lengths must be positive integers and --prompts-per-length >= 1")
    try:
        config = FlashPrefillConfig(block_size=args.block_size, num_sink_blocks=args.sink_blocks,
                                    num_local_blocks=args.local_blocks, num_dense_tail_blocks=args.tail_blocks,
                                    min_sparse_len=0, gqa_shared_index=args.gqa_shared, tau=args.tau)
    except ValueError as err:
        parser.error(str(err))
    alphas = sorted(set(args.alphas))

    import torch
    from tqdm import tqdm

    try:
        from . import opquality as quality  # fail early, before loading the model
    except ImportError as err:
        print(f"calibrate: needs flashprefill_vllm.eval.opquality, which cannot be imported ({err})", file=sys.stderr)
        return 2

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"calibrate: loading {args.model} on {device}", flush=True)
    model, tokenizer = _load(args.model, args.tokenizer, device)
    max_ctx = _max_context(model)
    architectures = list(getattr(model.config, "architectures", None) or [])
    lengths = sorted({min(n, max_ctx) if max_ctx else n for n in args.lengths})
    if max_ctx and any(n > max_ctx for n in args.lengths):
        print(f"calibrate: lengths capped at the model's max context {max_ctx}: {lengths}")
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    # Tokenize only what the prompts can use (a generous 16 characters per token).
    need = max(lengths) * args.prompts_per_length
    token_ids = tokenizer(text[:16 * need], add_special_tokens=False)["input_ids"]
    prompts, repeated = make_prompts(token_ids, lengths, args.prompts_per_length, tokenizer.bos_token_id)
    if repeated:
        print(f"calibrate: the text has {len(token_ids)} tokens, fewer than the longest prompt: it is repeated "
              "(use a longer text for representative prompts)")
    num_layers = _num_layers(model)
    num_prompts = sum(len(v) for v in prompts.values())
    print(f"calibrate: {num_prompts} prompt(s) at {lengths} tokens x {num_layers} layers x {len(alphas)} alphas, "
          f"block size {config.block_size}, target {target.describe()}", flush=True)
    with tqdm(total=num_prompts * num_layers, desc="calibrate", unit="layer", file=sys.stderr) as bar:
        table = measure(model, prompts, alphas, config, quality=quality, progress=bar.update)
    del model
    if args.table_out:
        with open(args.table_out, "w", encoding="utf-8") as f:
            json.dump([dataclasses.asdict(m) for m in table], f)
            f.write("\n")

    try:
        choice = choose_alpha(table, target, per_layer=args.per_layer, dense_fallback=args.dense_layers)
    except CalibrationError as err:
        _print_grid(alpha_stats(table, target))
        print(f"calibrate: no alpha chosen: {err}\ncalibrate: no preset written")
        return 2
    _print_grid(choice.grid)
    print(f"calibrate: chose alpha {choice.alpha:g}: {choice.reason}")
    if choice.stats.density > 0.99:
        print("calibrate: note: the chosen alpha keeps nearly every block; at these lengths the always-kept blocks "
              "(sink, local window, dense tail) or flat attention leave nothing to skip, so this says little about "
              "longer prompts")
    if choice.layer_alphas:
        print("calibrate: per-layer alphas: "
              + ", ".join(f"{k}:{v:g}" for k, v in sorted(choice.layer_alphas.items())))

    summary = {
        "tool": "flashprefill_vllm.eval.calibrate",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "architectures": architectures,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "versions": _versions(),
        "text": os.path.basename(args.text), "text_sha256_16": text_sha, "text_repeated": repeated,
        "lengths": lengths, "prompts_per_length": args.prompts_per_length, "num_prompts": num_prompts,
        "alphas": alphas, "target": target.to_dict(), "per_layer": args.per_layer,
        "selection": {"block_size": config.block_size, "num_sink_blocks": config.num_sink_blocks,
                      "num_local_blocks": config.num_local_blocks,
                      "num_dense_tail_blocks": config.num_dense_tail_blocks,
                      "gqa_shared_index": config.gqa_shared_index, "min_sparse_len": 0},
        "recall": "mean over heads and query blocks of the exact softmax mass inside the kept blocks; "
                  "averaged over the prompts of a length, then over (layer, length) cells",
        "chosen": choice.stats.to_dict(), "reason": choice.reason,
        "grid": [s.to_dict() for s in choice.grid],
    }
    if choice.layers:
        summary["layers"] = [{"layer": layer, **s.to_dict()} for layer, s in choice.layers]
    name = args.name or os.path.basename(os.path.normpath(args.model)).lower()
    preset = build_preset(choice, target, name=name, model_path=args.model, architectures=architectures,
                          config=config, summary=summary)
    if args.out:
        save_preset(preset, args.out)
        print(f"calibrate: wrote {args.out}; serve with FLASHPREFILL_PRESET={os.path.abspath(args.out)}")
    else:
        print("calibrate: no --out given; preset not written")
    return 0


def _versions() -> dict:
    import torch
    import transformers

    from .. import __version__
    return {"flashprefill_vllm": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


if __name__ == "__main__":
    sys.exit(main())
