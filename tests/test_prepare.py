"""Pretokenization: every input kind against a single-process reference, atomicity, resume, reuse."""

import hashlib
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_helpers import make_documents, train_small_tokenizer, write_text_corpus
from llama_dist import prepare as prepare_mod
from llama_dist import shards
from llama_dist.cli import main as cli_main
from llama_dist.errors import UserError
from llama_dist.loader import TokenLoader
from llama_dist.prepare import prepare
from llama_dist.sources import Corpus, stdlib_files
from llama_dist.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def other_tok_path(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("tok2"), vocab_size=340, seed=1)


def split_stream(out_dir, split):
    manifest = shards.read_manifest(out_dir)
    parts = [shards.open_shard(out_dir / s["file"]) for s in manifest["shards"] if s["split"] == split]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def reference(tok_path, documents, val_fraction):
    """What prepare must write: bos + ids + eos per document, every round(1/f)-th one (from 1) to val."""
    tok = Tokenizer(tok_path)
    period = round(1 / val_fraction) if val_fraction else 0
    out = {"train": [], "val": []}
    for i, doc in enumerate(documents):
        out["val" if period and i % period == 1 else "train"] += tok.encode(doc, bos=True, eos=True)
    return {k: np.array(v, dtype=np.int64) for k, v in out.items()}


def assert_prepared_as(out_dir, tok_path, documents, val_fraction):
    expected = reference(tok_path, documents, val_fraction)
    for split in ("train", "val"):
        np.testing.assert_array_equal(split_stream(out_dir, split), expected[split])


def run(inputs, tok_path, out_dir, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return prepare([str(i) for i in inputs], tok_path, out_dir, **kw)


# --------------------------------------------------------------------------- input kinds


def test_text_files_match_the_reference_and_the_manifest_is_honest(tmp_path, tok_path):
    documents = write_text_corpus(tmp_path / "c", 40)
    manifest_path = run([tmp_path / "c"], tok_path, tmp_path / "out", val_fraction=0.1, shard_tokens=300)
    out = tmp_path / "out"
    assert manifest_path == out / "manifest.json"
    assert_prepared_as(out, tok_path, documents, 0.1)

    manifest = json.loads(manifest_path.read_text())
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(tok_path.read_bytes()).hexdigest()
    assert manifest["tokenizer"]["vocab_size"] == 320 and manifest["dtype"] == "uint16"
    assert (out / "tokenizer.model").read_bytes() == tok_path.read_bytes()  # the trainer finds it here
    assert len(manifest["shards"]) > 3
    for entry in manifest["shards"]:
        path = out / entry["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert shards.read_header(path).count == entry["tokens"]
        assert path.read_bytes()[:8] == b"LLDTOKNS"
    assert not list(out.glob("*.tmp")) and not (out / prepare_mod.PROGRESS_FILE).exists()


def test_jsonl_json_array_glob_and_stdlib(tmp_path, tok_path):
    documents = make_documents(30)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[:10]))
    (tmp_path / "data00.json").write_text(json.dumps([{"story": d} for d in documents[10:20]]))
    for i, d in enumerate(documents[20:]):
        (tmp_path / f"g{i}.txt").write_text(d)
    run([tmp_path / "d.jsonl", tmp_path / "data00.json", tmp_path / "g*.txt"], tok_path, tmp_path / "out",
        val_fraction=0.2)
    assert_prepared_as(tmp_path / "out", tok_path, documents, 0.2)

    run(["stdlib"], tok_path, tmp_path / "std", max_bytes=20_000, val_fraction=0)
    first = next(t for t in (f.read_text(encoding="utf-8") for f in stdlib_files()) if t.strip())
    train = split_stream(tmp_path / "std", "train")
    n = len(Tokenizer(tok_path).encode(first, bos=True, eos=True))
    assert Tokenizer(tok_path).decode(train[:n].tolist()) == first
    assert shards.read_manifest(tmp_path / "std")["bytes"] >= 20_000


def test_tinystories_offline_sample(tmp_path, tok_path, monkeypatch):
    stories = make_documents(12, seed=3)
    archive = tmp_path / "TinyStories_all_data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(2):
            data = json.dumps([{"story": s, "source": "GPT-4"} for s in stories[i * 6 : (i + 1) * 6]]).encode()
            info = tarfile.TarInfo(f"data{i:02d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("LLAMA_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLAMA_DIST_TINYSTORIES_URL", archive.as_uri())
    run(["tinystories"], tok_path, tmp_path / "out", val_fraction=0.25)
    assert_prepared_as(tmp_path / "out", tok_path, stories, 0.25)


def test_parallel_workers_write_identical_shards(tmp_path, tok_path, monkeypatch):
    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 500)  # many small tasks, so ordering matters
    documents = write_text_corpus(tmp_path / "c", 120)
    run([tmp_path / "c"], tok_path, tmp_path / "one", shard_tokens=700)
    run([tmp_path / "c"], tok_path, tmp_path / "two", shard_tokens=700, workers=2)
    one, two = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert one["shards"] == two["shards"]
    assert_prepared_as(tmp_path / "two", tok_path, documents, 0.01)


def test_read_ahead_is_bounded(tmp_path, tok_path, monkeypatch):
    """Memory stays flat: the reader never runs more than a few batches ahead of the writer."""
    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 200)  # two 150-char documents per batch
    (tmp_path / "c").mkdir()
    for i in range(200):
        (tmp_path / "c" / f"{i:04d}.txt").write_text(f"doc {i:04d} " + "the cat sat " * 12 + "on it\n")
    yielded, leads = [0], []
    real_documents, real_add = Corpus.documents, prepare_mod.ShardSink.add

    def counting_documents(self):
        for doc in real_documents(self):
            yielded[0] += 1
            yield doc

    def recording_add(self, lengths, flat):
        leads.append(yielded[0] - self.doc_index)
        real_add(self, lengths, flat)

    monkeypatch.setattr(Corpus, "documents", counting_documents)
    monkeypatch.setattr(prepare_mod.ShardSink, "add", recording_add)
    run([tmp_path / "c"], tok_path, tmp_path / "out", workers=2)
    assert len(leads) > 50
    assert max(leads) <= 2 * (2 * 2 + 1)  # 2 documents in each of the window's 4 batches + 1


# --------------------------------------------------------------------------- shard format


def test_uint32_shards_hold_ids_beyond_65535(tmp_path):
    assert shards.dtype_for_vocab(65536).name == "uint16"
    assert shards.dtype_for_vocab(65537).name == "uint32"
    ids = np.array([0, 1, 65535, 65536, 100_000, 128_255], dtype=np.int64)
    shards.write_shard(tmp_path / "s.bin", ids, shards.dtype_for_vocab(128_256))
    header = shards.read_header(tmp_path / "s.bin")
    assert header.dtype.name == "uint32" and header.count == len(ids)
    np.testing.assert_array_equal(shards.open_shard(tmp_path / "s.bin"), ids)
    raw = (tmp_path / "s.bin").read_bytes()
    assert len(raw) == 32 + 4 * len(ids) and int.from_bytes(raw[16:24], "little") == len(ids)


def test_ids_that_do_not_fit_are_refused_not_wrapped(tmp_path):
    with pytest.raises(ValueError, match="65536"):
        shards.write_shard(tmp_path / "s.bin", np.array([5, 65536]), np.dtype("uint16"))
    assert not list(tmp_path.iterdir())  # neither the shard nor its temporary file


# --------------------------------------------------------------------------- atomicity and reruns


def test_interrupted_prepare_leaves_nothing_complete_and_resumes_identically(tmp_path, tok_path, monkeypatch):
    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 300)
    write_text_corpus(tmp_path / "c", 100)
    kw = dict(shard_tokens=400, val_fraction=0.1)
    run([tmp_path / "c"], tok_path, tmp_path / "clean", **kw)

    real_write, calls = shards.ShardWriter.write, [0]

    def crashing_write(self, tokens):
        calls[0] += 1
        if calls[0] == 60:
            raise KeyboardInterrupt
        real_write(self, tokens)

    out = tmp_path / "out"
    monkeypatch.setattr(shards.ShardWriter, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        run([tmp_path / "c"], tok_path, out, **kw)
    monkeypatch.setattr(shards.ShardWriter, "write", real_write)

    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    assert kept  # some shards were finished before the crash
    with pytest.raises(UserError, match="unfinished prepare"):
        TokenLoader(str(out), "train", 8, 2, 0, 1)
    (out / "train-00042.bin.tmp").write_bytes(b"half a shard")  # what a kill -9 would leave

    run([tmp_path / "c"], tok_path, out, **kw)
    clean = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    resumed = json.loads((out / "manifest.json").read_text())
    assert resumed["shards"] == clean["shards"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin") if p.name in kept} == kept  # not redone
    assert not list(out.glob("*.tmp")) and not (out / prepare_mod.PROGRESS_FILE).exists()


def test_rerun_on_a_finished_directory_is_a_no_op(tmp_path, tok_path, capsys):
    write_text_corpus(tmp_path / "c", 20)
    run([tmp_path / "c"], tok_path, tmp_path / "out")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    run([tmp_path / "c"], tok_path, tmp_path / "out", progress=True)
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before


def test_shards_of_two_tokenizers_are_never_mixed(tmp_path, tok_path, other_tok_path):
    documents = write_text_corpus(tmp_path / "c", 20)
    out = tmp_path / "out"
    run([tmp_path / "c"], tok_path, out)
    with pytest.raises(UserError, match="different tokenizer.*--overwrite"):
        run([tmp_path / "c"], other_tok_path, out)
    assert shards.read_manifest(out)["tokenizer"]["vocab_size"] == 320  # untouched by the refusal

    run([tmp_path / "c"], other_tok_path, out, overwrite=True, val_fraction=0)
    manifest = shards.read_manifest(out)
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(other_tok_path.read_bytes()).hexdigest()
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(s["file"] for s in manifest["shards"])
    assert_prepared_as(out, other_tok_path, documents, 0)


def test_other_inputs_into_a_finished_directory_are_refused(tmp_path, tok_path):
    write_text_corpus(tmp_path / "c", 20)
    write_text_corpus(tmp_path / "d", 10, seed=5)
    run([tmp_path / "c"], tok_path, tmp_path / "out")
    with pytest.raises(UserError, match="other inputs or settings"):
        run([tmp_path / "d"], tok_path, tmp_path / "out")


def test_tokenizer_retrained_in_place_starts_clean(tmp_path):
    """The demo's layout: tokenizer.model trained into the data directory itself."""
    documents = write_text_corpus(tmp_path / "c", 30)
    out = tmp_path / "data"
    tok = train_tokenizer([str(tmp_path / "c")], 300, out, progress=False)
    run([tmp_path / "c"], tok, out)
    tok = train_tokenizer([str(tmp_path / "c")], 310, out, progress=False)
    with pytest.raises(UserError, match="not the tokenizer these shards were made with"):
        TokenLoader(str(out), "train", 8, 1, 0, 1)
    run([tmp_path / "c"], tok, out)
    assert shards.read_manifest(out)["tokenizer"]["vocab_size"] == 310
    assert_prepared_as(out, tok, documents, 0.01)


def test_cli_and_bad_arguments(tmp_path, tok_path, capsys):
    write_text_corpus(tmp_path / "c", 10)
    assert cli_main(["prepare", "--input", str(tmp_path / "c"), "--tokenizer", str(tok_path),
                     "--out", str(tmp_path / "out"), "--workers", "1", "--val-fraction", "0.2"]) == 0
    assert "10 documents" in capsys.readouterr().out
    defaults = {"--input": str(tmp_path / "c"), "--tokenizer": str(tok_path), "--out": str(tmp_path / "o2")}
    for override, message in [
        ({"--input": str(tmp_path / "missing")}, "does not exist"),
        ({"--val-fraction": "0.9"}, "between 0 and 0.5"),
        ({"--tokenizer": str(tmp_path / "none.model")}, "llama-dist tokenizer"),
    ]:
        argv = ["prepare"] + [x for item in {**defaults, **override}.items() for x in item]
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_a_failed_overwrite_leaves_the_old_dataset_whole(tmp_path, tok_path, other_tok_path, monkeypatch):
    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 300)
    documents = write_text_corpus(tmp_path / "c", 30)
    out = tmp_path / "out"
    run([tmp_path / "c"], tok_path, out, shard_tokens=300)
    before = _snapshot(out)
    bad = tmp_path / "b.jsonl"  # the mistake is at the very end, after new shards were written
    bad.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(40, seed=5)) + '{"txt": "x"}\n')
    with pytest.raises(UserError, match="no 'text' field"):
        run([bad], other_tok_path, out, overwrite=True, shard_tokens=300)
    assert (out / prepare_mod.PROGRESS_FILE).exists()  # the new run's finished shards are kept too
    assert {name: data for name, data in _snapshot(out).items() if name in before} == before
    assert_prepared_as(out, tok_path, documents, 0.01)  # the old dataset, still whole and loadable
    TokenLoader(str(out), "train", 8, 1, 0, 1)

    new_documents = write_text_corpus(tmp_path / "d", 30, seed=5)
    real_write, calls = shards.ShardWriter.write, [0]

    def crashing_write(self, tokens):
        calls[0] += 1
        if calls[0] == 20:
            raise KeyboardInterrupt
        real_write(self, tokens)

    monkeypatch.setattr(shards.ShardWriter, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        run([tmp_path / "d"], other_tok_path, out, overwrite=True, shard_tokens=300)
    monkeypatch.setattr(shards.ShardWriter, "write", real_write)
    assert {name: data for name, data in _snapshot(out).items() if name in before} == before

    run([tmp_path / "d"], other_tok_path, out, overwrite=True, shard_tokens=300)  # resumes, then swaps
    manifest = shards.read_manifest(out)
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(s["file"] for s in manifest["shards"])
    assert (out / "tokenizer.model").read_bytes() == other_tok_path.read_bytes()
    assert not (out / prepare_mod.PROGRESS_FILE).exists()
    assert_prepared_as(out, other_tok_path, new_documents, 0.01)


def test_an_out_dir_inside_its_input_is_not_read_back(tmp_path, tok_path, capsys):
    documents = write_text_corpus(tmp_path / "c", 20)
    out = tmp_path / "c" / "tokens"
    run([tmp_path / "c"], tok_path, out)
    run([tmp_path / "c"], tok_path, out, progress=True)
    assert "up to date" in capsys.readouterr().out
    run([tmp_path / "c"], tok_path, out, overwrite=True)
    assert_prepared_as(out, tok_path, documents, 0.01)


def test_a_glob_over_the_out_dir_leaves_out_its_tokenizer_and_shards(tmp_path, tok_path, capsys):
    """The tokenizer trained into the out dir, which a glob then reaches before any manifest is there."""
    documents = write_text_corpus(tmp_path / "c", 20)
    out = tmp_path / "c" / "tokens"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(Path(tok_path).read_bytes())
    with pytest.raises(UserError, match="nothing but this run's own files"):
        run([f"{out}/*.model"], out / "tokenizer.model", out)
    spec = f"{tmp_path / 'c'}/**"
    run([spec], out / "tokenizer.model", out)
    run([spec], out / "tokenizer.model", out, progress=True)  # the same inputs: reused, not refused
    assert "up to date" in capsys.readouterr().out
    assert_prepared_as(out, tok_path, documents, 0.01)


DYING_WORKER = """
import os, signal, sys
from llama_dist import prepare as prepare_mod
from llama_dist.errors import UserError

real_encode = prepare_mod.encode_batch


def encode_or_die(sp, dtype, texts):
    if any(text.startswith("doc 25:") for text in texts):
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    return real_encode(sp, dtype, texts)


prepare_mod.encode_batch = encode_or_die  # the workers are forked: they see it
prepare_mod.BATCH_CHARS = 300
try:
    prepare_mod.prepare([sys.argv[1]], sys.argv[2], sys.argv[3], workers=2, shard_tokens=300, progress=False)
except UserError as err:
    print("UserError:", err)
"""


def test_a_killed_worker_fails_the_run_instead_of_hanging_it(tmp_path, tok_path):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork to patch the workers")
    documents = write_text_corpus(tmp_path / "c", 60)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", DYING_WORKER, str(tmp_path / "c"), str(tok_path), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # prepare and the workers it started
        proc.communicate()
        pytest.fail("prepare still waits 90 s after one of its workers was killed")
    assert stdout.strip().startswith("UserError: an encoding worker died"), stdout + stderr
    assert "rerun" in stdout and (out / prepare_mod.PROGRESS_FILE).exists()
    run([tmp_path / "c"], tok_path, out, shard_tokens=300)  # the rerun continues and finishes
    assert_prepared_as(out, tok_path, documents, 0.01)


def test_out_naming_a_file_is_a_one_line_error(tmp_path, tok_path, capsys):
    write_text_corpus(tmp_path / "c", 5)
    (tmp_path / "f").write_text("mine")
    assert cli_main(["prepare", "--input", str(tmp_path / "c"), "--tokenizer", str(tok_path),
                     "--out", str(tmp_path / "f"), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--out" in err and "is a file; give a directory" in err and len(err.splitlines()) == 1
    assert (tmp_path / "f").read_text() == "mine"


def test_a_full_disk_is_one_line_leaves_no_partial_shard_and_a_rerun_finishes(tmp_path, tok_path, monkeypatch):
    import errno

    documents = write_text_corpus(tmp_path / "c", 40)
    out = tmp_path / "out"
    real_write, calls = shards.ShardWriter.write, []

    def fills_up(self, tokens):
        calls.append(1)
        if len(calls) > 25:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, tokens)

    monkeypatch.setattr(shards.ShardWriter, "write", fills_up)
    with pytest.raises(UserError, match=r"^no space left to write the shards in .*out \(No space left on device\); "
                                        r"free some space there and run the same command again to continue"):
        run([tmp_path / "c"], tok_path, out, shard_tokens=2000)
    assert not list(out.glob("*.tmp")) and not (out / shards.MANIFEST).exists()
    monkeypatch.undo()
    run([tmp_path / "c"], tok_path, out, shard_tokens=2000)
    assert_prepared_as(out, tok_path, documents, 0.01)


def test_a_shard_writer_aborts_cleanly_when_even_its_close_fails(tmp_path):
    writer = shards.ShardWriter(tmp_path / "train-00000.bin", np.uint16)
    writer.write(np.arange(10, dtype=np.uint16))

    class FullDisk:
        def close(self):
            raise OSError(28, "No space left on device")

    writer._file.close()
    writer._file = FullDisk()  # what a buffered file does when its last flush finds no space
    writer.abort()
    assert not writer.tmp_path.exists() and writer._file is None


def test_a_shard_whose_close_finds_no_space_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    writer = shards.ShardWriter(tmp_path / "train-00000.bin", np.uint16)
    writer.write(np.arange(10, dtype=np.uint16))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_shards_that_will_not_fit_are_warned_of_early_and_the_run_goes_on(tmp_path, tok_path, monkeypatch, capsys):
    import re

    run(["stdlib"], tok_path, tmp_path / "roomy", max_bytes=1_500_000)  # the disk has room: no warning
    assert "warning" not in capsys.readouterr().out
    written = sum(entry["tokens"] * 2 for entry in json.loads((tmp_path / "roomy" / shards.MANIFEST).read_text())["shards"])

    monkeypatch.setattr(prepare_mod, "PROJECT_AFTER_AT_LEAST", 300_000)  # a fifth of the text
    monkeypatch.setattr(prepare_mod, "free_bytes", lambda path: 100_000)
    run(["stdlib"], tok_path, tmp_path / "out", max_bytes=1_500_000)
    out = capsys.readouterr().out
    assert out.count("warning") == 1, out  # once, early
    still = re.search(rf"^warning: at the rate so far the shards still to write need about ([\d.]+) MB and the disk "
                      rf"holding {re.escape(str(tmp_path / 'out'))} has 0\.1 MB free; free space while it runs", out)
    assert still, out
    # about the four fifths of the shards not yet written when it looked
    assert 0.6 * written < float(still.group(1)) * 1e6 < 0.95 * written
    assert (tmp_path / "out" / shards.MANIFEST).is_file()  # a warning, not a stop: the disk is the judge


def test_the_projection_comes_after_64_mib_or_a_sixteenth_of_the_corpus(tmp_path):
    def after(total):
        return prepare_mod.SpaceWatch(tmp_path, total, 2).after

    assert after(10**12) == 64 << 20  # a large corpus: 64 MiB is a steady rate
    assert after(120_000_000) == 7_500_000  # a small disk can fill before 64 MiB of it
    assert after(4_000_000) == 1 << 20  # never on less than 1 MiB
    assert prepare_mod.SpaceWatch(tmp_path, None, 2).warned  # gzip without --max-bytes: no total to project to
