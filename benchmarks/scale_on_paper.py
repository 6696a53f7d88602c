"""Scale on paper: GPU memory and time per 10k rows of each recipe, estimated from the models' real shapes.

No GPU has run these recipes here (the GPU check trains a deberta-v3-small shape on short synthetic rows and a
~0.4B Qwen2 shape), so every figure this script writes is an **estimate**: parameters counted exactly from each
model's public config, memory and FLOPs from the stated model below. It writes
`benchmarks/results/scale_on_paper.json`; `benchmarks/render_docs.py` renders README's "Scale on paper" table
from it. Re-run it (and replace the assumptions with measured values) once a GPU check of these shapes exists.

    python benchmarks/scale_on_paper.py            # print the table, write the JSON

**Parameters** are counted by transformers itself: `AutoModel.from_config` on the meta device (no weights, no
download) from each model's config.json values below. LoRA adapters: r x (in + out) per targeted Linear, which
is what peft adds (r 16 on every Linear of the decoder layers, as `conf/model/llm_lora.yaml`).

**Memory per GPU** (GiB) = (states + activations) x 1.1 (allocator fragmentation, workspaces) + 0.5 (CUDA context):

- states. Full fine-tuning in bf16-mixed with AdamW: 16 bytes per parameter (fp32 weight, fp32 gradient, two fp32
  moments). FSDP with full sharding divides those by the GPU count and adds two gathered bf16 decoder layers (the
  one computing and the one prefetched). LoRA: the frozen base in bf16 (2 bytes per parameter), or with QLoRA the
  targeted Linear weights in NF4 with double-quantised block constants (4.127 bits per parameter; Dettmers et al.
  2023, "QLoRA", section 3) and the rest in bf16; plus 16 bytes per adapter parameter.
- activations of one micro-batch (the recipe's `data.batch_size` rows; siamese: 2 sequences a row, cross: 1), every
  sequence at full `data.max_length` (dynamic padding makes real batches smaller). Per layer and sequence of s
  tokens, the tensors autograd saves, in bytes: 34 s h + 5 a s^2 for a standard transformer layer in 16-bit
  (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1), with 4 a s^2
  more for DeBERTa's two disentangled score matrices (c2p, p2c) and, for decoder LLMs (SDPA / flash attention:
  no s^2 term), 2 s (6 h + q + 2 kv + 4 i) for a gated MLP of width i and grouped-query attention. With gradient
  checkpointing (the LLM recipes, DeBERTa-large) each layer keeps only its bf16 input (2 s h) and one layer's
  tensors are live during its recomputation.

**Time** = training FLOPs / (GPU count x peak bf16 FLOP/s x assumed utilisation). FLOPs per token: forward 2 N
(N = parameters of the layers' Linear maps) + 4 l s_att d (attention scores and values; s_att = s for encoders, s / 2
for causal decoders); a training step costs 3 forwards in full fine-tuning (forward, input and weight gradients),
2 with LoRA (no weight gradients of the frozen base), plus 1 recomputed forward with gradient checkpointing. The
utilisation (MFU) of the LLM recipes is an assumption stated in the JSON; that of the DeBERTa recipes is the one
the GPU check measured (`results/gpu_check.json`, DeBERTa-v3-small shape, bf16 fit stage: its tokens/s times the
same FLOPs per token at its mean sequence length, over the GPU's peak). Those rows were short and the batches small,
so the GPU was far from busy: at full length this overstates DeBERTa's time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "scale_on_paper.json"
GPU_CHECK = REPO / "benchmarks" / "results" / "gpu_check.json"
GIB = 2.0**30

# config.json values of the public checkpoints (microsoft/deberta-v3-small, -large; google/gemma-2-9b;
# meta-llama/Meta-Llama-3-70B)
MODELS: dict[str, tuple[str, dict]] = {
    "deberta-v3-small": ("deberta-v2", {"hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12,
                                        "intermediate_size": 3072, "vocab_size": 128100, "max_position_embeddings": 512,
                                        "relative_attention": True, "position_buckets": 256, "norm_rel_ebd": "layer_norm",
                                        "share_att_key": True, "pos_att_type": ["p2c", "c2p"],
                                        "position_biased_input": False, "type_vocab_size": 0}),
    "deberta-v3-large": ("deberta-v2", {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                        "intermediate_size": 4096, "vocab_size": 128100, "max_position_embeddings": 512,
                                        "relative_attention": True, "position_buckets": 256, "norm_rel_ebd": "layer_norm",
                                        "share_att_key": True, "pos_att_type": ["p2c", "c2p"],
                                        "position_biased_input": False, "type_vocab_size": 0}),
    "gemma-2-9b": ("gemma2", {"hidden_size": 3584, "num_hidden_layers": 42, "num_attention_heads": 16,
                              "num_key_value_heads": 8, "head_dim": 256, "intermediate_size": 14336,
                              "vocab_size": 256000}),
    "llama-3-70b": ("llama", {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                              "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256}),
}

# H100 SXM 80GB, dense bf16 tensor-core peak (NVIDIA H100 datasheet: 989.4 TFLOP/s without sparsity); the H200
# has the same tensor cores (and 141 GB of faster memory)
GPU = {"name": "H100 80GB SXM", "memory_gib": 80 * 1e9 / GIB, "peak_bf16_flops": 989.4e12}
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}

# Each recipe: the model, how it trains, its micro-batch (rows) and layout, the GPU count, and the assumed MFU.
RECIPES: list[dict] = [
    {"recipe": "DeBERTa-v3-small, full (experiment=full_data)", "model": "deberta-v3-small", "mode": "full",
     "layout": "siamese", "rows": 8, "gpus": 1, "checkpointing": False, "mfu": "gpu_check"},
    {"recipe": "DeBERTa-v3-large, full, model.gradient_checkpointing=true", "model": "deberta-v3-large", "mode": "full",
     "layout": "siamese", "rows": 8, "gpus": 1, "checkpointing": True, "mfu": "gpu_check"},
    {"recipe": "Gemma-2-9B, LoRA r 16, bf16 (experiment=llm_lora)", "model": "gemma-2-9b", "mode": "lora",
     "layout": "cross", "rows": 4, "gpus": 1, "checkpointing": True, "mfu": 0.35},
    {"recipe": "Gemma-2-9B, QLoRA r 16 (model.lora.load_in=4bit)", "model": "gemma-2-9b", "mode": "qlora",
     "layout": "cross", "rows": 4, "gpus": 1, "checkpointing": True, "mfu": 0.2},
    {"recipe": "Gemma-2-9B, full, FSDP over 4 GPUs (trainer=fsdp)", "model": "gemma-2-9b", "mode": "fsdp_full",
     "layout": "cross", "rows": 4, "gpus": 4, "checkpointing": True, "mfu": 0.35},
    {"recipe": "Llama-3-70B teacher, QLoRA r 16, 1 GPU per replica", "model": "llama-3-70b", "mode": "qlora",
     "layout": "cross", "rows": 4, "gpus": 1, "checkpointing": True, "mfu": 0.2},
]
LENGTHS = (1024, 2048)
LORA_R = 16
NF4_BITS = 4.127


def shape(name: str) -> dict:
    """Exact parameter counts of `name` from transformers on the meta device, and the shapes the formulas need."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModel

    model_type, values = MODELS[name]
    config = AutoConfig.for_model(model_type, **values)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    # the Linear maps of the layer stack (decoders: model.layers.N, DeBERTa: encoder.layer.N), not embeddings or heads
    linears = [m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and (".layers." in f".{n}." or ".layer." in f".{n}.")]
    linear_params = sum(m.weight.numel() for m in linears)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    layers = config.num_hidden_layers
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "linear_params": linear_params,  # the matmul weights of the layers: FLOPs, NF4, FSDP units
        "layer_params": linear_params // layers,  # one layer's matmul weights (its norms are ~0.1% more)
        "lora_params": sum(LORA_R * (m.in_features + m.out_features) for m in linears),
        "hidden": config.hidden_size, "layers": layers, "heads": config.num_attention_heads,
        "q_dim": config.num_attention_heads * head_dim, "kv_dim": kv_heads * head_dim,
        "intermediate": config.intermediate_size, "decoder": model_type != "deberta-v2",
    }


def layer_activation_bytes(m: dict, s: int) -> float:
    """Bytes autograd saves for one layer and one sequence of s tokens (module docstring)."""
    h, a = m["hidden"], m["heads"]
    if m["decoder"]:
        return 2.0 * s * (6 * h + m["q_dim"] + 2 * m["kv_dim"] + 4 * m["intermediate"])
    return 34.0 * s * h + 9.0 * a * s * s


def forward_flops(m: dict, length: int) -> float:
    """Forward FLOPs per token at sequence length `length` (module docstring)."""
    causal = 0.5 if m["decoder"] else 1.0
    return 2.0 * m["linear_params"] + 4.0 * m["layers"] * causal * length * m["q_dim"]


def measured_mfu(gpu_check: dict, m: dict) -> dict:
    """The utilisation the GPU check's bf16 DeBERTa fit stage reached: tokens/s x training FLOPs per token / peak."""
    run = next(r for r in gpu_check["results"] if r["run"] == "bf16")
    fit = next(s for s in run["stages"] if s["stage"] == "fit")
    peak = next(v for k, v in PEAK_BF16.items() if k in gpu_check["machine"]["gpu"])
    mean_length = fit["tokens"] / (2 * fit["rows"])  # siamese: two sequences a row
    mfu = fit["tokens_per_s"] * 3 * forward_flops(m, round(mean_length)) / peak
    return {"mfu": mfu, "gpu": gpu_check["machine"]["gpu"], "tokens_per_s": fit["tokens_per_s"],
            "mean_sequence_tokens": round(mean_length, 1), "batch_rows": gpu_check["machine"]["batch_size"]}


def estimate(recipe: dict, m: dict, length: int) -> dict:
    """Memory per GPU (GiB) and hours per 10,000 training rows of one recipe at one `data.max_length`
    (`recipe["mfu"]` a number)."""
    gpus, sequences = recipe["gpus"], recipe["rows"] * (2 if recipe["layout"] == "siamese" else 1)
    mode = recipe["mode"]
    if mode == "full":
        states = 16.0 * m["params"]
    elif mode == "fsdp_full":
        states = 16.0 * m["params"] / gpus + 2 * 2.0 * m["layer_params"]
    else:
        frozen = m["params"] - m["linear_params"] if mode == "qlora" else m["params"]
        quantised = m["linear_params"] * NF4_BITS / 8 if mode == "qlora" else 0.0
        states = 2.0 * frozen + quantised + 16.0 * m["lora_params"]
    per_layer = layer_activation_bytes(m, length) * sequences
    if recipe["checkpointing"]:
        activations = m["layers"] * 2.0 * length * m["hidden"] * sequences + per_layer
    else:
        activations = m["layers"] * per_layer
    memory = (states + activations) * 1.1 + 0.5 * GIB

    forward = forward_flops(m, length)
    passes = (3 if mode in ("full", "fsdp_full") else 2) + (1 if recipe["checkpointing"] else 0)
    tokens = 10_000 * length * (2 if recipe["layout"] == "siamese" else 1)
    seconds = passes * forward * tokens / (gpus * GPU["peak_bf16_flops"] * recipe["mfu"])
    return {"memory_gib": round(memory / GIB, 1), "states_gib": round(states / GIB, 1),
            "activations_gib": round(activations / GIB, 1), "hours_per_10k_rows": round(seconds / 3600, 2),
            "gpu_hours_per_10k_rows": round(gpus * seconds / 3600, 2),
            "fits": bool(memory / GIB <= GPU["memory_gib"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from pref_lightning.core import runinfo

    shapes = {name: shape(name) for name in MODELS}
    measured = measured_mfu(json.loads(GPU_CHECK.read_text()), shapes["deberta-v3-small"])
    rows = []
    for recipe in RECIPES:
        m = shapes[recipe["model"]]
        if recipe["mfu"] == "gpu_check":
            recipe = {**recipe, "mfu": measured["mfu"], "mfu_source": "measured (gpu_check.json)"}
        else:
            recipe = {**recipe, "mfu_source": "assumed"}
        trainable = m["params"] if recipe["mode"] in ("full", "fsdp_full") else m["lora_params"]
        rows.append({**recipe, "trainable_params": trainable,
                     "at": {str(length): estimate(recipe, m, length) for length in LENGTHS}})
    result = {"estimate": True, "gpu": GPU, "gpu_check_mfu": measured, "lora_r": LORA_R, "nf4_bits": NF4_BITS, "models": shapes,
              "recipes": rows,
              "run_info": runinfo.run_info("n/a (no training: counted and computed)",
                                           command="python benchmarks/scale_on_paper.py")}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'recipe':<55} {'params':>9} {'trainable':>9} " +
          " ".join(f"{'GiB@' + str(n):>9} {'h/10k@' + str(n):>11}" for n in LENGTHS))
    for row in rows:
        m = shapes[row["model"]]
        cells = " ".join(f"{row['at'][str(n)]['memory_gib']:>9.1f} {row['at'][str(n)]['hours_per_10k_rows']:>11.2f}"
                         for n in LENGTHS)
        print(f"{row['recipe']:<55} {m['params'] / 1e9:>8.2f}B {row['trainable_params'] / 1e6:>8.1f}M {cells}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
