"""Throughput benchmark: the public notebooks' HF Trainer recipe vs this project's pipeline, on CPU.

Prints a markdown table and writes benchmarks/results/throughput.json. Three setups, all in one run on
the same machine, with the same synthetic rows (`pref_lightning.data.synthetic.generate(rows, seed)`, real-like
long-tailed lengths), the same tiny tokenizer (trained once on the rows' texts, vocabulary 8,000),
the same tiny DeBERTa-v3 (`build_backbone("tiny")`: hidden 128, 2 layers, 4 heads, intermediate 512,
max_position_embeddings >= max length, dropout off), the same max length (1,024), batch size and
precision (fp32 by default, `--precision bf16` for bf16 autocast), no DataLoader workers and no padding to a multiple:

  (a) hf_cross    the public notebooks' recipe: `transformers.Trainer` (bf16=True, use_cpu=True),
                  `DataCollatorWithPadding`, its random sampler, the text `prompt [A] a [B] b` (turns
                  joined by newlines) tokenized with truncation=True, max_length=1024,
                  `DebertaV2ForSequenceClassification` (3 labels) built from the same tiny config,
                  `Trainer.predict` (sequential batches) for prediction;
  (b) pl_cross    this project, cross-encoder layout: `PreferenceDataModule(layout="cross",
                  length_grouped=True)` + `PreferenceModule(spec=datamodule.spec)` trained with
                  `lightning.Trainer(precision="bf16-mixed")` (no logger, no checkpointing, no progress
                  bar), `Trainer.predict` on the length-sorted predict loader;
  (c) pl_siamese  the same with the default siamese layout (each row = 2 sequences, prompt+A and
                  prompt+B, each up to max length; swap augmentation and swap TTA on, as by default),
                  run as one (2B, L) backbone call (`model.side_groups=1`, the path before issue 15);
  (d) pl_siamese_grouped  the same with the batch's 2B sides in up to 4 length groups, each padded to its
                  own longest side (`model.side_groups=4`, the default); it also predicts the same rows
                  again with prediction's token budget (`--predict-max-tokens`, predict.py's default
                  65,536 padded tokens per batch on a GPU) instead of batch-size rows.

Each (setup, batch size) runs in its own subprocess (the parent only writes the data and trains the
tokenizer, then collects one JSON result per child), so that peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss` read at the end of the child: data loading, training and
prediction) belongs to one setup.

How time is measured
  train   A callback (Lightning `Callback.on_train_batch_start/end`, HF `TrainerCallback.on_step_begin/end`)
          stamps every optimizer step. The first `--warmup` steps are not timed; the window runs from
          the end of the last warm-up step to the end of the last timed step, so it holds exactly
          `--steps` steps *including* the loader fetch/collation between steps, the optimizer step,
          gradient clipping and the framework's per-step bookkeeping (startup, tokenization and
          model building are outside it). train rows/s = steps * batch size / window. The sum of the
          callback's per-step (start -> end) times is also kept: window minus that sum is the
          loader + framework overhead between steps.
  predict Wall time of the whole `Trainer.predict` call on `--predict-rows` rows (inputs already
          tokenized in both setups; batch size = the training batch size, so both predict with the
          same batch size), after training in the same process (warm kernels). Only at the first
          batch size of `--batch-sizes`.
  tokens  Every batch the model actually receives is recorded (Lightning: the batch in the callback;
          HF: a wrapper around the collator). Padding efficiency = real tokens (attention mask sum) /
          processed tokens (mask size) over the timed batches; "epoch" is the same over a whole epoch
          of the sampler's batches (HF: a random permutation; project: `LengthGroupedSampler`).
          tokens/s are reported too, because the siamese layout processes each row as two sequences.

Bound: when every processed token is real, processing a row costs at least (a)'s cost times (a)'s
padding efficiency (attention is quadratic, so removing padding saves even more), hence the
speed-up over (a) is at least 1 / (a's padding efficiency) if everything else is equal; (b)/(a) is
reported as a fraction of that bound.

    python benchmarks/throughput.py --quick          # 400 rows, 10 timed steps: a few minutes
    python benchmarks/throughput.py                  # 2,000 rows, 60 timed steps at batch 8 (5-7 min)
    python benchmarks/throughput.py --rows 1000 --steps 12 --batch-sizes 8 --out /tmp/t.json

Smaller batch sizes than the first get more timed steps (half the first one's timed rows, at least
`--steps`). Run it alone on the machine: other jobs make every number smaller and the ratios noisy.
Contention is measured, not guessed: for each setup the parent takes the machine's busy CPU time
(/proc/stat) minus its own and its children's, as a share of all cores ("foreign_cpu_share"); a setup
during which others took more than `--max-foreign` (10%) is run again, up to `--retries` (2) times, and
the least contended run is kept. The table header says CONTENDED when even that run was.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "throughput.json"
SETUPS = ("hf_cross", "pl_cross", "pl_siamese", "pl_siamese_grouped")
LABELS = {"hf_cross": "(a) HF Trainer, cross, random batches",
          "pl_cross": "(b) project, cross, length-grouped",
          "pl_siamese": "(c) project, siamese, one (2B, L) call",
          "pl_siamese_grouped": "(d) project, siamese, sides in length groups",
          "pl_llama_lora": "(e) project, siamese grouped, tiny Llama + LoRA r=8"}
SIDE_GROUPS = {"pl_siamese": 1, "pl_siamese_grouped": 4, "pl_llama_lora": 4}  # model.side_groups (4: the default)
# --llm: (e) the same rows and path as (d) with a decoder LLM of the same shape (tiny Llama, LoRA), at the
# first batch size only
LLM_SETUP = "pl_llama_lora"
LLM_LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
PREDICT_MAX_TOKENS = 65536  # predict.py's token budget on a GPU (max_tokens=auto)
# the project's default tiny backbone (conf/model/tiny.yaml); max_position_embeddings is raised to the max length
TINY = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512}
TARGETS = {"padding_efficiency": 0.95, "train_speedup_cross": 1.8, "fraction_of_bound": 0.90, "predict_speedup": 2.0,
           "train_speedup_siamese": 3.0, "predict_speedup_token_budget": 5.0,
           "train_speedup_siamese_vs_best_baseline": 1.5}
BUSY_PATTERN = "train.py|learning.py"


# ---------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------
def tiny_overrides(max_length: int) -> dict[str, Any]:
    return {**TINY, "max_position_embeddings": max(512, max_length)}


def cross_text(record) -> str:
    """The public notebooks' cross-encoder input: plain concatenation with [A] / [B] markers."""
    return "\n".join(record.prompt) + " [A] " + "\n".join(record.response_a) + " [B] " + "\n".join(record.response_b)


def efficiency(batches: list[tuple[int, int]]) -> float:
    """real / processed tokens over (real, processed) pairs."""
    processed = sum(p for _, p in batches)
    return sum(r for r, _ in batches) / max(processed, 1)


def side_batches(side_lengths: list[list[int]], index_batches) -> list[tuple[int, int]]:
    """(real, processed) of each batch when every sequence of the batch is padded to the longest."""
    out = []
    for batch in index_batches:
        lengths = [n for i in batch for n in side_lengths[i]]
        out.append((sum(lengths), max(lengths) * len(lengths)))
    return out


def grouped_side_batches(side_lengths: list[list[int]], index_batches, groups: int) -> list[tuple[int, int]]:
    """(real, processed) of each batch when its sequences run in up to `groups` length groups, each padded to
    its own longest (`model.side_groups`, `collate.side_groups`)."""
    from pref_lightning.data.collate import side_groups

    out = []
    for batch in index_batches:
        lengths = [n for i in batch for n in side_lengths[i]]
        parts = side_groups(lengths, groups)
        out.append((sum(lengths), sum(len(g) * max(lengths[i] for i in g) for g in parts)))
    return out


def random_batches(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def mask_tokens(mask) -> tuple[int, int]:
    return int(mask.sum()), int(mask.numel())


def window_stats(starts: list[float], ends: list[float], tokens: list[tuple[int, int]], warmup: int,
                 steps: int, batch_size: int, rows_per_step: list[int]) -> dict[str, Any]:
    """Throughput over steps warmup .. warmup+steps-1 (0-based), window from the end of the last warm-up step."""
    if len(ends) < warmup + steps:
        raise RuntimeError(f"only {len(ends)} steps ran; wanted {warmup + steps}")
    t0 = ends[warmup - 1] if warmup else starts[0]
    t1 = ends[warmup + steps - 1]
    window = t1 - t0
    step_times = [e - s for s, e in zip(starts[warmup:warmup + steps], ends[warmup:warmup + steps])]
    timed = tokens[warmup:warmup + steps]
    rows = sum(rows_per_step[warmup:warmup + steps])
    real = sum(r for r, _ in timed)
    processed = sum(p for _, p in timed)
    return {
        "step_s": [round(t, 4) for t in step_times],
        "step_tokens": timed,
        "step_rows": rows_per_step[warmup:warmup + steps],
        "window_s": window,
        "step_s_sum": sum(step_times),
        "step_s_median": float(np.median(step_times)),
        "between_steps_share": max(0.0, 1.0 - sum(step_times) / window) if window > 0 else 0.0,
        "timed_rows": rows,
        "train_rows_per_s": rows / window,
        "real_tokens_per_s": real / window,
        "processed_tokens_per_s": processed / window,
        "padding_efficiency": real / max(processed, 1),
        "real_tokens_per_row": real / max(rows, 1),
        "processed_tokens_per_row": processed / max(rows, 1),
    }


# ---------------------------------------------------------------------------------------------------
# child: (a) HF Trainer recipe
# ---------------------------------------------------------------------------------------------------
def run_hf(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import (
        AutoTokenizer,
        DataCollatorWithPadding,
        DebertaV2ForSequenceClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from pref_lightning.data.records import read_records
    from pref_lightning.model.backbone import build_backbone

    started = time.perf_counter()
    max_length, batch_size = spec["max_length"], spec["batch_size"]
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])

    def encode(records, with_labels: bool) -> list[dict[str, Any]]:
        enc = tokenizer([cross_text(r) for r in records], truncation=True, max_length=max_length)
        items = []
        for i, record in enumerate(records):
            item = {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]}
            if with_labels:
                item["labels"] = int(record.label)
            items.append(item)
        return items

    class ListDataset(torch.utils.data.Dataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    class RecordingCollator:
        """DataCollatorWithPadding, noting (real, processed) tokens of every batch it builds."""

        def __init__(self, inner):
            self.inner = inner
            self.log: list[tuple[int, int]] = []
            self.rows: list[int] = []

        def __call__(self, features):
            batch = self.inner(features)
            self.log.append(mask_tokens(batch["attention_mask"]))
            self.rows.append(len(features))
            return batch

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.starts: list[float] = []
            self.ends: list[float] = []
            self.predict_ends: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_prediction_step(self, args, state, control, **kwargs):
            self.predict_ends.append(time.perf_counter())

    train_records = read_records(spec["train_csv"], require_labels=True)
    predict_records = read_records(spec["predict_csv"], require_labels=False)
    train_items = encode(train_records, with_labels=True)
    lengths = [len(item["input_ids"]) for item in train_items]

    backbone = build_backbone("tiny", vocab_size=len(tokenizer), tiny_overrides=tiny_overrides(max_length),
                              dropout=0.0)
    config = backbone.config
    config.num_labels = 3
    del backbone
    torch.manual_seed(spec["seed"])
    model = DebertaV2ForSequenceClassification(config)

    warmup, steps = spec["warmup"], spec["steps"]
    args = TrainingArguments(
        output_dir=str(Path(spec["work_dir"]) / f"hf_{batch_size}"),
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        max_steps=warmup + steps, learning_rate=1e-3, weight_decay=0.01, max_grad_norm=1.0,
        lr_scheduler_type="linear", warmup_steps=0, bf16=spec["precision"] == "bf16", use_cpu=True,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, seed=spec["seed"], data_seed=spec["seed"],
    )
    collator = RecordingCollator(DataCollatorWithPadding(tokenizer))
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(train_items), data_collator=collator,
                      callbacks=[timer])
    setup_s = time.perf_counter() - started
    trainer.train()
    # the loader may have collated one batch ahead: the first warmup+steps batches are the ones trained on
    train = window_stats(timer.starts, timer.ends, collator.log, warmup, steps, batch_size, collator.rows)
    epoch_batches = random_batches(len(lengths), batch_size, spec["seed"])
    out = {
        **train,
        "setup_s": setup_s,
        "sequences_per_row": 1,
        "padding_efficiency_epoch": efficiency(side_batches([[n] for n in lengths], epoch_batches)),
        "mean_real_tokens_per_row_all": float(np.mean(lengths)),
        "truncated_rows": float(np.mean(np.asarray(lengths) >= max_length)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if spec["predict"]:
        predict_items = encode(predict_records, with_labels=False)
        collator.log.clear()
        collator.rows.clear()
        t0 = time.perf_counter()
        output = trainer.predict(ListDataset(predict_items))
        predict_s = time.perf_counter() - t0
        assert output.predictions.shape == (len(predict_items), 3), output.predictions.shape
        out.update(predict_rows=len(predict_items), predict_s=predict_s,
                   predict_rows_per_s=len(predict_items) / predict_s,
                   predict_padding_efficiency=efficiency(collator.log),
                   predict_batch_s=np.diff([t0, *timer.predict_ends]).round(3).tolist(),
                   predict_batch_tokens=collator.log)
    return out


# ---------------------------------------------------------------------------------------------------
# child: (b) / (c) this project
# ---------------------------------------------------------------------------------------------------
def tiny_llama_folder(work: Path, tokenizer, max_length: int) -> Path:
    """A random Llama of the tiny DeBERTa's shape (hidden 128, 2 layers, 4 heads, intermediate 512) saved
    like a hub download, with the benchmark's tokenizer: LoRA needs a pretrained folder."""
    from transformers import LlamaConfig, LlamaModel

    folder = work / "tiny_llama"
    if not (folder / "config.json").is_file():
        import torch

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=TINY["hidden_size"],
                             num_hidden_layers=TINY["num_hidden_layers"], num_attention_heads=TINY["num_attention_heads"],
                             num_key_value_heads=TINY["num_attention_heads"], intermediate_size=TINY["intermediate_size"],
                             max_position_embeddings=max(512, max_length), pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
        LlamaModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def run_project(spec: dict[str, Any]) -> dict[str, Any]:
    import lightning as L
    import torch
    from transformers import AutoTokenizer

    from pref_lightning.data.datamodule import PreferenceDataModule
    from pref_lightning.data.sampler import LengthGroupedSampler
    from pref_lightning.model.module import PreferenceModule

    started = time.perf_counter()
    layout = spec["layout"]
    max_length, batch_size, warmup, steps = spec["max_length"], spec["batch_size"], spec["warmup"], spec["steps"]
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    # validation is switched off (limit_val_batches=0); the small predict file stands in as val_path so
    # that every training row is used and nothing is held out
    datamodule = PreferenceDataModule(
        train_path=spec["train_csv"], val_path=spec["predict_csv"], predict_path=spec["predict_csv"],
        max_length=max_length, batch_size=batch_size, eval_batch_size=batch_size, num_workers=0,
        pad_to_multiple_of=None, length_grouped=True, mega_batch_mult=spec["mega_batch_mult"], layout=layout,
        split_seed=spec["seed"],
    )
    datamodule.attach_tokenizer(tokenizer)
    datamodule.setup("fit")
    if spec["predict"]:
        datamodule.setup("predict")
    L.seed_everything(spec["seed"], verbose=False)
    siamese = layout == "siamese"
    groups = spec.get("side_groups", 1)
    common = {"vocab_size": len(tokenizer), "lr": 1e-3, "head_lr": 1e-3, "spec": datamodule.spec,
              "swap_augment": "random" if siamese else "none", "tta_swap": siamese, "side_groups": groups}
    if spec["setup"] == LLM_SETUP:
        model = PreferenceModule(backbone=str(tiny_llama_folder(Path(spec["work_dir"]), tokenizer, max_length)),
                                 pooling="last", lora=LLM_LORA, attn_implementation="sdpa", **common)
    else:
        model = PreferenceModule(backbone="tiny", tiny_config=tiny_overrides(max_length), backbone_dropout=0.0,
                                 **common)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    class StepTimer(L.Callback):
        def __init__(self):
            self.starts: list[float] = []
            self.ends: list[float] = []
            self.tokens: list[tuple[int, int]] = []
            self.rows: list[int] = []
            self.predict_tokens: list[tuple[int, int]] = []
            self.predict_ends: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ends.append(time.perf_counter())
            # processed: what the backbone really ran over (grouped sides: less than the mask's size)
            # (the cross layout's batch also holds the rows with A and B exchanged, run only under swap TTA)
            self.tokens.append((int(pl_module.last_real_tokens), pl_module.last_processed_tokens))
            self.rows.append(len(batch["labels"]))

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.predict_tokens.append((int(pl_module.last_real_tokens), pl_module.last_processed_tokens))
            self.predict_ends.append(time.perf_counter())

    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="bf16-mixed" if spec["precision"] == "bf16" else "32-true",
        max_steps=warmup + steps, max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0, use_distributed_sampler=False,
        log_every_n_steps=10_000, callbacks=[timer],
    )
    setup_s = time.perf_counter() - started
    trainer.fit(model, datamodule=datamodule)
    train = window_stats(timer.starts, timer.ends, timer.tokens, warmup, steps, batch_size, timer.rows)

    pairs = datamodule.train_set.pairs
    sides = [[len(p.ids_a), len(p.ids_b)] if siamese else [len(p.ids_a)] for p in pairs]
    row_lengths = [len(p) for p in pairs]

    def epoch_efficiency(mult: int) -> float:
        sampler = LengthGroupedSampler(row_lengths, batch_size, shuffle=True, mega_batch_mult=mult, seed=spec["seed"])
        batches = sampler.training_batches()
        if groups > 1:
            return efficiency(grouped_side_batches(sides, batches, groups))
        return efficiency(side_batches(sides, batches))

    mults = sorted({spec["mega_batch_mult"], 10, 25, 50, 100, 200, -(-len(pairs) // batch_size)})
    out = {
        **train,
        "setup_s": setup_s,
        "sequences_per_row": 2 if siamese else 1,
        "side_groups": groups,
        "mega_batch_mult": spec["mega_batch_mult"],
        "mega_batch_rows": batch_size * spec["mega_batch_mult"],
        "padding_efficiency_epoch": epoch_efficiency(spec["mega_batch_mult"]),
        "padding_efficiency_epoch_by_mega_batch_mult": {str(m): round(epoch_efficiency(m), 4) for m in mults},
        # the best any batching of whole pairs can do when each pair's two sides share one padded
        # length (the collator stacks A and B sides in one (2B, L) tensor): sum(a + b) / sum(2 max(a, b))
        "padding_efficiency_pair_bound": efficiency([(sum(s), max(s) * len(s)) for s in sides]),
        "mean_real_tokens_per_row_all": float(np.mean([sum(s) for s in sides])),
        "truncated_rows": float(np.mean([max(s) >= max_length for s in sides])),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": trainable,
    }
    if spec["predict"]:
        t0 = time.perf_counter()
        outputs = trainer.predict(model, datamodule=datamodule)
        predict_s = time.perf_counter() - t0
        n = sum(len(o["index"]) for o in outputs)
        assert n == len(datamodule.predict_set), (n, len(datamodule.predict_set))
        assert all(torch.isfinite(o["logits"]).all() for o in outputs)
        out.update(predict_rows=n, predict_s=predict_s, predict_rows_per_s=n / predict_s,
                   predict_padding_efficiency=efficiency(timer.predict_tokens),
                   predict_batch_s=np.diff([t0, *timer.predict_ends]).round(3).tolist(),
                   predict_batch_tokens=timer.predict_tokens)
        if spec.get("predict_max_tokens"):
            # the same rows again with prediction's token budget (predict.py max_tokens) instead of batch rows
            from pref_lightning.predict.prediction import gather_predictions

            by_rows = gather_predictions(outputs, n)
            datamodule.eval_max_tokens = spec["predict_max_tokens"]
            timer.predict_tokens.clear()
            timer.predict_ends.clear()
            t0 = time.perf_counter()
            outputs = trainer.predict(model, datamodule=datamodule)
            budget_s = time.perf_counter() - t0
            by_tokens = gather_predictions(outputs, n)
            out.update(predict_token_budget=spec["predict_max_tokens"], predict_token_budget_s=budget_s,
                       predict_token_budget_rows_per_s=n / budget_s, predict_token_budget_batches=len(outputs),
                       predict_token_budget_padding_efficiency=efficiency(timer.predict_tokens),
                       predict_token_budget_max_abs_logit_diff=float(np.abs(by_rows - by_tokens).max()))
    return out


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    result = run_hf(spec) if spec["setup"] == "hf_cross" else run_project(spec)
    result.update(setup=spec["setup"], batch_size=spec["batch_size"], steps=spec["steps"], warmup=spec["warmup"],
                  max_length=spec["max_length"],
                  peak_rss_mb=peak_rss_mb(), torch_threads=torch.get_num_threads())
    Path(spec["result_path"]).write_text(json.dumps(result, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------------
def cpu_seconds_busy() -> float | None:
    """CPU seconds all processes of the machine spent busy since boot (/proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def busy_processes() -> list[str]:
    try:
        found = subprocess.run(["pgrep", "-af", BUSY_PATTERN], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    return [line for line in found.splitlines() if line.strip() and str(os.getpid()) != line.split()[0]]


def machine() -> dict[str, Any]:
    import lightning
    import torch
    import transformers

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import accelerate

        accelerate_version = accelerate.__version__
    except ImportError:
        accelerate_version = None
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def prepare_data(work: Path, rows: int, predict_rows: int, seed: int, vocab_size: int, cache_dir: str | None):
    """Synthetic rows -> train.csv (all rows) and predict.csv (the first rows); the tokenizer, trained once."""
    from pref_lightning.data.records import records_from_frame
    from pref_lightning.data.synthetic import generate, write_csv
    from pref_lightning.data.tokenizers import cached_trained_tokenizer

    frame = generate(rows, seed=seed).frame
    write_csv(frame, work / "train.csv")
    write_csv(frame.iloc[:predict_rows], work / "predict.csv")
    texts = []
    for record in records_from_frame(frame, "synthetic", require_labels=True):
        texts += record.prompt + record.response_a + record.response_b
    tokenizer = cached_trained_tokenizer(texts, vocab_size, cache_dir)
    tokenizer.save_pretrained(work / "tokenizer")
    answer_chars = [sum(len(t) for t in json.loads(c) if t) for col in ("response_a", "response_b") for c in frame[col]]
    return {"rows": rows, "predict_rows": min(predict_rows, rows), "seed": seed, "vocab_size": len(tokenizer),
            "median_answer_chars": float(np.median(answer_chars)),
            "p95_answer_chars": float(np.percentile(answer_chars, 95))}


def run_child(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    name = f"{spec['setup']}_bs{spec['batch_size']}"
    spec_path = work / f"{name}.spec.json"
    spec["result_path"] = str(work / f"{name}.result.json")
    spec_path.write_text(json.dumps(spec))
    log_path = work / f"{name}.log"
    busy_before = busy_processes()
    load_before = os.getloadavg()
    machine_before, own_before = cpu_seconds_busy(), own_cpu_seconds()
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    wall = time.perf_counter() - started
    machine_after, own_after = cpu_seconds_busy(), own_cpu_seconds()
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(Path(spec["result_path"]).read_text())
    result["child_wall_s"] = wall
    result["loadavg_1min_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    # CPU used by anything else on the machine while the child ran, as a share of all cores: the
    # honest contention measure (a process listed below may just be waiting for the benchmark lock)
    if machine_before is not None and machine_after is not None:
        foreign = max(0.0, (machine_after - machine_before) - (own_after - own_before))
        result["foreign_cpu_share"] = foreign / (wall * (os.cpu_count() or 1))
    else:
        result["foreign_cpu_share"] = None
    result["busy_processes"] = sorted(set(busy_before) | set(busy_processes()))
    print(f"  {name}: {result['train_rows_per_s']:.2f} train rows/s, padding efficiency "
          f"{result['padding_efficiency']:.3f}"
          + (f", {result['predict_rows_per_s']:.2f} predict rows/s" if "predict_rows_per_s" in result else "")
          + f", peak RSS {result['peak_rss_mb']:.0f} MB ({result['child_wall_s']:.0f} s"
          + (f", other processes used {100 * result['foreign_cpu_share']:.0f}% of the CPU"
             if result["foreign_cpu_share"] is not None else "") + ")", flush=True)
    return result


def run_with_retries(spec: dict[str, Any], work: Path, retries: int, max_foreign: float) -> dict[str, Any]:
    """Run a setup again (up to `retries` times, 30 s apart) while other processes took more than
    `max_foreign` of the machine's CPU during it; keep the least contended run."""
    attempts = []
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(30)
        result = run_child(dict(spec), work)
        attempts.append(result)
        share = result["foreign_cpu_share"]
        if share is None or share <= max_foreign:
            break
        print(f"    other processes used {100 * share:.0f}% of the CPU during {spec['setup']} bs{spec['batch_size']}"
              + ("; running it again" if attempt < retries else "; no retries left"), flush=True)
    best = min(attempts, key=lambda r: r["foreign_cpu_share"] or 0.0)
    best["attempts"] = [{"foreign_cpu_share": r["foreign_cpu_share"], "train_rows_per_s": r["train_rows_per_s"],
                         "predict_rows_per_s": r.get("predict_rows_per_s")} for r in attempts]
    return best


def steps_for(batch_size: int, steps: int, primary: int) -> int:
    """Smaller batches get more steps (rows per window = half of the primary's, at least `steps`)."""
    return max(steps, math.ceil(steps * primary / batch_size / 2))


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def summarise(results: dict[str, dict[int, dict[str, Any]]], primary: int) -> dict[str, Any]:
    """Ratios to (a), the padding bound and the targets, at the primary batch size."""
    a, b, c, d = (results[s][primary] for s in SETUPS)
    bound = 1.0 / a["padding_efficiency"]
    speed_b = b["train_rows_per_s"] / a["train_rows_per_s"]
    speed_c = c["train_rows_per_s"] / a["train_rows_per_s"]
    predict_b = b["predict_rows_per_s"] / a["predict_rows_per_s"]
    predict_c = c["predict_rows_per_s"] / a["predict_rows_per_s"]
    # the same bound, corrected for (b) seeing a different number of real tokens per row than (a)
    token_bound = a["processed_tokens_per_row"] / b["real_tokens_per_row"]
    # the baseline tuned over the measured batch sizes: is the gain more than picking a better batch size?
    best_bs_a = max(results["hf_cross"], key=lambda bs: results["hf_cross"][bs]["train_rows_per_s"])
    best_bs_b = max(results["pl_cross"], key=lambda bs: results["pl_cross"][bs]["train_rows_per_s"])
    best_a = results["hf_cross"][best_bs_a]["train_rows_per_s"]
    return {
        "batch_size": primary,
        "baseline_best_batch_size": best_bs_a,
        "train_speedup_cross_vs_best_baseline": b["train_rows_per_s"] / best_a,
        "best_train_speedup_cross_vs_best_baseline": results["pl_cross"][best_bs_b]["train_rows_per_s"] / best_a,
        "project_cross_best_batch_size": best_bs_b,
        "train_speedup_cross": speed_b,
        # siamese: the default path (d), sides in length groups; (c) the one-call path it replaces
        "train_speedup_siamese": d["train_rows_per_s"] / a["train_rows_per_s"],
        "train_speedup_siamese_one_call": speed_c,
        "train_speedup_siamese_vs_best_baseline": d["train_rows_per_s"] / best_a,
        "siamese_grouped_vs_one_call_by_batch": {
            str(bs): results["pl_siamese_grouped"][bs]["train_rows_per_s"] / results["pl_siamese"][bs]["train_rows_per_s"]
            for bs in results["pl_siamese"]},
        "padding_efficiency": b["padding_efficiency"],
        "padding_efficiency_siamese": d["padding_efficiency"],
        "padding_efficiency_siamese_one_call": c["padding_efficiency"],
        "predict_speedup_token_budget": d.get("predict_token_budget_rows_per_s", math.nan) / a["predict_rows_per_s"],
        "baseline_padding_efficiency": a["padding_efficiency"],
        "padding_efficiency_epoch": b["padding_efficiency_epoch"],
        "baseline_padding_efficiency_epoch": a["padding_efficiency_epoch"],
        "padding_bound": bound,
        "fraction_of_bound": speed_b / bound,
        "padding_bound_real_tokens": token_bound,
        "fraction_of_real_token_bound": speed_b / token_bound,
        "predict_speedup": predict_b,
        "predict_speedup_siamese": predict_c,
        "predict_speedup_siamese_grouped": d["predict_rows_per_s"] / a["predict_rows_per_s"],
        "real_token_throughput_ratio_cross": b["real_tokens_per_s"] / a["real_tokens_per_s"],
        "real_token_throughput_ratio_siamese": d["real_tokens_per_s"] / a["real_tokens_per_s"],
    }


def target_rows(summary: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    return [
        ("padding efficiency (b), timed batches >= 0.95", summary["padding_efficiency"],
         TARGETS["padding_efficiency"], summary["padding_efficiency"] >= TARGETS["padding_efficiency"]),
        ("(b)/(a) train rows/s >= 1.8x", summary["train_speedup_cross"], TARGETS["train_speedup_cross"],
         summary["train_speedup_cross"] >= TARGETS["train_speedup_cross"]),
        (f"(b)/(a) train >= 90% of the bound 1/{summary['baseline_padding_efficiency']:.3f} = "
         f"{summary['padding_bound']:.2f}x", summary["fraction_of_bound"], TARGETS["fraction_of_bound"],
         summary["fraction_of_bound"] >= TARGETS["fraction_of_bound"]),
        ("(b)/(a) predict rows/s >= 2x", summary["predict_speedup"], TARGETS["predict_speedup"],
         summary["predict_speedup"] >= TARGETS["predict_speedup"]),
        ("padding efficiency (d) siamese, timed batches >= 0.95", summary["padding_efficiency_siamese"],
         TARGETS["padding_efficiency"], summary["padding_efficiency_siamese"] >= TARGETS["padding_efficiency"]),
        ("(d)/(a) train rows/s >= 3x", summary["train_speedup_siamese"], TARGETS["train_speedup_siamese"],
         summary["train_speedup_siamese"] >= TARGETS["train_speedup_siamese"]),
        ("(d) token-budget predict / (a) predict rows/s >= 5x", summary["predict_speedup_token_budget"],
         TARGETS["predict_speedup_token_budget"],
         summary["predict_speedup_token_budget"] >= TARGETS["predict_speedup_token_budget"]),
        (f"(d)/(a at its best batch {summary['baseline_best_batch_size']}) train rows/s >= 1.5x",
         summary["train_speedup_siamese_vs_best_baseline"], TARGETS["train_speedup_siamese_vs_best_baseline"],
         summary["train_speedup_siamese_vs_best_baseline"] >= TARGETS["train_speedup_siamese_vs_best_baseline"]),
    ]


def cfg_max_length(results: dict[str, dict[int, dict[str, Any]]]) -> int:
    r = next(iter(results["pl_cross"].values()))
    return int(r.get("max_length", 1024))


def per_token_by_length(r: dict[str, Any], split: int) -> tuple[float | None, float | None]:
    """Seconds per processed token of the timed steps padded to <= split and > split tokens."""
    groups: dict[bool, list[float]] = {False: [0.0, 0.0], True: [0.0, 0.0]}
    for t, (_, processed), rows in zip(r["step_s"], r["step_tokens"], r["step_rows"]):
        length = processed / max(rows * r["sequences_per_row"], 1)
        groups[length > split][0] += t
        groups[length > split][1] += processed
    return tuple(g[0] / g[1] if g[1] else None for g in (groups[False], groups[True]))


def diagnoses(results: dict[str, dict[int, dict[str, Any]]], summary: dict[str, Any], primary: int,
              contended: bool) -> list[str]:
    """What limits the ratios, in words, from the measured numbers."""
    a, b, c, d = (results[s][primary] for s in SETUPS)
    notes = []
    if contended:
        shares = {f"{s} bs{bs}": round(r["foreign_cpu_share"] or 0.0, 2) for s in SETUPS
                  for bs, r in results[s].items()}
        notes.append(f"other processes used CPU during the measurement (share of all cores per setup: {shares}): "
                     "absolute numbers are low and ratios noisy (oversubscribed OpenMP threads slow small "
                     "kernels far more than the CPU share suggests)")
    need = TARGETS["train_speedup_cross"]
    if summary["padding_bound"] < need:
        notes.append(f"(a)'s padding efficiency is {a['padding_efficiency']:.3f}, so removing all padding is worth "
                     f"{summary['padding_bound']:.2f}x: {need}x is out of reach from padding alone (it needs (a) at "
                     f"or below {1 / need:.3f}, i.e. longer-tailed lengths or larger batches)")
    elif summary["padding_bound"] < need / TARGETS["fraction_of_bound"]:
        notes.append(f"the padding bound is {summary['padding_bound']:.2f}x, so {need}x needs "
                     f"{100 * need / summary['padding_bound']:.0f}% of it (more than the 90% target)")
    if summary["padding_efficiency"] < TARGETS["padding_efficiency"]:
        by_mult = b["padding_efficiency_epoch_by_mega_batch_mult"]
        better = [m for m, v in by_mult.items() if v >= TARGETS["padding_efficiency"]]
        notes.append(f"(b) padding efficiency {b['padding_efficiency']:.3f} (epoch {b['padding_efficiency_epoch']:.3f}) "
                     f"with mega-batches of {b['mega_batch_rows']} rows (mega_batch_mult={b['mega_batch_mult']}); "
                     f"epoch efficiency by mult: {by_mult}"
                     + (f"; mult >= {min(map(int, better))} reaches 0.95" if better else ""))
    if c["padding_efficiency"] < TARGETS["padding_efficiency"]:
        notes.append(f"siamese (c) padding efficiency {c['padding_efficiency']:.3f} (epoch {c['padding_efficiency_epoch']:.3f}): "
                     "the collator pads both sides of a pair to one length in a single (2B, L) tensor and the sampler "
                     "groups pairs by max(len A, len B), so the shorter answer of every pair is padded to the longer; "
                     f"no grouping of whole pairs can exceed {c['padding_efficiency_pair_bound']:.3f} on these rows "
                     "(model.side_groups=1; (d) runs the 2B sides in length groups instead)")
    if d["padding_efficiency"] < TARGETS["padding_efficiency"]:
        notes.append(f"siamese (d) padding efficiency {d['padding_efficiency']:.3f} (epoch {d['padding_efficiency_epoch']:.3f}) "
                     f"with up to {d['side_groups']} length groups of the batch's sides")
    notes.append("siamese (d) vs (c) train rows/s by batch size: "
                 + ", ".join(f"batch {bs}: {v:.2f}x" for bs, v in summary["siamese_grouped_vs_one_call_by_batch"].items()))
    if "predict_token_budget_rows_per_s" in d:
        notes.append(f"token-budget prediction ({d['predict_token_budget']} tokens per batch, "
                     f"{d['predict_token_budget_batches']} batches, padding efficiency "
                     f"{d['predict_token_budget_padding_efficiency']:.3f}): {d['predict_token_budget_rows_per_s']:.2f} "
                     f"rows/s vs {d['predict_rows_per_s']:.2f} at batch {primary}; largest logit difference to the "
                     f"batch-{primary} predictions {d['predict_token_budget_max_abs_logit_diff']:.1e}")
    for name, r in (("(a)", a), ("(b)", b), ("(c)", c), ("(d)", d)):
        if r["between_steps_share"] > 0.05:
            notes.append(f"{name}: {100 * r['between_steps_share']:.0f}% of the train window is spent between steps "
                         "(loader, collation, framework bookkeeping)")
    for name, r in (("(a)", a), ("(b)", b), ("(c)", c), ("(d)", d)):
        drift = r["real_tokens_per_row"] / r["mean_real_tokens_per_row_all"]
        if abs(drift - 1) > 0.05:
            notes.append(f"{name}: the timed batches hold {r['real_tokens_per_row']:.0f} real tokens per row vs "
                         f"{r['mean_real_tokens_per_row_all']:.0f} over all rows (which batches fall in the window); "
                         f"at the all-rows mean its train rows/s would be about {r['train_rows_per_s'] * drift:.2f} "
                         "(token-proportional estimate); more --steps narrow this")
    ratio = b["real_tokens_per_row"] / a["real_tokens_per_row"]
    if abs(ratio - 1) > 0.03:
        notes.append(f"(b) feeds {ratio:.2f}x the real tokens per row of (a) (special tokens and budgeted truncation vs "
                     "the marker text), so the padding-only bound is "
                     f"{summary['padding_bound_real_tokens']:.2f}x in real tokens; (b) reaches "
                     f"{100 * summary['fraction_of_real_token_bound']:.0f}% of that")
    per_token_a = 1.0 / a["processed_tokens_per_s"]
    per_token_b = 1.0 / b["processed_tokens_per_s"]
    note = (f"cost per processed token: (a) {1e6 * per_token_a:.0f} us, (b) {1e6 * per_token_b:.0f} us "
            f"((b)/(a) = {per_token_b / per_token_a:.2f})")
    split = max(8, cfg_max_length(results) // 2)
    short, long = per_token_by_length(b, split)
    if short and long:
        note += (f"; within (b)'s own timed steps, {1e6 * short:.0f} us per token in batches padded to <= {split} "
                 f"vs {1e6 * long:.0f} us above")
        if long > 1.5 * short:
            note += (": a step's cost grows much faster than its token count at long lengths (the L x L "
                     "attention tensors of a batch outgrow the CPU caches), so batches padded to the longest of 8 "
                     "random rows are disproportionately slow and cutting the padded length gains more than the "
                     "padding share; this is why (b)/(a) can exceed the 1/efficiency bound, which assumes a cost "
                     "proportional to processed tokens")
    notes.append(note)
    best = summary["baseline_best_batch_size"]
    if best != primary:
        r_best = results["hf_cross"][best]
        notes.append(f"(a) is fastest at batch {best} ({r_best['train_rows_per_s']:.2f} rows/s, "
                     f"{r_best['train_rows_per_s'] / a['train_rows_per_s']:.2f}x its batch-{primary} speed: fewer rows "
                     f"padded to a long one); against that tuned baseline (b) at batch {primary} is "
                     f"{summary['train_speedup_cross_vs_best_baseline']:.2f}x and (b) at its best batch "
                     f"({summary['project_cross_best_batch_size']}) "
                     f"{summary['best_train_speedup_cross_vs_best_baseline']:.2f}x")
    notes.append(f"siamese (c) processes {c['real_tokens_per_row']:.0f} real tokens per row vs "
                 f"{b['real_tokens_per_row']:.0f} for cross (b) (the prompt is encoded twice, each answer gets up "
                 f"to max length on its own); real tokens/s (c)/(a) = {summary['real_token_throughput_ratio_siamese']:.2f}")
    if b["predict_padding_efficiency"] > 0 and a["predict_padding_efficiency"] > 0:
        notes.append(f"predict padding efficiency: (a) {a['predict_padding_efficiency']:.3f} (sequential batches) vs "
                     f"(b) {b['predict_padding_efficiency']:.3f} (length-sorted); bound "
                     f"{1 / a['predict_padding_efficiency']:.2f}x, measured {summary['predict_speedup']:.2f}x")
    return notes


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    primary = cfg["batch_sizes"][0]
    res = report["results"]
    lines = [
        f"Throughput on {report['machine']['cpu_model']} ({report['machine']['cpus_usable']} cores, "
        f"torch {report['machine']['torch']}, {report['machine']['torch_threads']} threads), "
        f"{'bf16 autocast' if cfg.get('precision') == 'bf16' else 'fp32'}; "
        f"{cfg['rows']} synthetic rows (median answer {report['data']['median_answer_chars']:.0f} chars), "
        f"max length {cfg['max_length']}, tiny DeBERTa {TINY['hidden_size']}x{TINY['num_hidden_layers']}, "
        f"{cfg['warmup']} warm-up + {cfg['steps']} timed steps at batch {primary}, "
        f"predict on {report['data']['predict_rows']} rows at batch {primary}, mega_batch_mult {cfg['mega_batch_mult']}"
        + (" — CONTENDED (other jobs were running)" if report["contended"] else ""),
        "",
        "| setup | batch | steps | train rows/s | x (a) | real tok/s | processed tok/s | pad eff (timed) "
        "| pad eff (epoch) | real tok/row | seq/row | predict rows/s | x (a) | predict pad eff | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for bs in cfg["batch_sizes"]:
        base = res["hf_cross"][str(bs)]
        for setup in [s for s in (*SETUPS, LLM_SETUP) if str(bs) in res.get(s, {})]:
            r = res[setup][str(bs)]
            predict = r.get("predict_rows_per_s")
            lines.append(
                f"| {LABELS[setup]} | {bs} | {r['steps']} | {r['train_rows_per_s']:.2f} "
                f"| {r['train_rows_per_s'] / base['train_rows_per_s']:.2f} | {r['real_tokens_per_s']:.0f} "
                f"| {r['processed_tokens_per_s']:.0f} | {r['padding_efficiency']:.3f} | {r['padding_efficiency_epoch']:.3f} "
                f"| {r['real_tokens_per_row']:.0f} | {r['sequences_per_row']} | {fmt(predict)} "
                f"| {fmt(None if predict is None else predict / base['predict_rows_per_s'])} "
                f"| {fmt(r.get('predict_padding_efficiency'), 3)} | {r['peak_rss_mb']:.0f} |")
    s = report["summary"]
    lines += [
        "",
        f"Bound at batch {primary}: if every processed token were real, (b) would be at least "
        f"1 / {s['baseline_padding_efficiency']:.3f} = {s['padding_bound']:.2f}x faster than (a); measured "
        f"{s['train_speedup_cross']:.2f}x = {100 * s['fraction_of_bound']:.0f}% of the bound "
        f"(in real tokens per row: bound {s['padding_bound_real_tokens']:.2f}x, "
        f"{100 * s['fraction_of_real_token_bound']:.0f}%).",
        "",
        f"| target (batch {primary}) | measured | target | status |",
        "|---|---:|---:|---|",
    ]
    for name, measured, target, ok in target_rows(s):
        lines.append(f"| {name} | {measured:.3f} | {target:.2f} | {'met' if ok else 'NOT met'} |")
    lines += ["", "What limits the ratios:"] + [f"- {note}" for note in report["diagnoses"]]
    if LLM_SETUP in res:
        d, e = res["pl_siamese_grouped"][str(primary)], res[LLM_SETUP][str(primary)]
        lines += ["", f"Decoder LLM vs DeBERTa of the same shape (batch {primary}, same rows and path):", "",
                  "| backbone | parameters | trainable | train rows/s | real tok/s | pad eff | predict rows/s "
                  "| peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in (("tiny DeBERTa-v3, full fine-tuning (d)", d), ("tiny Llama, LoRA r=8 all-linear (e)", e)):
            lines.append(f"| {name} | {r['parameters']:,} | {100 * r['trainable_parameters'] / r['parameters']:.1f}% "
                         f"| {r['train_rows_per_s']:.2f} | {r['real_tokens_per_s']:.0f} | {r['padding_efficiency']:.3f} "
                         f"| {fmt(r.get('predict_rows_per_s'))} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="400 rows, 10 timed steps, 2 warm-up, 96 predict rows")
    parser.add_argument("--rows", type=int, help="synthetic rows (default 2000; --quick 400)")
    parser.add_argument("--steps", type=int, help="timed steps at the first batch size (default 60; --quick 10)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3; --quick 2)")
    parser.add_argument("--predict-rows", type=int, help="rows to predict (default 400; --quick 96)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-sizes", default="8,2",
                        help="comma list; the first is the one the targets and JSON keys use (default 8,2)")
    parser.add_argument("--mega-batch-mult", type=int, default=50, help="project length grouping (default 50)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="all setups: fp32 (default; CPUs without native bf16) or bf16 autocast")
    parser.add_argument("--predict-max-tokens", type=int, default=PREDICT_MAX_TOKENS,
                        help=f"token budget of the (d) token-budget prediction row (default {PREDICT_MAX_TOKENS}, predict.py's)")
    parser.add_argument("--llm", action="store_true",
                        help="also (e): the (d) path with a tiny Llama of the same shape and LoRA, at the first batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    parser.add_argument("--retries", type=int, default=2,
                        help="run a setup again when other processes used more than --max-foreign of the CPU (default 2)")
    parser.add_argument("--max-foreign", type=float, default=0.10,
                        help="share of all cores other processes may use during a setup (default 0.10)")
    parser.add_argument("--cache-dir", default=None, help="tokenizer cache (default: the project's cache)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.rows = args.rows or (400 if quick else 2000)
    args.steps = args.steps or (10 if quick else 60)
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 3)
    args.predict_rows = min(args.predict_rows or (96 if quick else 400), args.rows)
    args.batch_sizes = [int(x) for x in str(args.batch_sizes).split(",") if x.strip()]
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error("--batch-sizes needs positive integers")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the window starts at the end of the last warm-up step)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    primary = args.batch_sizes[0]
    with tempfile.TemporaryDirectory(prefix="pref_throughput_") as tmp:
        work = Path(tmp)
        print(f"preparing {args.rows} synthetic rows and the tokenizer ...", flush=True)
        data = prepare_data(work, args.rows, args.predict_rows, args.seed, args.vocab_size, args.cache_dir)
        results: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in SETUPS}
        if args.llm:
            results[LLM_SETUP] = {}
        for bs in args.batch_sizes:
            steps = args.steps if bs == primary else steps_for(bs, args.steps, primary)
            for setup in SETUPS + ((LLM_SETUP,) if args.llm and bs == primary else ()):
                spec = {"setup": setup, "layout": "siamese" if setup in SIDE_GROUPS else "cross",
                        "side_groups": SIDE_GROUPS.get(setup, 1), "precision": args.precision,
                        "predict_max_tokens": args.predict_max_tokens if setup in ("pl_siamese_grouped", LLM_SETUP) else None,
                        "batch_size": bs, "steps": steps, "warmup": args.warmup, "max_length": args.max_length,
                        "mega_batch_mult": args.mega_batch_mult, "seed": args.seed, "threads": args.threads,
                        "predict": bs == primary, "work_dir": str(work), "tokenizer_dir": str(work / "tokenizer"),
                        "train_csv": str(work / "train.csv"), "predict_csv": str(work / "predict.csv")}
                results[setup][bs] = run_with_retries(spec, work, args.retries, args.max_foreign)
    summary = summarise(results, primary)
    busy = sorted({p for setup in results.values() for r in setup.values() for p in r["busy_processes"]})
    max_load = max(max(r["loadavg_1min_before_after"]) for setup in results.values() for r in setup.values())
    shares = [r["foreign_cpu_share"] for setup in results.values() for r in setup.values()]
    max_foreign = None if None in shares else max(shares)
    # contended: other processes took more than --max-foreign of the machine's CPU while a kept setup ran
    # (without /proc/stat: any train.py / learning.py process was seen)
    contended = bool(busy) if max_foreign is None else max_foreign > args.max_foreign
    report = {
        **{k: summary[k] for k in ("train_speedup_cross", "train_speedup_siamese", "padding_efficiency",
                                   "baseline_padding_efficiency", "predict_speedup", "padding_efficiency_siamese",
                                   "predict_speedup_token_budget", "train_speedup_siamese_vs_best_baseline")},
        "summary": summary,
        "targets": [{"name": n, "measured": m, "target": t, "met": ok} for n, m, t, ok in target_rows(summary)],
        "results": {s: {str(bs): r for bs, r in by_bs.items()} for s, by_bs in results.items()},
        "config": {"rows": args.rows, "steps": args.steps, "warmup": args.warmup, "predict_rows": args.predict_rows,
                   "max_length": args.max_length, "batch_sizes": args.batch_sizes,
                   "mega_batch_mult": args.mega_batch_mult, "vocab_size": args.vocab_size, "seed": args.seed,
                   "quick": args.quick, "tiny_config": tiny_overrides(args.max_length), "precision": args.precision,
                   "predict_max_tokens": args.predict_max_tokens, "llm": args.llm,
                   "num_workers": 0, "dropout": 0.0},
        "data": data,
        "machine": machine(),
        "contended": contended,
        "max_foreign_cpu_share": max_foreign,
        "busy_processes_seen": busy,
        "max_loadavg_1min": max_load,
        "wall_s": round(time.perf_counter() - started, 1),
        "command": "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    report["diagnoses"] = diagnoses(results, summary, primary, contended)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown(report))
    print(f"\nwrote {out} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2]))
    main()
