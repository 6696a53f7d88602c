"""Tokenizers: the offline BPE trained for the tiny backbone (cached on disk), the pad-token rule for decoder
LLMs, and the tokenizer files embedded in checkpoints. Loading a named tokenizer (hub or folder) is the model's
part (`model.backbone.load_tokenizer`), since the name is a backbone's."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from transformers import AutoTokenizer

SPECIAL_TOKENS = {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]",
                  "mask_token": "[MASK]"}
TOKENIZER_FORMAT = "bpe-metaspace-v1"  # part of the cache key: bump when training changes
# Never run code shipped with a model or tokenizer folder (`auto_map` modules): every transformers loader
# below gets this explicitly, and no config key changes it.
TRUST_REMOTE_CODE = False


def default_cache_dir() -> Path:
    return Path(os.environ.get("PREF_LIGHTNING_CACHE", Path.home() / ".cache" / "pref_lightning"))


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a sentencepiece-style (Metaspace) BPE tokenizer on `texts`.

    BPE rather than the Unigram model DeBERTa-v3 uses: the `tokenizers` Unigram trainer gives a
    different vocabulary in every process (its Rust hash maps are randomly seeded), so the same data
    and seed would not give the same run; the BPE trainer breaks ties deterministically.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    core.normalizer = normalizers.NFKC()
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("pad_token", "cls_token", "sep_token", "unk_token", "mask_token")],
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=1_000_000, **SPECIAL_TOKENS)


def cached_trained_tokenizer(texts: list[str], vocab_size: int, cache_dir: str | Path | None = None):
    """Train once per (texts, vocab size) and reuse the saved folder on later runs and other ranks."""
    digest = hashlib.sha256()
    digest.update(f"{TOKENIZER_FORMAT}\0{vocab_size}\0".encode())
    for text in texts:
        digest.update(text.encode("utf-8", "replace"))
        digest.update(b"\0")
    folder = Path(cache_dir or default_cache_dir()) / "tokenizers" / digest.hexdigest()[:20]
    if not (folder / "tokenizer_config.json").exists():
        tokenizer = train_tokenizer(texts, vocab_size)
        folder.parent.mkdir(parents=True, exist_ok=True)
        # save beside and rename, so that a concurrent rank never reads a half-written folder
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging-"))
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process won the race; its folder is equivalent
            shutil.rmtree(staging, ignore_errors=True)
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=TRUST_REMOTE_CODE)


def with_pad_token(tokenizer):
    """A decoder LLM's tokenizer often has no pad token (Llama, Mistral): padding then uses the eos token.
    Padded positions are masked out and pooling reads the attention mask, never the ids, so a real eos
    at the end of a sequence is still read."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_files(tokenizer, folder: str | Path | None = None) -> dict[str, bytes]:
    """The tokenizer's saved files, to embed in checkpoints; also written to `folder` when given."""
    with tempfile.TemporaryDirectory(prefix="pref_tokenizer_") as staging:
        tokenizer.save_pretrained(staging)
        files = {p.name: p.read_bytes() for p in sorted(Path(staging).iterdir()) if p.is_file()}
    if folder is not None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
    return files


def tokenizer_from_files(files: Mapping[str, bytes], folder: str | Path | None = None):
    """Rebuild a tokenizer from files embedded in a checkpoint (offline)."""
    target = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="pref_tokenizer_"))
    target.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (target / Path(name).name).write_bytes(data)
    return AutoTokenizer.from_pretrained(target, trust_remote_code=TRUST_REMOTE_CODE)
