"""Merged export and fold averaging of LoRA checkpoints, and their command line.

Commands (one `error:` line and status 2 on a bad argument):
    python -m pref_lightning.model.merge export RUN/checkpoints/best.ckpt OUT [--backbone /path/to/base]
    python -m pref_lightning.model.merge average OUT.ckpt fold0/checkpoints/best.ckpt fold1/checkpoints/best.ckpt ...
`export` merges the adapter into the base weights (peft `merge_and_unload`) and writes OUT as a model
folder (config, weights, tokenizer) plus OUT/model.ckpt (head, settings; its base: OUT itself), which
predict.py reads like any checkpoint. `average` averages k fold checkpoints' adapters and heads (same
base, rank and targets, same initial weights) into one checkpoint.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pref_lightning.core import cli
from pref_lightning.core.cli import say
from pref_lightning.core.errors import UserError
from pref_lightning.model.checkpoint import CHECKPOINT_KEY, load_checkpoint
from pref_lightning.model.lora import BACKBONE_PREFIX, base_identity
from pref_lightning.model.module import PreferenceModule


def export_merged(ckpt_path: str | Path, out: str | Path, backbone: str | None = None) -> Path:
    """Merge a LoRA checkpoint's adapter into its base weights: OUT becomes a model folder (config.json,
    weights, tokenizer) plus OUT/model.ckpt, a checkpoint of the head and settings whose base is OUT.
    Returns the path of OUT/model.ckpt. Raises UserError for a checkpoint without an adapter."""
    checkpoint = load_checkpoint(ckpt_path)
    if not checkpoint["hyper_parameters"].get("lora"):
        raise UserError(f"{ckpt_path}: no LoRA adapter to merge (trained without model.lora)")
    module, tokenizer, _ = PreferenceModule.from_checkpoint(str(ckpt_path), backbone=backbone)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    merged = module.backbone.merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    state = {k: v for k, v in module.state_dict().items() if not k.startswith(BACKBONE_PREFIX)}
    hparams = {**checkpoint["hyper_parameters"], "backbone": str(out.resolve()), "lora": None}
    payload = {**checkpoint[CHECKPOINT_KEY], "base_model": base_identity(str(out.resolve())),
               "backbone_config": merged.config.to_dict()}
    target = out / "model.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams, CHECKPOINT_KEY: payload}, target)
    return target


def check_same_init(paths: Sequence[str | Path], checkpoints: Sequence[Mapping[str, Any]]) -> None:
    """UserError naming the files when the checkpoints' adapters and heads did not start from the same
    weights: their recorded `init_fingerprint`s differ or, for checkpoints that record none, their seeds
    (`augment_seed`, the run's `seed`, which also seeds the initialisation). The element-wise mean of LoRA
    matrices is the mean of the runs' updates only for one init: mean(B) @ mean(A) != mean(B @ A)."""
    prints = [c[CHECKPOINT_KEY].get("init_fingerprint") for c in checkpoints]
    seeds = [c["hyper_parameters"].get("augment_seed") for c in checkpoints]
    if all(prints):
        keys, what = prints, "initial adapter and head weights (init_fingerprint)"
    else:
        keys, what = seeds, "seeds (hence initial adapter and head weights)"
    differ = [str(p) for p, key in zip(paths[1:], keys[1:]) if key != keys[0]]
    if differ:
        shown = "" if keys is prints else f": {', '.join(f'seed={s}' for s in dict.fromkeys(seeds))}"
        raise UserError(f"average: {', '.join(differ)} started from other {what} than {paths[0]}{shown}; the mean of "
                        "adapters from different inits is not the mean of their updates; average only runs of one "
                        "seed and configuration (the folds of one run), or ensemble them with predict.py "
                        "ckpt_path=[...]")


def average_adapters(paths: Sequence[str | Path], out: str | Path) -> Path:
    """One checkpoint whose adapter and head weights are the mean of those of `paths` (k fold
    checkpoints of one LoRA configuration on one base model, started from the same init), with the mean
    temperature; settings, tokenizer and the statistics' normalisation are those of the first. Raises
    UserError when the checkpoints differ in base model, LoRA settings, initial weights (`check_same_init`)
    or weight names, or hold no adapter."""

    if len(paths) < 2:
        raise UserError("average: give at least two checkpoints")
    checkpoints = [load_checkpoint(p) for p in paths]
    first = checkpoints[0]
    if not first["hyper_parameters"].get("lora") or "base_model" not in first[CHECKPOINT_KEY]:
        raise UserError(f"{paths[0]}: not a LoRA checkpoint (no adapter to average)")
    identity = ("config_sha256", "weights_sha256")
    for path, other in zip(paths[1:], checkpoints[1:]):
        if other["hyper_parameters"].get("lora") != first["hyper_parameters"]["lora"]:
            raise UserError(f"{path}: other LoRA settings than {paths[0]} (rank, alpha, targets must match)")
        base = other[CHECKPOINT_KEY].get("base_model") or {}
        if any(base.get(k) != first[CHECKPOINT_KEY]["base_model"][k] for k in identity):
            raise UserError(f"{path}: another base model than {paths[0]}")
        if set(other["state_dict"]) != set(first["state_dict"]):
            raise UserError(f"{path}: other weights than {paths[0]} (another head or adapter layout)")
    check_same_init(paths, checkpoints)
    state = {k: torch.stack([c["state_dict"][k].float() for c in checkpoints]).mean(0).to(v.dtype)
             for k, v in first["state_dict"].items()}
    temperature = sum(float(c[CHECKPOINT_KEY].get("temperature", 1.0)) for c in checkpoints) / len(checkpoints)
    payload = {**first[CHECKPOINT_KEY], "temperature": temperature}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "hyper_parameters": first["hyper_parameters"], CHECKPOINT_KEY: payload}, out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pref_lightning.model.merge", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="merge the adapter into a full model folder")
    export.add_argument("checkpoint")
    export.add_argument("out")
    export.add_argument("--backbone", default=None, help="the base model's folder (default: the stored one)")
    average = commands.add_parser("average", help="average the adapters of k fold checkpoints")
    average.add_argument("out")
    average.add_argument("checkpoints", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "export":
        path = cli.run(lambda: export_merged(args.checkpoint, args.out, args.backbone))
        say(f"merged model folder: {path.parent}; predict with ckpt_path={path}")
    else:
        path = cli.run(lambda: average_adapters(args.checkpoints, args.out))
        say(f"averaged {len(args.checkpoints)} adapters into {path}")



if __name__ == "__main__":
    main()
