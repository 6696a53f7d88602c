"""The encoding contract: one frozen object from the data side to the encoder, the cache key and the model."""

import pytest

from pref_lightning.core.errors import UserError
from pref_lightning.data.contract import STATS_FEATURES, EncodingSpec
from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.data.pairs import PairEncoder
from pref_lightning.model.module import PreferenceModule

from .conftest import TEST_TINY


def test_round_trip_through_plain_values():
    spec = EncodingSpec(layout="cross", max_length=64, n_classes=2, stats_norm={"mean": [0.0], "std": [1.0]})
    values = spec.to_dict()
    assert isinstance(values["stats_features"], list) and values["stats_features"] == list(STATS_FEATURES)
    assert EncodingSpec.from_dict(values) == spec
    assert spec.replace(max_length=128).max_length == 128 and spec.max_length == 64  # frozen: a copy
    with pytest.raises(AttributeError):
        spec.max_length = 3  # type: ignore[misc]


@pytest.mark.parametrize("values, key", [({"layout": "triple"}, "data.layout"), ({"max_length": 4}, "data.max_length"),
                                         ({"prompt_fraction": 1.5}, "data.prompt_fraction"),
                                         ({"n_classes": 4}, "data.n_classes"), ({"max_lenght": 64}, "max_lenght"),
                                         ({"stats_features": ["chars", "charm"]}, "charm"),
                                         ({"template": "verdict"}, "data.template")])
def test_bad_values_and_unknown_keys_are_one_line_errors(values, key):
    with pytest.raises(UserError, match=key):
        EncodingSpec.from_dict(values, where="data")


def test_the_cache_key_ignores_what_is_applied_after_tokenizing():
    spec = EncodingSpec(max_length=64)
    fitted = spec.replace(stats_norm={"mean": [1.0]}, n_classes=2)
    assert fitted.tokenization_key() == spec.tokenization_key()
    assert spec.replace(head_fraction=0.25).tokenization_key() != spec.tokenization_key()


def test_datamodule_encoder_and_model_share_one_spec(synthetic_csv, tiny_tokenizer):
    dm = PreferenceDataModule(train_path=str(synthetic_csv), max_length=32, layout="cross", batch_size=8)
    assert dm.encoding == EncodingSpec(max_length=32, layout="cross")
    with pytest.raises(RuntimeError, match="before the statistics' normalisation is fitted"):
        dm.spec  # noqa: B018 (a model built now would fail only at prediction)
    with pytest.raises(UserError, match="max_lenght"):  # a misspelt data key is named, not swallowed
        PreferenceDataModule(train_path=str(synthetic_csv), max_lenght=32)
    assert dm.fit_spec(tiny_tokenizer) is dm.spec
    assert dm.spec.stats_norm is not None and isinstance(dm.encoder, PairEncoder) and dm.encoder.max_length == 32
    model = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tiny_tokenizer), head_hidden=16,
                             spec=dm.spec, swap_augment="none", tta_swap=False)
    # the constructor argument is what hparams (and so every checkpoint) carry, as plain values
    assert model.hparams.spec == dm.spec.to_dict() and model.spec == dm.spec and model.is_cross
    batch = next(iter(dm.val_dataloader()))
    assert model(batch).shape == (len(batch["labels"]), 3)
    assert model.head.stats_size == dm.spec.n_stats
