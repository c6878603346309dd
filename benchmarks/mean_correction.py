"""Mean correction of skipped blocks, at the operator level: does adding each skipped key block's estimate from its
mean key and mean value (``eval.opquality.mean_corrected_attention``) lower the attention error of a selection at
the same density, enough that a lower mass floor tau would do?

For each captured layer of a real model (post-RoPE q/k/v over a slice of a long text, as ``opquality`` captures
them) and each tau at one alpha: the op's selection (its kept-block mask), then the attention output with those
blocks only (what the kernel runs) and with the correction, both against exact dense attention (all fp32, plain
torch). Writes ``<out-dir>/mean_correction_<model>_<device>[-tag].json`` (and ``.png`` with matplotlib).

    python benchmarks/mean_correction.py --model DIR --text kjv.txt --length 8192 --layers 1,6,12,18,23
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flashprefill_vllm.config import FlashPrefillConfig
from flashprefill_vllm.eval import opquality as oq
from flashprefill_vllm.ops.block_sparse_index import block_density
from flashprefill_vllm.ops.utils import cdiv
from flashprefill_vllm.eval.plotting import pyplot

RESULTS = Path(__file__).resolve().parent / "results"


def evaluate(q, k, v, scale, config: FlashPrefillConfig, taus) -> list[dict]:
    length = q.shape[0]
    nb = cdiv(length, config.block_size)
    dense = oq.mean_corrected_attention(q, k, v, scale, torch.ones(q.shape[1], nb, nb, dtype=torch.bool,
                                                                    device=q.device), config.block_size, False)
    cu = torch.tensor([0, length], dtype=torch.int32, device=q.device)
    rows = []
    for tau in taus:
        index = oq.selection_index(q, k, scale, config.replace(tau=tau))
        keep = oq.reference.index_to_mask(index, 0, length, length)
        plain = oq.mean_corrected_attention(q, k, v, scale, keep, config.block_size, correct=False)
        fixed = oq.mean_corrected_attention(q, k, v, scale, keep, config.block_size, correct=True)
        rows.append({"tau": tau, "density": float(block_density(index, cu, cu)),
                     "rel_l2_sparse": oq.rel_l2(plain, dense), "rel_l2_corrected": oq.rel_l2(fixed, dense)})
    return rows


def plot(report: dict, path: Path) -> None:
    """rel-L2 against density, kept blocks only vs with the correction (mean over the layers)."""
    plt = pyplot()
    if plt is None:
        return
    mean = report["mean"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("rel_l2_sparse", "kept blocks only (the kernel)"), ("rel_l2_corrected", "+ mean correction")):
        ax.plot([r["density"] for r in mean], [r[key] for r in mean], "o-", label=label)
    layers = ",".join(report["layers"])
    ax.set(xlabel="density", ylabel="attention rel-L2 vs dense", yscale="log",
           title=f"{Path(report['model']).name}, {report['length']} tokens, layers {layers}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="transformers model folder (required unless --replot)")
    p.add_argument("--model-name", default=None, help="name in the output file (default: the folder name)")
    p.add_argument("--text", help="long UTF-8 text; the prompt is its first --length tokens")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--layers", default="1,6,12,18,23", help="comma-separated layer indices")
    p.add_argument("--alpha", type=float, default=FlashPrefillConfig.alpha)
    p.add_argument("--taus", default="0.9,0.95,0.98,0.99")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--tag", default="")
    p.add_argument("--replot", type=Path, default=None, metavar="JSON", help="only redraw the plot of an earlier run")
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return 0
    if not args.model or not args.text:
        p.error("--model and --text are required (unless --replot)")
    layers = [int(x) for x in args.layers.split(",")]
    taus = [float(x) for x in args.taus.split(",")]
    config = FlashPrefillConfig(alpha=args.alpha, min_sparse_len=0)   # tau set per point
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").to(device).eval()
    if max(layers) >= model.config.num_hidden_layers:
        p.error(f"--layers {args.layers}: the model has {model.config.num_hidden_layers} layers")
    tokens = oq._prompt_tokens(tokenizer, Path(args.text), args.length)[:args.length]
    per_layer: dict[int, list[dict]] = {}

    def on_layer(idx, q, k, v, scale):
        per_layer[idx] = evaluate(q, k, v, scale, config, taus)
        print(f"layer {idx}: " + ", ".join(f"tau {r['tau']:g} density {r['density']:.3f} rel-L2 "
                                           f"{r['rel_l2_sparse']:.4f} -> {r['rel_l2_corrected']:.4f}"
                                           for r in per_layer[idx]), flush=True)

    oq.capture_qkv(model, torch.tensor(tokens), layers, on_layer)
    mean = [{key: sum(per_layer[i][n][key] for i in layers) / len(layers)
             for key in ("tau", "density", "rel_l2_sparse", "rel_l2_corrected")} for n in range(len(taus))]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    name = args.model_name or Path(args.model).resolve().name
    stem = f"mean_correction_{oq._slug(name, '.')}_{oq._slug(device_name)}" + (f"-{oq._slug(args.tag)}" if args.tag
                                                                              else "")
    report = {"device": device_name, **oq._versions(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "model": args.model, "text": args.text, "length": args.length, "alpha": args.alpha, "taus": taus,
              "layers": {str(i): per_layer[i] for i in layers}, "mean": mean, "seconds": time.perf_counter() - t0}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    print(f"\nmean over layers {args.layers} at {args.length} tokens, alpha {args.alpha:g}:")
    for r in mean:
        print(f"  tau {r['tau']:<5g} density {r['density']:.3f}  rel-L2 sparse {r['rel_l2_sparse']:.4f}  "
              f"corrected {r['rel_l2_corrected']:.4f}")
    plot(report, args.out_dir / f"{stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
