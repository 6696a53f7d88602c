"""FSDP (`trainer=fsdp`): the module's weights, gradients and optimizer state sharded across every rank with
torch's FSDP2 (`torch.distributed.fsdp.fully_shard`), under Lightning's `ModelParallelStrategy`.

What is sharded (`shard_module`, called from `PreferenceModule.configure_model`):
- each transformer block of the backbone on its own (`transformer_blocks`: the children of its `layers` /
  `layer` ModuleList: LlamaDecoderLayer, Qwen2DecoderLayer, Gemma2DecoderLayer, DebertaV2Layer, BertLayer...),
  so that one block at a time is gathered in full during the forward and backward passes;
- then the whole LightningModule as the root: embeddings, final norm, LM head, the pair head, the anchor and
  any frozen scorer, gathered for the whole step. The training, validation and prediction steps call
  sub-modules rather than `forward`, so they are registered as FSDP forward methods
  (`register_fsdp_forward_method`): the root's parameters are gathered when a step starts.
The shards span every rank (a 1-D mesh over the world): pure data-parallel FSDP (ZeRO-3), whatever 2-D
mesh (nodes x devices) the strategy built for tensor parallelism, which this project does not use.

LoRA: the adapter is added (peft) before sharding; frozen base weights and trainable adapter weights may
share a block under FSDP2 (per-parameter sharding; FSDP1's `use_orig_params` question does not arise).
Checkpoints are gathered in full on rank 0 (`save_distributed_checkpoint: false`), where the module's save
hook drops the base weights as without FSDP: `best.ckpt` is one file in this project's format.

Mixed precision: `trainer.precision=bf16-mixed` on a GPU also gives the blocks a `MixedPrecisionPolicy`
(bfloat16 gathered weights for compute, float32 gradient reduction); the root stays float32 (autocast runs
its matmuls in bfloat16). On CPU nothing is cast beyond what the precision plugin does.
Activation checkpointing is `model.gradient_checkpointing=true` (transformers' own, non-reentrant, inside
each block, which FSDP2 supports).

All ranks must build identical weights before sharding (FSDP2 does not broadcast them): the same seed and
files give that; `check_same_weights` verifies it with one scalar per rank.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)
# ModuleList names holding a backbone's repeated blocks (decoders: `layers`; BERT / DeBERTa: `encoder.layer`)
BLOCK_LIST_NAMES = ("layers", "layer")
# LightningModule methods that run the network without calling `forward` (FSDP unshards the root there)
STEP_METHODS = ("training_step", "validation_step", "predict_step", "test_step")


def transformer_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The repeated blocks of `backbone` (a transformers model, possibly peft-wrapped): the children of its
    ModuleList named `layers` or `layer` holding the most parameters. Raises ValueError when there is none
    (a backbone this sharding does not know: nothing would be sharded but the root)."""
    best: tuple[int, list[nn.Module]] | None = None
    for name, child in backbone.named_modules():
        if isinstance(child, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES and len(child):
            size = sum(p.numel() for p in child.parameters())
            if best is None or size > best[0]:
                best = (size, list(child))
    if best is None:
        raise ValueError(f"{type(backbone).__name__}: no ModuleList named {' or '.join(BLOCK_LIST_NAMES)}; "
                         "FSDP needs the backbone's transformer blocks to shard them one by one")
    return best[1]


def mixed_precision_policy(precision: str, device_type: str):
    """FSDP2 `MixedPrecisionPolicy` for the blocks: bfloat16 compute weights with float32 gradient
    reduction for `bf16-mixed` on a GPU; None otherwise (float32 on CPU; `*-true` precisions convert the
    weights themselves)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if str(precision).startswith("bf16-mixed") and device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` is already an FSDP2 module (Lightning calls `configure_model` at every fit /
    validate / predict; sharding happens once)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def check_same_weights(module: nn.Module, device: torch.device) -> None:
    """RuntimeError when the ranks hold different weights before sharding (FSDP2 shards each rank's own
    copy and would silently mix them): compares the float64 sum of every parameter and buffer across ranks."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        total = sum((t.detach().double().sum() for t in [*module.parameters(), *module.buffers()]),
                    torch.zeros((), dtype=torch.float64)).to(device).reshape(1)
    sums = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(sums, total)
    if any(not torch.equal(s, sums[0]) for s in sums):
        raise RuntimeError("FSDP: the ranks built different weights before sharding (parameter sums "
                           f"{[float(s) for s in sums]}); every rank must build the model from the same seed and files")


def world_mesh(device: torch.device):
    """A 1-D device mesh over every rank on the strategy's device type (FSDP2's own default mesh takes the
    machine's accelerator, a CUDA mesh under gloo for `trainer.accelerator=cpu` on a GPU machine); None
    without a process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        return None
    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("fsdp",))


def one_backbone_call(module: nn.Module) -> None:
    """Every rank must issue the same collectives in the same order: a sharded block gathers its weights at
    each call. `encode_grouped` splits a batch's sides into up to `model.side_groups` backbone calls by
    their lengths, a number that differs between ranks (a hang, each rank waiting in another collective),
    so a sharded module encodes every batch in one backbone call (`encode`; the same values up to float
    rounding: padding is masked). The checkpoint keeps `side_groups` for prediction without FSDP."""
    if not callable(getattr(module, "encode_grouped", None)) or not callable(getattr(module, "encode", None)):
        raise AttributeError(f"{type(module).__name__} has no encode_grouped / encode to run in one call under FSDP")
    module.encode_grouped = module.encode


def shard_module(module: nn.Module, backbone: nn.Module, precision: str, device: torch.device,
                 reshard_after_forward: bool = True) -> dict[str, Any]:
    """Apply FSDP2 to `module` (the LightningModule) in place: each block of `backbone`, then `module` as the
    root, sharded across all ranks; its step methods registered as FSDP forward methods. Returns what was
    done (block count and class, mixed precision), also logged once. Idempotent."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if is_sharded(module):
        return {}
    check_same_weights(module, device)
    blocks = transformer_blocks(backbone)
    policy = mixed_precision_policy(precision, device.type)
    mesh = world_mesh(device)
    block_options = {"reshard_after_forward": reshard_after_forward, **({"mp_policy": policy} if policy else {})}
    for block in blocks:
        fully_shard(block, mesh=mesh, **block_options)
    fully_shard(module, mesh=mesh)
    for name in STEP_METHODS:
        if callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)
    one_backbone_call(module)
    # what sharding saves: this rank keeps its shard (DTensor.to_local) of each parameter, and so of its gradient and
    # AdamW moments: about 1 / world size of the full model's states
    total = sum(p.numel() for p in module.parameters())
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in module.parameters())
    info = {"blocks": len(blocks), "block_class": type(blocks[0]).__name__,
            "mixed_precision": "bf16 compute, fp32 reduce" if policy else "none",
            "rank_parameters": local, "parameters": total}
    log.info("FSDP2: %d x %s sharded one by one, then the root module; mixed precision: %s; this rank holds %d of "
             "%d parameters (%.1f%%)", info["blocks"], info["block_class"], info["mixed_precision"], local, total,
             100.0 * local / max(total, 1))
    return info


def configure_sharding(module: nn.Module, trainer: Any) -> dict[str, Any]:
    """What `PreferenceModule.configure_model` does under the ModelParallelStrategy, at every fit / validate /
    predict: shard once (`shard_module`); let a LoRA checkpoint, which holds no base weights, load into the
    sharded module (`strict_loading` off: the base keeps the weights loaded from its folder, whose identity
    `on_load_checkpoint` still checks); and outside fitting drop the optimizers the strategy kept from
    `fit`, whose state it would otherwise look for in a weights-only best.ckpt (KeyError 'optimizer_states'
    in `trainer.validate(ckpt_path=best)` after `trainer.fit`)."""
    strategy = trainer.strategy
    info = shard_module(module, module.backbone, str(trainer.precision), strategy.root_device)
    module.strict_loading = getattr(module, "base_model", None) is None
    if trainer.state.fn != "fit":
        strategy.optimizers = []
    return info
