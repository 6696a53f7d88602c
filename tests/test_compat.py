"""Settings that contradict the backbone are refused before any data is read (issue 10, part 3)."""

import pytest
from transformers import BertConfig, DebertaV2Config, LlamaConfig, RobertaConfig

from pref_lightning.model.compat import check_max_length, check_vocabulary, position_limit

from . import warm


def test_position_limits_of_absolute_relative_and_rotary_families():
    assert position_limit(BertConfig(max_position_embeddings=512)) == 512
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert position_limit(DebertaV2Config(position_biased_input=False)) is None  # DeBERTa-v3: relative
    assert position_limit(DebertaV2Config(position_biased_input=True, max_position_embeddings=512)) == 512
    assert position_limit(LlamaConfig()) is None  # rotary: no hard table


def test_max_length_over_the_limit_is_one_line_naming_key_value_and_limit():
    with pytest.raises(ValueError) as err:
        check_max_length(BertConfig(max_position_embeddings=512), 1024, backbone="minilm")
    message = str(err.value)
    assert "\n" not in message and "data.max_length=1024" in message and "512" in message and "minilm" in message
    check_max_length(BertConfig(max_position_embeddings=512), 512)  # at the limit: fine


def test_tokenizer_larger_than_the_embedding_is_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the backbone .* embeds only 10"):
        check_vocabulary(BertConfig(vocab_size=10), tiny_tokenizer, backbone="x")
    check_vocabulary(BertConfig(vocab_size=len(tiny_tokenizer)), tiny_tokenizer)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tiny_tokenizer):
    """A local BERT-family folder (absolute positions, 64 of them), as MiniLM is laid out."""
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_train_refuses_before_reading_any_data(bert_dir, tmp_path):
    """The training file does not exist: the error must be the max-length one, so no data was read."""
    import sys

    from .conftest import REPO

    run = warm.run([sys.executable, "train.py", "data=kaggle", f"model.backbone={bert_dir}",
                    f"data.train_path={tmp_path / 'missing.csv'}", "data.max_length=128",
                    f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, timeout=300)
    assert run.returncode != 0
    assert "data.max_length=128 exceeds the backbone's limit" in run.stderr and "64 absolute positions" in run.stderr
    assert "FileNotFoundError" not in run.stderr and "does not exist" not in run.stderr
