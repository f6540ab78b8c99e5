"""Tokenizer training with LLaMA's settings and Meta's wrapper shape."""

import json

import pytest

from data_helpers import TOKENIZER_VOCAB, make_documents, train_small_tokenizer, write_text_corpus
from llama_dist import tokenizer as tokenizer_mod
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


def test_a_corpus_error_during_training_comes_back_as_raised(tmp_path):
    """Not inside sentencepiece's INTERNAL error, with a stack fragment after it."""
    documents = make_documents(300)
    lines = [json.dumps({"text": d}) + "\n" for d in documents]
    (tmp_path / "a.jsonl").write_text("".join(lines[:250]) + "{not json\n" + "".join(lines[250:]))
    with pytest.raises(UserError) as err:
        train_tokenizer([str(tmp_path / "a.jsonl")], 300, tmp_path / "t", progress=False, num_threads=1)
    assert str(err.value).startswith(f"{tmp_path / 'a.jsonl'} line 251: not valid JSON")
    assert "\n" not in str(err.value) and "INTERNAL" not in str(err.value)
    assert not (tmp_path / "t" / "tokenizer.model").exists()


def test_lines_all_too_long_for_sentencepiece_are_named(tmp_path):
    (tmp_path / "long.txt").write_text(("word " * 1000 + "\n") * 20)  # 5000-byte lines
    with pytest.raises(UserError, match="every line of the corpus is longer than 4192 bytes") as err:
        train_tokenizer([str(tmp_path / "long.txt")], 300, tmp_path / "t", progress=False, num_threads=1)
    assert "\n" not in str(err.value)


def test_a_bare_sentencepiece_check_keeps_its_condition(tmp_path, monkeypatch):
    def failing_train(**kwargs):
        list(kwargs["sentence_iterator"])
        raise RuntimeError("INTERNAL: src/trainer_interface.cc(467) [!sentences_.empty()] ")

    monkeypatch.setattr(tokenizer_mod.SentencePieceTrainer, "train", failing_train)
    write_text_corpus(tmp_path / "c", 10)
    with pytest.raises(UserError, match=r"vocabulary: INTERNAL: .*\[!sentences_.empty\(\)\]$"):
        train_tokenizer([str(tmp_path / "c")], 300, tmp_path / "t", progress=False)


def test_out_naming_a_file_is_a_one_line_error(tmp_path, capsys):
    write_text_corpus(tmp_path / "c", 10)
    (tmp_path / "f").write_text("mine")
    for out, message in [(tmp_path / "f", "is a file; give a directory"),
                         (tmp_path / "f" / "sub", "lies under a file")]:
        assert cli_main(["tokenizer", "--input", str(tmp_path / "c"), "--vocab-size", "300", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert (tmp_path / "f").read_text() == "mine"


def test_llama3s_tiktoken_file_is_named_as_such(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("IQ== 0\nIg== 1\nIw== 2\n")  # Llama 3's format: a base64 token and its rank a line
    assert tokenizer_mod.tiktoken_base_size(path) == 3
    with pytest.raises(UserError, match=r"is Llama 3's tiktoken tokenizer, and llama_dist reads sentencepiece "
                                        r"models only; export the checkpoint \(llama-dist export-hf\)"):
        Tokenizer(path)
    path.write_text("IQ== 0\nnot a rank\n")
    assert tokenizer_mod.tiktoken_base_size(path) is None
    with pytest.raises(UserError, match="is not a sentencepiece model"):
        Tokenizer(path)
