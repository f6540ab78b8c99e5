"""Tokenizer training with LLaMA's settings and Meta's wrapper shape."""

import pytest

from data_helpers import TOKENIZER_VOCAB, train_small_tokenizer, write_text_corpus
from llama_dist.cli import main as cli_main
from llama_dist.errors import UserError
from llama_dist.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(train_small_tokenizer(tmp_path_factory.mktemp("tok")))


def test_meta_shape_and_special_ids(tok):
    assert tok.n_words == TOKENIZER_VOCAB
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)
    assert [tok.sp_model.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    ids = tok.encode("the cat sat", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert tok.encode("the cat sat", bos=False, eos=False) == ids[1:-1]


@pytest.mark.parametrize("text", [
    "the cat sat on the mat",
    "def f(self):\n        return value  # indented\n",
    "numbers 12345 and 007",
    "unseen characters: 龍, ж, 🙂 and tabs\tand  double  spaces",
])
def test_round_trip_is_lossless(tok, text):
    ids = tok.encode(text, bos=True, eos=True)
    assert 0 not in ids  # byte fallback: nothing is ever unknown
    assert tok.decode(ids) == text


def test_digits_are_split_one_by_one(tok):
    pieces = [tok.sp_model.id_to_piece(i) for i in tok.encode("cat 98765", bos=False, eos=False)]
    digits = [p.lstrip("▁") for p in pieces if any(c.isdigit() for c in p)]
    assert digits == ["9", "8", "7", "6", "5"]


def test_unseen_character_falls_back_to_bytes(tok):
    pieces = [tok.sp_model.id_to_piece(i) for i in tok.encode("龍", bos=False, eos=False)]
    assert [p for p in pieces if p.startswith("<0x")] == [f"<0x{b:02X}>" for b in "龍".encode()]


def test_training_is_quiet_and_reproducible(tmp_path, capfd):
    corpus = tmp_path / "c"
    write_text_corpus(corpus, 100)
    first = train_tokenizer([str(corpus)], 300, tmp_path / "a", progress=False)
    second = train_tokenizer([str(corpus)], 300, tmp_path / "b", progress=False)
    out, err = capfd.readouterr()
    assert len((out + err).splitlines()) < 5  # sentencepiece would print hundreds of lines
    assert first.read_bytes() == second.read_bytes()
    assert first == tmp_path / "a" / "tokenizer.model"
    assert not list(tmp_path.glob("a/*.tmp"))


def test_cli_trains_and_reports_one_line_errors(tmp_path, capsys):
    corpus = tmp_path / "c"
    write_text_corpus(corpus, 60)
    assert cli_main(["tokenizer", "--input", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "t"),
                     "--max-bytes", "2k"]) == 0
    assert Tokenizer(tmp_path / "t" / "tokenizer.model").n_words == 300
    assert "tokenizer: 300 tokens" in capsys.readouterr().out

    assert cli_main(["tokenizer", "--input", str(tmp_path / "nope"), "--vocab-size", "300",
                     "--out", str(tmp_path / "t2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("vocab, message", [(100, "too small"), (100_000, "Vocabulary size too high")])
def test_impossible_vocab_sizes(tmp_path, vocab, message):
    corpus = tmp_path / "c"
    write_text_corpus(corpus, 20)
    with pytest.raises(UserError, match=message) as err:
        train_tokenizer([str(corpus)], vocab, tmp_path / "t", progress=False)
    assert "\n" not in str(err.value)


def test_missing_model_file(tmp_path):
    with pytest.raises(UserError, match="llama-dist tokenizer"):
        Tokenizer(tmp_path / "tokenizer.model")
