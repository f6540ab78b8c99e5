"""SRC specs to documents: every input kind, the caps, and the one-line errors."""

import gzip
import io
import json
import random
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

from llama_dist import shards, sources
from llama_dist.errors import UserError
from llama_dist.sources import Corpus, parse_size


def docs(specs, **kw):
    return list(Corpus([str(s) for s in specs], **kw).documents())


def test_plain_text_file_is_one_document(tmp_path):
    text = "first line\n\n  indented ünïcode\nlast"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    assert docs([tmp_path / "a.txt"]) == [text]


def test_endoftext_lines_separate_documents(tmp_path):
    stories = ["Once upon a time.\nThe end.\n", "Another story.\n", "Last one, no newline"]
    (tmp_path / "s.txt").write_text("<|endoftext|>\n".join(stories))
    assert docs([tmp_path / "s.txt"]) == stories


def test_long_text_is_cut_at_line_ends_and_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DOC_CHUNK_BYTES", 50)
    lines = [f"line {i} " + "é" * (i % 7) + "\n" for i in range(200)]
    path = tmp_path / "big.txt"
    path.write_text("".join(lines), encoding="utf-8")
    corpus = Corpus([str(path)])
    pieces = list(corpus.documents())
    assert len(pieces) > 10
    assert "".join(pieces) == "".join(lines)
    assert all(p.endswith("\n") for p in pieces)  # never cut inside a line
    assert corpus.stats.bytes == path.stat().st_size


def test_jsonl_text_field_and_custom_field(tmp_path):
    rows = [{"text": "alpha", "id": 1}, {"text": "beta"}, {"text": ""}, {"text": "gamma"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert docs([path]) == ["alpha", "beta", "gamma"]  # empty documents are skipped
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "delta"}) + "\n")
    assert docs([tmp_path / "c.jsonl"], text_field="content") == ["delta"]


def test_json_array_uses_the_story_field(tmp_path):
    items = [{"story": "s1", "summary": "x"}, {"story": "s2"}]
    (tmp_path / "data00.json").write_text(json.dumps(items))
    assert docs([tmp_path / "data00.json"]) == ["s1", "s2"]


def test_gzip_files_are_read_transparently(tmp_path):
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    assert docs([tmp_path / "d.jsonl.gz"]) == ["zipped"]


def test_directory_is_recursive_sorted_and_keeps_text_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "1.md").write_text("one")
    (tmp_path / "3.jsonl").write_text(json.dumps({"text": "three"}) + "\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden.txt").write_text("hidden")
    assert docs([tmp_path]) == ["one", "three", "two"]


def test_glob_and_duplicates(tmp_path):
    for name in ("x1.txt", "x2.txt", "y.txt"):
        (tmp_path / name).write_text(name)
    assert docs([tmp_path / "x*.txt", tmp_path / "x1.txt"]) == ["x1.txt", "x2.txt"]


def test_a_glob_leaves_out_what_prepare_wrote(tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "corpus" / "tokens"
    out.mkdir(parents=True)
    (corpus / "a.txt").write_text("a text")
    (out / "notes.txt").write_text("a text file of the user's beside the shards")
    for name in ("train-00000-0123abcd.bin", "val-00000-0123abcd.bin.tmp", "tokenizer.model",
                 shards.PROGRESS_FILE):
        (out / name).write_bytes(b"\x00\x01binary")
    (out / shards.MANIFEST).write_text(json.dumps({"format": shards.MANIFEST_FORMAT, "files": []}))
    assert docs([f"{corpus}/**"]) == ["a text", "a text file of the user's beside the shards"]
    with pytest.raises(UserError, match=r"no files match the glob '.*\*\.bin' but prepare's own outputs"):
        sources.resolve([f"{out}/*.bin"])
    # the same names in a directory prepare did not write are read like any other match
    (out / shards.MANIFEST).write_text(json.dumps({"not": "ours"}))
    (out / shards.PROGRESS_FILE).unlink()
    assert [p.name for p in sources.resolve([f"{out}/*.bin"])] == ["train-00000-0123abcd.bin"]


def test_stdlib_is_the_running_pythons_library():
    files = sources.stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    names = {f.relative_to(root).as_posix() for f in files}
    assert {"os.py", "json/__init__.py", "asyncio/events.py"} <= names
    assert not any(n.startswith(("site-packages/", "test/")) or "/tests/" in n for n in names)
    first_text = next(t for t in (f.read_text(encoding="utf-8") for f in files) if t.strip())
    assert docs(["stdlib"], max_bytes=1) == [first_text]


def test_max_bytes_takes_a_prefix(tmp_path):
    for i in range(10):
        (tmp_path / f"{i}.txt").write_text(f"document {i} " * 10)  # 110 bytes each
    corpus = Corpus([str(tmp_path)], max_bytes=300)
    taken = list(corpus.documents())
    assert taken == docs([tmp_path])[:3]  # whole documents, until at least 300 bytes were read
    assert corpus.stats.bytes == 330


def _write_tinystories_archive(path: Path, shards: list[list[dict]]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for i, items in enumerate(shards):
            data = json.dumps(items).encode()
            info = tarfile.TarInfo(f"data{i:02d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tinystories_downloads_unpacks_and_caches(tmp_path, monkeypatch):
    archive = tmp_path / "TinyStories_all_data.tar.gz"
    _write_tinystories_archive(archive, [[{"story": "Tom had a dog."}, {"story": "The sun was hot."}],
                                         [{"story": "Lily ran home."}]])
    monkeypatch.setenv("LLAMA_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLAMA_DIST_TINYSTORIES_URL", archive.as_uri())
    assert docs(["tinystories"]) == ["Tom had a dog.", "The sun was hot.", "Lily ran home."]
    # the second time the cache answers: the URL may be gone
    monkeypatch.setenv("LLAMA_DIST_TINYSTORIES_URL", (tmp_path / "gone.tar.gz").as_uri())
    assert len(docs(["tinystories"])) == 3


def test_tinystories_offline_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLAMA_DIST_TINYSTORIES_URL", (tmp_path / "missing.tar.gz").as_uri())
    with pytest.raises(UserError, match="could not download") as err:
        docs(["tinystories"])
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache").rglob("*.part"))


@pytest.mark.parametrize("setup, spec, message", [
    (None, "nope.txt", "does not exist"),
    (None, "nope/*.txt", "no files match"),
    ("empty_dir", "d", "no text files"),
    ("empty_file", "e.txt", "corpus is empty"),
    ("no_field", "f.jsonl", r"f.jsonl line 2: no 'text' field \(fields: body\); pass --text-field"),
    ("bad_json", "g.jsonl", "g.jsonl line 1: not valid JSON"),
    ("not_array", "h.json", "expected a JSON array"),
])
def test_bad_input_is_a_one_line_user_error(tmp_path, monkeypatch, setup, spec, message):
    monkeypatch.chdir(tmp_path)
    if setup == "empty_dir":
        Path("d").mkdir()
        Path("d/x.bin").write_bytes(b"\0")
    elif setup == "empty_file":
        Path("e.txt").write_text("  \n\n")
    elif setup == "no_field":
        Path("f.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    elif setup == "bad_json":
        Path("g.jsonl").write_text("{not json\n")
    elif setup == "not_array":
        Path("h.json").write_text(json.dumps({"story": "x"}))
    with pytest.raises(UserError, match=message) as err:
        docs([spec])
    assert "\n" not in str(err.value)


def test_undecodable_bytes_are_counted_not_fatal(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok\n\xff\xfe tail \xc3\xa9\n")
    corpus = Corpus([str(tmp_path / "bad.txt")])
    (text,) = corpus.documents()
    assert text == "caf\ufffd ok\n\ufffd\ufffd tail é\n"
    assert corpus.stats.undecodable_bytes == 3
    assert "3 bytes" in corpus.stats.warning() and "bad.txt" in corpus.stats.warning()


@pytest.mark.parametrize("text, value", [("50M", 50 * 2**20), ("1.5k", 1536), ("2000", 2000), ("1GiB", 2**30)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_words():
    with pytest.raises(UserError, match="not a byte count"):
        parse_size("lots")


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e400", "1e308M"])
def test_parse_size_rejects_non_finite_sizes(text):
    with pytest.raises(UserError, match="not a byte count"):
        parse_size(text)


def _old_decode_counting(data: bytes) -> tuple[str, int]:
    """The quadratic original, as the reference for what the one-pass version must return."""
    bad, view = 0, memoryview(data)
    while True:
        try:
            bytes(view).decode("utf-8")
            break
        except UnicodeDecodeError as err:
            bad += err.end - err.start
            view = view[err.end:]
    return data.decode("utf-8", errors="replace"), bad


def test_decode_counting_matches_replace_and_counts_every_bad_byte():
    rng = random.Random(0)
    samples = [b"", b"plain", "ünï €".encode(), b"\xff", b"\xe2\x82", b"a\xe2\x82b\xf0\x9f\x99", b"\xc3\xa9\x80\x80"]
    alphabet = [b"a", b" ", b"\n", "é".encode(), "€".encode(), "🙂".encode(), b"\xff", b"\x80", b"\xe2\x82", b"\xf0\x9f"]
    samples += [b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for data in samples:
        assert sources.decode_counting(data) == _old_decode_counting(data), data


def test_decode_counting_is_one_pass_on_a_mostly_bad_file():
    """Latin-1 text, 5% accents: the old version decoded the rest of the MiB again after each one."""
    rng = random.Random(1)
    text = "".join("é" if rng.random() < 0.05 else rng.choice("abcdefghij klmnop\n") for _ in range(1 << 20))
    data = text.encode("latin-1")
    decodes = [0]

    def profile(frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", "") == "decode":
            decodes[0] += 1  # (keeping arg would keep the bytes it is bound to)

    sys.setprofile(profile)
    try:
        decoded, bad = sources.decode_counting(data)
    finally:
        sys.setprofile(None)
    assert bad == text.count("é") > 40_000 and decoded == text.replace("é", "\ufffd")
    assert decodes[0] <= 2  # not one per bad byte


def test_text_without_line_ends_is_cut_into_bounded_documents(tmp_path):
    """CR-only line breaks (old Mac text) or none at all: documents stay near DOC_CHUNK_BYTES."""
    path = tmp_path / "cr.txt"
    text = ("abcd efgh\r" * (3 * sources.DOC_CHUNK_BYTES // 10 + 7))
    path.write_bytes(text.encode())
    corpus = Corpus([str(path)])
    pieces = list(corpus.documents())
    assert "".join(pieces) == text and corpus.stats.bytes == path.stat().st_size
    assert len(pieces) >= 3 and max(len(p.encode()) for p in pieces) <= sources.DOC_CHUNK_BYTES
    assert all(p.endswith("\r") for p in pieces[:-1])  # cut at the line breaks there are


def test_long_lines_are_cut_at_spaces_else_between_characters(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DOC_CHUNK_BYTES", 50)
    words = tmp_path / "words.txt"  # the cut falls before a marker inside a long line: not a marker
    words.write_text("a" * 45 + " <|endoftext|>\nnext line " + "word " * 40, encoding="utf-8")
    solid = tmp_path / "solid.txt"  # no whitespace: multi-byte characters must not be split
    solid.write_text("é€🙂x" * 100, encoding="utf-8")
    for path in (words, solid):
        corpus = Corpus([str(path)])
        pieces = list(corpus.documents())
        assert "".join(pieces) == path.read_text(encoding="utf-8")
        assert len(pieces) > 3 and max(len(p.encode()) for p in pieces) <= 50
        assert corpus.stats.undecodable_bytes == 0


def _prepared_dir(directory: Path, finished: bool) -> None:
    """What `llama-dist prepare` leaves: a manifest when finished, a progress file before."""
    directory.mkdir()
    if finished:
        (directory / "manifest.json").write_text(json.dumps({"format": "llama_dist.tokens", "shards": []}))
    else:
        (directory / "prepare.progress.json").write_text(json.dumps({"documents": 0, "shards": []}))
    (directory / "notes.txt").write_text("prepare output, not corpus")


def test_directories_skip_prepare_outputs_inside_them(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    _prepared_dir(tmp_path / "tokens", finished=True)
    _prepared_dir(tmp_path / "half", finished=False)
    (tmp_path / "data").mkdir()  # a user's own manifest.json is corpus like any other .json
    (tmp_path / "data" / "manifest.json").write_text(json.dumps([{"text": "two"}]))
    assert docs([tmp_path]) == ["one", "two"]
    _prepared_dir(tmp_path / "out", finished=True)  # --out naming the input directory itself
    (tmp_path / "out" / "b.txt").write_text("three")
    assert docs([tmp_path / "out"]) == ["three", "prepare output, not corpus"]
