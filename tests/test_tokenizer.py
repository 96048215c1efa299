"""Tokenizer: GPT-2's vocabulary from local files, verified by hash, identical to tiktoken's."""

import shutil

import pytest

from raygpt import tokenizer
from raygpt.errors import RaygptError


def test_round_trip_and_special_token():
    text = "Hello, world! Ünïcödé and  spaces\n\n<|endoftext|>next"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.EOT_ID) == 1
    assert tokenizer.encode("Hello world") == [15496, 995]  # GPT-2's ids
    assert tokenizer.get_tokenizer().n_vocab == 50257


def test_bpe_dir_override_is_verified(tmp_path, monkeypatch):
    packaged = tokenizer._packaged_bpe_dir()
    shutil.copy(packaged / "vocab.bpe", tmp_path / "vocab.bpe")
    (tmp_path / "encoder.json").write_text("{}")
    with pytest.raises(RaygptError, match="encoder.json: sha256 .* is not GPT-2's"):
        tokenizer.get_tokenizer(str(tmp_path))
    shutil.copy(packaged / "encoder.json", tmp_path / "encoder.json")
    assert tokenizer.get_tokenizer(str(tmp_path)).encode("Hello world") == [15496, 995]
