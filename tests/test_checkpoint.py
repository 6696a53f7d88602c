"""Checkpoint files: format version checked on load, older formats converted, payload contents."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from pref_lightning.core.errors import UserError
from pref_lightning.data.contract import EncodingSpec
from pref_lightning.model.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_KEY, load_checkpoint
from pref_lightning.model.module import PreferenceModule
from pref_lightning.predict.prediction import predict

DATA = Path(__file__).parent / "data"
FORMAT1 = DATA / "format1_tiny.ckpt"


def predict_cfg(ckpt: Path, input_path: Path, output: Path):
    return OmegaConf.create({"ckpt_path": str(ckpt), "input_path": str(input_path), "output_path": str(output),
                             "batch_size": 4, "max_length": None, "tta_swap": None, "calibrate": True,
                             "input_format": None, "submission_format": None, "cache_dir": None,
                             "trainer": {"_target_": "lightning.Trainer", "accelerator": "cpu", "devices": 1,
                                         "logger": False, "enable_progress_bar": False,
                                         "enable_model_summary": False}})


def test_a_format_1_checkpoint_is_converted_on_load():
    checkpoint = load_checkpoint(FORMAT1)
    assert checkpoint[CHECKPOINT_KEY]["format"] == CHECKPOINT_FORMAT
    hparams = checkpoint["hyper_parameters"]
    assert "layout" not in hparams and "n_classes" not in hparams and "data_settings" not in checkpoint[CHECKPOINT_KEY]
    spec = EncodingSpec.from_dict(hparams["spec"])
    assert (spec.max_length, spec.layout, spec.n_classes) == (48, "siamese", 3) and spec.stats_norm["version"] == 2
    assert len(hparams["train_prior"]) == 3 and "prior_log_loss" in hparams["reference"]


def test_a_format_1_checkpoint_predicts_what_it_predicted_when_it_was_written(tmp_path):
    output = tmp_path / "submission.csv"
    predict(predict_cfg(FORMAT1, DATA / "format1_input.csv", output))
    got, expected = pd.read_csv(output, dtype={"id": str}), pd.read_csv(DATA / "format1_expected.csv", dtype={"id": str})
    assert got["id"].tolist() == expected["id"].tolist()
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:].to_numpy(), atol=1e-5)


def test_a_checkpoint_is_rewritten_in_the_current_format(tmp_path):
    model, _, spec = PreferenceModule.from_checkpoint(str(FORMAT1))
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint[CHECKPOINT_KEY]["format"] == CHECKPOINT_FORMAT
    assert set(checkpoint[CHECKPOINT_KEY]) == {"format", "backbone_config", "tokenizer_files", "temperature"}
    torch.save(checkpoint, tmp_path / "v2.ckpt")
    again, _, spec_again = PreferenceModule.from_checkpoint(str(tmp_path / "v2.ckpt"))
    assert spec_again == spec and again.train_prior == model.train_prior and again.temperature == model.temperature


@pytest.mark.parametrize("version", [0, 99, None])
def test_an_unknown_format_names_the_file_its_version_and_the_supported_ones(tmp_path, version):
    checkpoint = torch.load(FORMAT1, map_location="cpu", weights_only=True)
    checkpoint[CHECKPOINT_KEY]["format"] = version
    path = tmp_path / "future.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match=rf"{path}: checkpoint format {version!r} is not supported .* reads formats 1, 2"):
        PreferenceModule.from_checkpoint(str(path))
