"""CPU experiment behind the mass floor's definition: the floor counting the forced (sink/local) blocks' energy as
kept (count_forced, the op's rule) vs a floor over the other blocks' energy only (exclude_forced), beside the alpha
rule alone. Every layer, per-head selection, alpha 0.1 and 0.3, the reference selection.

    python benchmarks/floor_forced_variants.py MODEL_DIR TEXT LENGTH OUT.json

Run on a CPU with Qwen2.5-Coder-0.5B-Instruct, 8192 tokens of KJV (results/floor_forced_variants_*).
"""
import json, math, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from flashprefill_vllm.config import FlashPrefillConfig
from flashprefill_vllm.eval import opquality as oq
from flashprefill_vllm.ops import reference

model_dir, text, L = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
ids = oq._prompt_tokens(tok, __import__("pathlib").Path(text), L)
cfg = FlashPrefillConfig(min_sparse_len=0)
b = cfg.block_size
taus = [0.8, 0.9, 0.95, 0.98, 0.99]
alphas = [0.1, 0.3]
rows = []
def on_layer(idx, q, k, v, scale):
    t0 = time.time()
    mass = oq.block_mass(q, k, scale, b)
    cu = torch.tensor([0, L], dtype=torch.int32)
    _, energies = reference.build_index(q, k, cu, cu, L, L, scale, cfg)
    e = energies[0]
    nq, nk = e.shape[1], e.shape[2]
    i = torch.arange(nq)[:, None]; j = torch.arange(nk)[None, :]
    d_first = (i * b) // b
    d_last = (torch.clamp((i + 1) * b, max=L) - 1) // b
    forced = (j < cfg.num_sink_blocks) | (j >= d_first - cfg.num_local_blocks + 1)
    dense = (i >= nq - cfg.num_dense_tail_blocks)
    row_max = e.amax(-1, keepdim=True)
    rel = torch.where(torch.isfinite(e), (e - row_max) / reference.LN2, float("-inf"))
    for a in alphas:
        for variant in ("count_forced", "exclude_forced", "alpha_only"):
            for t in (taus if variant != "alpha_only" else [0.0]):
                if variant == "alpha_only":
                    thr = torch.full_like(row_max, math.log2(a))
                else:
                    f = forced if variant == "count_forced" else torch.zeros_like(forced)
                    rel_v = rel if variant == "count_forced" else torch.where(forced, float("-inf"), rel)
                    thr = reference.floor_log2_threshold(rel_v, f[None], a, t)
                keep = (torch.isfinite(e) & (rel >= thr)) | forced[None] | dense[None]
                keep &= (j <= d_last)[None]
                r = oq.mask_quality(keep, mass)
                rows.append({"layer": idx, "alpha": a, "variant": variant, "tau": t, "density": r["density"],
                             "recall": r["recall_mean"]})
    print(f"layer {idx} {time.time() - t0:.1f}s", flush=True)
oq.capture_qkv(model, torch.tensor(ids), None, on_layer)
json.dump(rows, open(sys.argv[4], "w"))
import collections
agg = collections.defaultdict(list)
for r in rows:
    agg[(r["alpha"], r["variant"], r["tau"])].append(r)
print(f"{'alpha':>5} {'variant':<15} {'tau':>5} {'density':>8} {'recall':>7} {'worst':>7} worst_layer")
for key, rs in sorted(agg.items()):
    d = sum(x["density"] for x in rs) / len(rs); rc = sum(x["recall"] for x in rs) / len(rs)
    w = min(rs, key=lambda x: x["recall"])
    print(f"{key[0]:>5} {key[1]:<15} {key[2]:>5} {d:8.3f} {rc:7.4f} {w['recall']:7.4f} {w['layer']}")
