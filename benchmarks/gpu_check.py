"""GPU check: the whole workflow stays on the GPU, in bf16 and in fp16, and each stage's cost.

On a machine with CUDA it trains a deberta-v3-small-shaped model built from its config (random init,
no download: 6 layers, hidden 768, 12 heads, 3,072 intermediate, relative positions, with a BPE
tokenizer trained offline on the synthetic texts) on the embedded synthetic rows at
`data.max_length=1024`, for `--steps` optimizer steps, then validates the best checkpoint, calibrates
and predicts, through `train.py` and `predict.py` as a user runs them, once per precision:

- `bf16-mixed` (when the GPU has bf16),
- `16-mixed` (fp16 autocast with a gradient scaler: Kaggle's free T4 GPUs have no bf16, and
  DeBERTa-v3 in fp16 is known to overflow; non-finite losses are counted and reported),
- and, with two or more GPUs, `bf16-mixed` (or `16-mixed`) under 2-GPU DDP.

Then the decoder-LLM stages (`--only llm` runs these alone): a Qwen2-0.5B-shaped model (24 layers, hidden
896, 14 heads, 2 key/value heads, 4,864 intermediate; ~0.4B parameters with the offline tokenizer's vocabulary),
randomly initialised from its config and saved with a byte-level BPE tokenizer trained offline into a temporary
folder as a hub download would be, trained with `experiment=llm_lora` (LoRA, bf16 weights on the GPU, gradient
checkpointing, the cross verdict layout) for `--llm-steps` steps and predicted with `max_tokens=auto` (token
budgets), once with the default head (`llm_mlp`) and once with `model.head=verdict_tokens` (`llm_verdict`).

A `StageProbe` callback (pref_lightning.train.callbacks) raises as soon as any stage runs a batch off the
GPU, and records each stage's seconds, tokens/s and peak GPU memory; the script prints one table and
writes `benchmarks/results/gpu_check.json`, merged into what is there (runs not run this time are kept).
Without CUDA it says so and exits 0.

    python benchmarks/gpu_check.py              # ~5-10 minutes on one modern GPU
    python benchmarks/gpu_check.py --steps 50   # a quicker look
    python benchmarks/gpu_check.py --only llm   # the decoder-LLM stages only (~4 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pref_lightning.data.synthetic import generate  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "gpu_check.json"
DEBERTA_V3_SMALL = {"hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12,
                    "intermediate_size": 3072, "max_position_embeddings": 512}
# --smoke: the same commands on the CPU with a tiny shape (what the tests run, so the script cannot rot)
SMOKE = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
         "max_position_embeddings": 128}
# Qwen2-0.5B's shape (its 151,936-token vocabulary replaced by the offline tokenizer's), and a tiny one for --smoke
QWEN2_05B = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "intermediate_size": 4864, "max_position_embeddings": 32768, "tie_word_embeddings": True}
LLM_SMOKE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 512, "tie_word_embeddings": True}
# the verdict question and its answers, so that the BPE learns " A", " B" and " tie" as single tokens
VERDICT_TEXTS = ["Which response is better: A, B or tie? A", "Which response is better: A, B or tie? B",
                 "Which response is better: A, B or tie? tie"] * 200
LLM_RUNS = ("llm_mlp", "llm_verdict")


def probe_overrides(probe: Path, device: str) -> list[str]:
    return ["+callbacks.stage_probe._target_=pref_lightning.train.callbacks.StageProbe",
            f"+callbacks.stage_probe.path={probe}", f"+callbacks.stage_probe.require_device={device}"]


def overrides(run_dir: Path, probe: Path, args: argparse.Namespace) -> list[str]:
    shape = [f"model.tiny_config.{k}={v}" for k, v in (SMOKE if args.smoke else DEBERTA_V3_SMALL).items()]
    # model=tiny: the plain DeBERTa recipe (the embedded default's tiny_embedded adds its synthetic-data levers)
    return ["model=tiny", *shape, "model.lr=2e-5", "model.head_lr=1e-3", f"model.tokenizer_vocab_size={args.vocab_size}",
            f"data.synthetic_rows={args.rows}", f"data.max_length={args.max_length}",
            f"data.batch_size={args.batch_size}", "data.eval_batch_size=32",
            # one epoch of `steps` batches: validation and best.ckpt at its end
            f"trainer.limit_train_batches={args.steps}", "trainer.max_epochs=1", f"trainer.accelerator={args.accelerator}", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "report=false", f"hydra.run.dir={run_dir}",
            *probe_overrides(probe, args.device)]


def run(cmd: list[str], log: Path) -> tuple[int, float]:
    started = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"}).returncode
    return code, time.perf_counter() - started


def llm_folder(work: Path, args: argparse.Namespace) -> tuple[Path, int]:
    """A randomly initialised Qwen2-shaped causal LM (its LM head included) and a byte-level BPE tokenizer trained
    on the synthetic texts, saved (bf16 weights) as a hub download would be; (folder, parameters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    from pref_lightning.data.records import records_from_frame
    from pref_lightning.model.backbone import load_tokenizer

    folder = work / ("qwen2-tiny" if args.smoke else "qwen2-0.5b-shaped")
    texts = list(VERDICT_TEXTS)
    frame = generate(min(args.llm_rows, 2000), seed=7).frame
    for record in records_from_frame(frame, "synthetic", require_labels=True):
        texts += record.prompt + record.response_a + record.response_b
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=args.llm_vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # Qwen2's own layout: no bos token, eos (and pad) <|endoftext|>
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=32768, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    shape = LLM_SMOKE if args.smoke else QWEN2_05B
    tokenizer.save_pretrained(folder)
    # every id of the tokenizer as train.py loads it back gets an embedding row (it can count one token more)
    vocab = max(len(tokenizer), len(load_tokenizer(str(folder))))
    torch.manual_seed(0)
    config = Qwen2Config(**shape, vocab_size=vocab, eos_token_id=0, pad_token_id=0, bos_token_id=None)
    model = AutoModelForCausalLM.from_config(config)
    if not args.smoke:
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters())


def llm_overrides(run_dir: Path, probe: Path, folder: Path, head: str, args: argparse.Namespace) -> list[str]:
    return ["experiment=llm_lora", f"model.backbone={folder}", f"model.head={head}", "model.lora.r=16",
            f"data.synthetic_rows={args.llm_rows}", f"data.max_length={args.llm_max_length}",
            f"data.batch_size={args.llm_batch_size}", "data.eval_batch_size=16", "trainer.accumulate_grad_batches=1",
            f"trainer.limit_train_batches={args.llm_steps}", "trainer.max_epochs=1",
            f"trainer.accelerator={args.accelerator}", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "report=false", f"hydra.run.dir={run_dir}",
            *probe_overrides(probe, args.device)]


def check(name: str, precision: str, devices: int, work: Path, args: argparse.Namespace,
          train_overrides: list[str] | None = None, predict_extra: tuple[str, ...] = ("batch_size=64",)) -> dict:
    run_dir, probe = work / name, work / f"{name}.stages.jsonl"
    probe.unlink(missing_ok=True)
    train = [sys.executable, "train.py", *(train_overrides or overrides(run_dir, probe, args)),
             f"trainer.precision={precision}", f"trainer.devices={devices}"] + (["trainer.strategy=ddp"] if devices > 1 else [])
    code, train_s = run(train, work / f"{name}.train.log")
    result: dict = {"run": name, "precision": precision, "devices": devices, "train_rc": code,
                    "train_wall_s": round(train_s, 1)}
    if code == 0:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        result.update({k: metrics.get(k) for k in ("val_log_loss", "val_log_loss_calibrated", "temperature",
                                                   "prior_log_loss", "oracle_log_loss", "gain_over_uniform",
                                                   "gain_over_prior", "warnings")})
        test_csv = work / "test.csv"
        if not test_csv.exists():
            generate(args.predict_rows, seed=123).frame.drop(
                columns=["winner_model_a", "winner_model_b", "winner_tie"], errors="ignore").to_csv(test_csv, index=False)
        predict = [sys.executable, "predict.py", f"ckpt_path={run_dir}/checkpoints/best.ckpt",
                   f"input_path={test_csv}", f"output_path={work / name}.submission.csv", *predict_extra,
                   f"trainer.accelerator={args.accelerator}", "trainer.devices=1", f"trainer.precision={precision}",
                   "trainer.enable_progress_bar=false", *probe_overrides(probe, args.device)]
        code, predict_s = run(predict, work / f"{name}.predict.log")
        result.update(predict_rc=code, predict_wall_s=round(predict_s, 1))
        trainable = [line for line in (work / f"{name}.train.log").read_text().splitlines() if "LoRA: " in line]
        if trainable:  # LoRA runs: the trainable share printed at the start
            result["lora"] = trainable[0].split("LoRA: ", 1)[1].strip()
    stages = [json.loads(line) for line in probe.read_text().splitlines()] if probe.exists() else []
    result["stages"] = stages
    result["ok"] = bool(result["train_rc"] == 0 and result.get("predict_rc") == 0
                        and all(s["devices"] == [args.device] for s in stages)
                        and {s["stage"] for s in stages} >= {"fit", "validate", "predict"})
    return result


def table(results: list[dict]) -> str:
    lines = ["| run | precision | GPUs | stage | seconds | tokens/s | peak GPU GiB | non-finite losses | on GPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for s in r["stages"]:
            lines.append(f"| {r['run']} | {r['precision']} | {r['devices']} | {s['stage']} | {s['seconds']} | "
                         f"{s['tokens_per_s']:,.0f} | {s['peak_memory_gib']} | {s['non_finite_losses']} | "
                         f"{s['devices'] == ['cuda']} |")
    lines += ["", "| run | val log loss | calibrated | T | prior | oracle | train wall s | predict wall s | ok |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
        lines.append(f"| {r['run']} | {fmt(r.get('val_log_loss'))} | {fmt(r.get('val_log_loss_calibrated'))} | "
                     f"{fmt(r.get('temperature'))} | {fmt(r.get('prior_log_loss'))} | {fmt(r.get('oracle_log_loss'))} | "
                     f"{r['train_wall_s']} | {r.get('predict_wall_s', '-')} | {r['ok']} |")
    return "\n".join(lines)


def merged(path: Path, machine: dict, results: list[dict]) -> dict:
    """The results file with this run's entries replacing those of the same name; earlier ones are kept."""
    old = json.loads(path.read_text()) if path.exists() else {}
    names = {r["run"] for r in results}
    kept = [r for r in old.get("results", []) if r["run"] not in names]
    return {"machine": {**old.get("machine", {}), **machine}, "results": kept + results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per training run")
    parser.add_argument("--rows", type=int, default=6000, help="synthetic rows (data.val_fraction of them held out)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--predict-rows", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=32000, help="offline BPE tokenizer size")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pref_lightning_gpu_check"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true",
                        help="the same commands on the CPU, tiny shape, fp32 (a check of this script)")
    parser.add_argument("--only", choices=("all", "deberta", "llm"), default="all",
                        help="llm: the decoder-LLM stages alone; deberta: those without them")
    parser.add_argument("--llm-steps", type=int, default=60, help="optimizer steps per decoder-LLM run")
    parser.add_argument("--llm-rows", type=int, default=1500, help="synthetic rows of the decoder-LLM runs")
    parser.add_argument("--llm-batch-size", type=int, default=8)
    parser.add_argument("--llm-max-length", type=int, default=1024)
    parser.add_argument("--llm-vocab-size", type=int, default=32000, help="offline byte-level BPE size")
    args = parser.parse_args()
    args.accelerator, args.device = ("cpu", "cpu") if args.smoke else ("gpu", "cuda")
    if args.smoke:
        plan = [("smoke", "32-true", 1)]
        n_gpus, bf16 = 0, False
        llm_precision = "32-true"
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check (exit 0)")
        return 0
    else:
        n_gpus, bf16 = torch.cuda.device_count(), torch.cuda.is_bf16_supported()
        plan = ([("bf16", "bf16-mixed", 1)] if bf16 else []) + [("fp16", "16-mixed", 1)]
        if n_gpus >= 2:
            plan.append(("ddp2", "bf16-mixed" if bf16 else "16-mixed", 2))
        llm_precision = "bf16-mixed" if bf16 else "16-mixed"
    if args.only == "llm":
        plan = []
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for name, precision, devices in plan:
        print(f"gpu_check: {name} ({precision}, {devices} GPU) ...", flush=True)
        results.append(check(name, precision, devices, args.work, args))
    machine = {"gpu": torch.cuda.get_device_name(0) if n_gpus else "none (--smoke)", "gpus": n_gpus, "bf16": bf16,
               "torch": torch.__version__}
    if plan:
        machine.update(steps=args.steps, rows=args.rows, batch_size=args.batch_size, max_length=args.max_length)
    if args.only != "deberta":
        started = time.perf_counter()
        folder, parameters = llm_folder(args.work, args)
        machine["llm"] = {"shape": "tiny (--smoke)" if args.smoke else "Qwen2-0.5B-shaped", "parameters": parameters,
                          "folder_s": round(time.perf_counter() - started, 1), "steps": args.llm_steps,
                          "rows": args.llm_rows, "batch_size": args.llm_batch_size, "max_length": args.llm_max_length,
                          "backbone_dtype": "auto (bf16 weights on CUDA)", "predict": "max_tokens=auto"}
        print(f"gpu_check: decoder LLM {folder.name} ({parameters / 1e6:,.0f}M parameters) ...", flush=True)
        for name, head in zip(LLM_RUNS, ("mlp", "verdict_tokens")):
            print(f"gpu_check: {name} (model.head={head}, LoRA, {llm_precision}) ...", flush=True)
            run_dir, probe = args.work / name, args.work / f"{name}.stages.jsonl"
            result = check(name, llm_precision, 1, args.work, args, llm_overrides(run_dir, probe, folder, head, args),
                           ("max_tokens=auto",))
            results.append({**result, "head": head})
    print(f"\n{machine}\n\n{table(results)}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(merged(args.results, machine, results), indent=2) + "\n")
    failed = [r["run"] for r in results if not r["ok"]]
    if failed:
        print(f"gpu_check: FAILED {failed}; logs in {args.work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
