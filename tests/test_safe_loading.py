"""Safe loading and atomic outputs: no pickled code runs, no remote code, no half-written submission."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from pref_lightning.data import tokenizers
from pref_lightning.data.cache import PairCache, _meta, rows_key_fields
from pref_lightning.model import backbone
from pref_lightning.model.module import PreferenceModule

from .conftest import REPO
from .test_hostile import tiny_checkpoint


class Payload:
    """Unpickling this object would create a marker file: proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"pref_lightning": {"format": 1}, "state_dict": {}, "hyper_parameters": {},
                "evil": Payload(marker)}, tmp_path / "evil.ckpt")
    assert not marker.exists()
    with pytest.raises(ValueError, match="evil.ckpt: not a pref-lightning checkpoint .*safe loading") as info:
        PreferenceModule.from_checkpoint(str(tmp_path / "evil.ckpt"))
    assert "weights_only=False" not in str(info.value)  # never advise turning safe loading off
    assert not marker.exists()


def test_cache_file_with_a_pickled_object_is_rebuilt_not_loaded(tmp_path, caplog):
    marker = tmp_path / "pwned"
    cache = PairCache(tmp_path / "cache")
    fields = rows_key_fields("0" * 64, True)
    path = cache.rows_path(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.savez(handle, meta=_meta(fields), evil=np.array([Payload(marker)], dtype=object))
    assert cache.load_rows(fields) is None  # unreadable without pickle: treated as corrupt
    assert not marker.exists() and "unreadable" in caplog.text


def test_every_transformers_loader_gets_trust_remote_code_false(monkeypatch, tmp_path, tiny_tokenizer,
                                                                 local_backbone_dir):
    calls = []

    def spy(target, name):
        original = getattr(target, name)

        def wrapped(*args, **kwargs):
            calls.append((f"{target.__name__}.{name}", kwargs.get("trust_remote_code", "absent")))
            return original(*args, **kwargs)

        monkeypatch.setattr(target, name, wrapped)

    for target, names in ((backbone.AutoTokenizer, ["from_pretrained"]), (backbone.AutoModel, ["from_pretrained",
                          "from_config"]), (backbone.AutoConfig, ["from_pretrained"])):
        for name in names:
            spy(target, name)
    backbone.load_tokenizer(str(local_backbone_dir))
    model = backbone.build_backbone(str(local_backbone_dir))
    backbone.build_backbone("tiny", vocab_size=len(tiny_tokenizer))
    backbone.build_backbone("x", config_dict=model.config.to_dict())
    tokenizers.tokenizer_from_files(tokenizers.tokenizer_files(tiny_tokenizer))
    names = {name for name, _ in calls}
    assert names == {"AutoTokenizer.from_pretrained", "AutoModel.from_pretrained", "AutoModel.from_config",
                     "AutoConfig.from_pretrained"}
    assert all(value is False for _, value in calls), calls


def test_trust_remote_code_is_never_enabled_in_code_or_config():
    pattern = re.compile(r"trust_remote_code\s*[=:]\s*(True|true|1|yes)")
    files = [*REPO.glob("pref_lightning/*.py"), *REPO.glob("*.py"), *REPO.glob("benchmarks/*.py"),
             *REPO.glob("conf/**/*.yaml")]
    assert files
    offenders = [str(f) for f in files if pattern.search(f.read_text())]
    assert not offenders
    assert backbone.TRUST_REMOTE_CODE is False


def predict_cfg(ckpt, input_path, output_path):
    return OmegaConf.create({"ckpt_path": str(ckpt), "input_path": str(input_path), "output_path": str(output_path),
                             "batch_size": 4, "max_length": None, "tta_swap": None, "calibrate": True,
                             "input_format": None, "submission_format": None,
                             "trainer": {"_target_": "lightning.Trainer", "accelerator": "cpu", "devices": 1,
                                         "logger": False, "enable_progress_bar": False,
                                         "enable_model_summary": False}})


def test_failed_prediction_never_leaves_a_half_written_submission(tmp_path, tiny_tokenizer, monkeypatch):
    from pref_lightning.core import atomic
    from pref_lightning.predict import prediction

    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt", tiny_tokenizer)
    pd.DataFrame({"id": ["1", "2"], "prompt": ['["q"]'] * 2, "response_a": ['["a"]'] * 2,
                  "response_b": ['["b"]'] * 2}).to_csv(tmp_path / "test.csv", index=False)
    output = tmp_path / "out" / "submission.csv"
    prediction.predict(predict_cfg(ckpt, tmp_path / "test.csv", output))
    good = output.read_text()
    assert good.splitlines()[0] == "id,winner_model_a,winner_model_b,winner_tie"

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        prediction.predict(predict_cfg(ckpt, tmp_path / "test.csv", output))
    assert output.read_text() == good  # the previous submission is intact
    assert sorted(p.name for p in output.parent.iterdir()) == ["submission.csv"]  # no temporary left
