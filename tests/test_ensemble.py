"""predict.py ensembles: checkpoints and run folders, weights, probability vs logit averaging, offline."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from pref_lightning.core.metrics import softmax
from pref_lightning.data.records import ORACLE_COLUMNS
from pref_lightning.predict.ensemble import checkpoint_paths, combine, ensemble_weights

from .test_end_to_end import FAST, check_submission, run

LOGITS = [np.array([[2.0, 0.0, -1.0], [0.0, 0.5, 0.1]]), np.array([[-1.0, 1.0, 0.0], [3.0, -2.0, 0.0]])]


# ---- pure functions -------------------------------------------------------------------------------
def make_run_folder(path):
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "best.ckpt").write_bytes(b"x")
    return path


def test_checkpoint_paths_accepts_files_run_folders_and_lists(tmp_path):
    run_dir = make_run_folder(tmp_path / "run")
    ckpt = tmp_path / "other.ckpt"
    ckpt.write_bytes(b"x")
    assert checkpoint_paths(str(ckpt)) == [ckpt]
    assert checkpoint_paths(str(run_dir)) == [run_dir / "checkpoints" / "best.ckpt"]
    assert checkpoint_paths([str(ckpt), run_dir]) == [ckpt, run_dir / "checkpoints" / "best.ckpt"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint_paths([str(ckpt), str(tmp_path / "missing.ckpt")])
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        checkpoint_paths(str(tmp_path))
    with pytest.raises(ValueError, match="empty"):
        checkpoint_paths([])


def test_ensemble_weights():
    assert ensemble_weights(None, 4).tolist() == [0.25] * 4
    assert np.allclose(ensemble_weights([3, 1], 2), [0.75, 0.25])
    with pytest.raises(ValueError, match="2 entries for 3"):
        ensemble_weights([1, 1], 3)
    for bad in ([1, -1], [0, 0], [1, float("nan")]):
        with pytest.raises(ValueError, match="non-negative"):
            ensemble_weights(bad, 2)


def test_combine_probabilities_and_logits():
    weights = np.array([0.75, 0.25])
    probs = combine(LOGITS, weights, "probs")
    assert np.allclose(probs, 0.75 * softmax(LOGITS[0]) + 0.25 * softmax(LOGITS[1]), atol=1e-12)
    by_logits = combine(LOGITS, weights, "logits")
    assert np.allclose(by_logits, softmax(0.75 * LOGITS[0] + 0.25 * LOGITS[1]), atol=1e-12)
    assert np.allclose(probs.sum(1), 1) and np.allclose(by_logits.sum(1), 1)
    assert np.abs(probs - by_logits).max() > 1e-3
    # one model: its own probabilities, whatever the mode
    assert np.array_equal(combine(LOGITS[:1], np.ones(1)), softmax(LOGITS[0]))
    assert np.allclose(combine(LOGITS[:1], np.ones(1), "logits"), softmax(LOGITS[0]))
    with pytest.raises(ValueError, match="ensemble_mode"):
        combine(LOGITS, weights, "median")


# ---- predict.py with two tiny trained models -----------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    run("train.py", "seed=1", "data.synthetic_rows=300", f"hydra.run.dir={root}/a", *FAST)
    # the second run keeps the default Rich progress bar (and the default CSV + TensorBoard loggers)
    fast_with_bar = [o for o in FAST if not o.startswith("trainer.enable_progress_bar")]
    run("train.py", "seed=2", "data.synthetic_rows=300", "model.tta_swap=false", f"hydra.run.dir={root}/b",
        *fast_with_bar)
    assert (root / "b" / "report.md").is_file() and any((root / "b" / "tensorboard").glob("events.*"))
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def labelled_test(tmp_path_factory, synthetic_frame):
    path = tmp_path_factory.mktemp("ens_data") / "test.csv"
    frame = synthetic_frame.drop(columns=list(ORACLE_COLUMNS)).iloc[:90]
    frame.to_csv(path, index=False)
    return path, frame["id"].astype(str).tolist()


def predict(tmp_path, name, ckpt, test_path, *extra, env=None):
    output = tmp_path / f"{name}.csv"
    out = run("predict.py", f"ckpt_path={ckpt}", f"input_path={test_path}", f"output_path={output}",
              f"hydra.run.dir={tmp_path}/{name}", "trainer.enable_progress_bar=false", "batch_size=16", *extra,
              env=env)
    return output, out


@pytest.fixture(scope="module")
def singles(two_runs, labelled_test, tmp_path_factory):
    """Each model's own submission (a checkpoint file, then a run folder, as single ckpt_path strings)."""
    tmp_path = tmp_path_factory.mktemp("singles")
    test_path, ids = labelled_test
    sub_a = check_submission(predict(tmp_path, "a", two_runs[0] / "checkpoints" / "best.ckpt", test_path)[0], ids)
    sub_b = check_submission(predict(tmp_path, "b", two_runs[1], test_path)[0], ids)
    assert np.abs(sub_a - sub_b).max() > 1e-3  # two different models
    return sub_a, sub_b


@pytest.mark.slow
def test_ensemble_averages_probabilities_with_weights_and_logits(two_runs, labelled_test, singles, tmp_path):
    run_a, run_b = two_runs
    test_path, ids = labelled_test
    sub_a, sub_b = singles
    members = f"[{run_a / 'checkpoints' / 'best.ckpt'},{run_b}]"  # a checkpoint file and a run folder
    path, out = predict(tmp_path, "mean", members, test_path)
    mean = check_submission(path, ids)
    assert np.abs(mean - (sub_a + sub_b) / 2).max() < 1e-6
    assert "ensemble of 2 checkpoints, probs averaged, weights [0.5, 0.5]" in out
    assert out.count("member ") == 2 and "input has labels: log loss" in out

    weighted = check_submission(predict(tmp_path, "w", members, test_path, "ckpt_weights=[3,1]")[0], ids)
    assert np.abs(weighted - (0.75 * sub_a + 0.25 * sub_b)).max() < 1e-6

    by_logits = check_submission(predict(tmp_path, "l", members, test_path, "ensemble_mode=logits")[0], ids)
    assert np.allclose(by_logits.sum(1), 1, atol=1e-6)
    assert np.abs(by_logits - mean).max() > 1e-5


@pytest.mark.slow
def test_ensemble_from_copied_run_folders_offline(two_runs, labelled_test, singles, tmp_path):
    """Run folders copied elsewhere predict with the originals gone and the hub unreachable."""
    test_path, ids = labelled_test
    copies = [shutil.copytree(src, tmp_path / "copies" / src.name) for src in two_runs]
    hidden = [src.rename(src.with_name(src.name + "_hidden")) for src in two_runs]
    try:
        offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        path, _ = predict(tmp_path, "copied", f"[{copies[0]},{copies[1]}]", test_path, env=offline)
    finally:
        for src, moved in zip(two_runs, hidden):
            moved.rename(src)
    assert np.abs(check_submission(path, ids) - (singles[0] + singles[1]) / 2).max() < 1e-6


@pytest.mark.slow
def test_ensemble_ddp_prediction_matches_single_process(two_runs, labelled_test, singles, tmp_path):
    test_path, ids = labelled_test
    ddp = check_submission(predict(tmp_path, "ddp", f"[{two_runs[0]},{two_runs[1]}]", test_path,
                                   "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp")[0], ids)
    # ranks batch (and so pad) rows differently; under bf16 autocast that moves probabilities a little
    assert np.abs(ddp - (singles[0] + singles[1]) / 2).max() < 5e-3


def test_each_member_is_released_before_the_next_loads(tmp_path, monkeypatch):
    # an ensemble of two LLM bases kept the first in memory (held by the Trainer) while the second loaded
    import gc
    import weakref

    from omegaconf import OmegaConf

    from pref_lightning.model.module import PreferenceModule
    from pref_lightning.predict.prediction import predict

    from .conftest import REPO

    ckpt, data = REPO / "tests" / "data" / "format1_tiny.ckpt", REPO / "tests" / "data" / "format1_input.csv"
    built, alive_when_next_loads = [], []
    load = PreferenceModule.from_checkpoint.__func__

    def tracked(cls, path, *args, **kwargs):
        gc.collect()
        alive_when_next_loads.extend(ref() is not None for ref in built)
        module, tokenizer, spec = load(cls, path, *args, **kwargs)
        built.append(weakref.ref(module))
        return module, tokenizer, spec

    monkeypatch.setattr(PreferenceModule, "from_checkpoint", classmethod(tracked))
    cfg = OmegaConf.create({"ckpt_path": [str(ckpt), str(ckpt)], "input_path": str(data),
                            "output_path": str(tmp_path / "sub.csv"), "batch_size": 4, "cache_dir": None,
                            "trainer": {"_target_": "lightning.Trainer", "accelerator": "cpu", "devices": 1,
                                        "logger": False, "enable_progress_bar": False, "enable_model_summary": False}})
    predict(cfg)
    assert len(built) == 2 and alive_when_next_loads == [False]
    assert len(pd.read_csv(tmp_path / "sub.csv")) == 12
