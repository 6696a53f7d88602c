"""Decoder-LLM backbones fine-tuned with LoRA (peft): settings, checkpoints without the base weights,
the base model's identity and the initial-weight fingerprint that adapter averaging checks.

A LoRA run trains the adapter (peft's `lora_A` / `lora_B` matrices) and the head; the base model stays
frozen, so its checkpoints hold only those, the tokenizer and the base model's identity (its folder or
hub name, a hash of its config.json and a hash of its weight files' names, sizes and last MiB). Loading
one needs the base weights: the stored folder, or `model.backbone=/path` in predict.py; a folder whose
hash differs is refused (`check_base`).

Merged export and fold averaging (they load the whole module) are in `model.merge`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pref_lightning.core.errors import MissingFileError, UserError

LORA_DEFAULTS: dict[str, Any] = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear",
                                 "load_in": None}
QUANTIZATIONS = ("4bit", "8bit")
ADAPTER_MARK = "lora_"  # peft's adapter parameter names: ...q_proj.lora_A.default.weight
BACKBONE_PREFIX = "backbone."
# config.json keys that change when the same weights are saved again by another transformers version
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")
SAMPLE_BYTES = 1 << 20


# ---- settings ---------------------------------------------------------------------------------
def lora_settings(lora: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`model.lora` with defaults filled in, checked; None (or empty) means no LoRA (full fine-tuning).

    Keys: r (rank), alpha, dropout, target_modules (`all-linear` or a list of module names such as
    [q_proj, k_proj, v_proj, o_proj]), load_in (null, 4bit or 8bit: bitsandbytes, GPU only).
    Raises UserError for an unknown key or a bad value, and when peft is not installed.
    """
    if not lora:
        return None
    unknown = sorted(set(lora) - set(LORA_DEFAULTS))
    if unknown:
        raise UserError(f"model.lora: unknown key {unknown[0]!r}; the keys are {', '.join(LORA_DEFAULTS)}")
    settings = {**LORA_DEFAULTS, **dict(lora)}
    if not isinstance(settings["r"], int) or settings["r"] < 1:
        raise UserError(f"model.lora.r={settings['r']!r}; the rank is a positive integer")
    if not settings["alpha"] or float(settings["alpha"]) <= 0:
        raise UserError(f"model.lora.alpha={settings['alpha']!r}; use a positive number (often 2 * r)")
    if not 0.0 <= float(settings["dropout"]) < 1.0:
        raise UserError(f"model.lora.dropout={settings['dropout']!r}; use a value in [0, 1)")
    targets = settings["target_modules"]
    if isinstance(targets, str):
        if targets != "all-linear":
            targets = [targets]
    elif not targets or not all(isinstance(t, str) for t in targets):
        raise UserError(f"model.lora.target_modules={targets!r}; use all-linear or a list of module names")
    settings["target_modules"] = targets if isinstance(targets, str) else list(targets)
    if settings["load_in"] is not None and settings["load_in"] not in QUANTIZATIONS:
        raise UserError(f"model.lora.load_in={settings['load_in']!r}; choose null, 4bit or 8bit")
    if importlib.util.find_spec("peft") is None:
        raise UserError("model.lora needs peft: pip install -e '.[llm]'")
    return settings


def quantization_config(settings: Mapping[str, Any] | None):
    """A transformers `BitsAndBytesConfig` for `model.lora.load_in` (4bit: NF4 with double quantization
    and bf16 compute, as QLoRA), or None. Raises UserError, naming the setting, without a CUDA GPU or
    without bitsandbytes (imported only here)."""
    load_in = None if settings is None else settings.get("load_in")
    if load_in is None:
        return None
    if not torch.cuda.is_available():
        raise UserError(f"model.lora.load_in={load_in} (bitsandbytes quantization) needs a CUDA GPU; on CPU set "
                        "model.lora.load_in=null")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"model.lora.load_in={load_in} needs bitsandbytes: pip install -e '.[qlora]'")
    from transformers import BitsAndBytesConfig

    if load_in == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def apply_lora(model, settings: Mapping[str, Any], gradient_checkpointing: bool = False):
    """`model` (a transformers base model) wrapped by peft with a fresh LoRA adapter; only the adapter's
    parameters are trainable. A quantized model is first prepared for k-bit training (norms in float32,
    input gradients for checkpointing)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if settings.get("load_in"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=int(settings["r"]), lora_alpha=float(settings["alpha"]),
                        lora_dropout=float(settings["dropout"]), target_modules=settings["target_modules"],
                        bias="none")
    return get_peft_model(model, config)


def trainable_summary(module: torch.nn.Module) -> str:
    """One line: the share of the module's parameters that training updates (adapter + head)."""
    backbone = list(module.backbone.parameters())
    rest = [p for name, p in module.named_parameters() if not name.startswith(BACKBONE_PREFIX)]
    adapter = sum(p.numel() for p in backbone if p.requires_grad)
    head = sum(p.numel() for p in rest if p.requires_grad)
    total = sum(p.numel() for p in backbone) + sum(p.numel() for p in rest)
    return (f"LoRA: {adapter + head:,} of {total:,} parameters trainable ({100 * (adapter + head) / total:.3f}%): "
            f"adapter {adapter:,}, head {head:,}")


# ---- the base model's identity ------------------------------------------------------------------
def resolve_base_folder(name: str) -> Path:
    """The local folder of backbone `name`: a folder, or a hub name already in the local hub cache.
    Raises MissingFileError when neither exists."""
    from pref_lightning.model.backbone import resolve_backbone

    path = Path(resolve_backbone(str(name)))
    if path.is_dir():
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), local_files_only=True))
    except Exception as err:  # not a folder and not in the hub cache
        raise MissingFileError(f"{name}: no such model folder (nor a downloaded hub model of that name)") from err


def base_identity(name: str) -> dict[str, str]:
    """What identifies a base model without reading all its weights: its name, its folder, the sha256 of
    its config.json (less `VOLATILE_CONFIG_KEYS`) and of its weight files' names, sizes and last MiB.
    Raises MissingFileError for a folder without config.json or weight files."""
    folder = resolve_base_folder(name)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"{folder}: no config.json; not a model folder")
    config = json.loads(config_path.read_text())
    for key in VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not any(p.name.endswith((".safetensors", ".bin")) for p in weights):
        raise MissingFileError(f"{folder}: no weight files (*.safetensors or *.bin)")
    digest = hashlib.sha256()
    for path in weights:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as handle:
            handle.seek(max(0, size - SAMPLE_BYTES))
            digest.update(handle.read())
    return {"name": str(name), "folder": str(folder),
            "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
            "weights_sha256": digest.hexdigest()}


def check_base(stored: Mapping[str, str], backbone: str | None = None) -> str:
    """The folder holding the base model a checkpoint was trained on: `backbone` (model.backbone=...) when
    given, else the stored folder or name. Raises MissingFileError when it is not there and UserError when
    its config or weights differ from the stored identity (one line each)."""
    candidates = [backbone] if backbone else [stored["folder"], stored["name"]]
    found = None
    for candidate in candidates:
        try:
            found = base_identity(candidate)
            break
        except MissingFileError:
            continue
    if found is None:
        raise MissingFileError(f"the checkpoint's base model {stored['name']} is not at {candidates[0]}; point at its "
                               "weights with model.backbone=/path/to/base")
    differ = [what for key, what in (("config_sha256", "config.json"), ("weights_sha256", "weight files"))
              if found[key] != stored[key]]
    if differ:
        raise UserError(f"model.backbone={found['name']} is not the base model this checkpoint was trained on "
                        f"({stored['name']}): its {' and '.join(differ)} differ")
    return found["folder"]


# ---- checkpoints without base weights ---------------------------------------------------------------
def is_base_weight(key: str) -> bool:
    """A backbone entry of the module's state dict that is not part of a LoRA adapter."""
    return key.startswith(BACKBONE_PREFIX) and ADAPTER_MARK not in key


def without_base_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict less the frozen base model's weights: adapter, head and anchor."""
    return {k: v for k, v in state_dict.items() if not is_base_weight(k)}


def with_base_weights(state_dict: Mapping[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict completed by the base weights `module` holds (loaded from the base folder),
    so that a strict `load_state_dict` checks every adapter and head entry."""
    own = {k: v for k, v in module.state_dict().items() if is_base_weight(k)}
    return {**own, **state_dict}


# ---- averaging ------------------------------------------------------------------------------
def init_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of the weights training starts from that averaging depends on: every LoRA adapter matrix
    (`lora_A` random, `lora_B` zero) and every parameter outside the backbone (head, anchor). Training records
    it in best.ckpt (`init_fingerprint`), before any step; `average` refuses checkpoints whose fingerprints differ."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        if ADAPTER_MARK in name or not name.startswith(BACKBONE_PREFIX):
            digest.update(name.encode() + b"\0")
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
