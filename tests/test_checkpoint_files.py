"""The sha256 of a file through its memory map, and the manifest check that runs in a thread
(reshard's, started before its sources are opened)."""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError

import pytest

from llama_dist import checkpoint_files, files
from llama_dist.checkpoint_files import MANIFEST, BackgroundCheck, verify_manifest
from llama_dist.errors import UserError


def test_sha256_file_matches_hashlib_across_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "HASH_WINDOW", 4096)  # a page: the windows are dropped from the map as hashed
    for size in (0, 1, 4095, 4096, 3 * 4096 + 5):
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        assert files.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest(), size


def test_sha256_file_stops_when_asked(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 10)
    stop = threading.Event()
    stop.set()
    with pytest.raises(CancelledError):
        files.sha256_file(tmp_path / "f", stop)


def _checkpoint(tmp_path, **contents: bytes):
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    manifest = {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                for name, data in contents.items()}
    (tmp_path / MANIFEST).write_text(json.dumps({"files": manifest}))
    return tmp_path


def test_background_check_reports_a_corrupt_file_as_verify_manifest_does(tmp_path):
    ckpt = _checkpoint(tmp_path, a=b"aaaa", b=b"bbbb")
    BackgroundCheck(ckpt, ["a", "b"], "the fix").result()  # intact
    (ckpt / "b").write_bytes(b"bbbc")
    with pytest.raises(UserError, match=r"b does not match its sha256 in manifest.json: .*; the fix$"):
        verify_manifest(ckpt, ["a", "b"], "the fix")
    check = BackgroundCheck(ckpt, ["a", "b"], "the fix")
    with pytest.raises(UserError, match=r"b does not match its sha256 in manifest.json: .*; the fix$"):
        check.result()


def _hash_until_stopped(path):
    """Hash windows that never end (each 10 ms): the check is surely still running when cancelled."""
    while True:
        yield
        time.sleep(0.01)


def _check_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "manifest-check"]


def test_cancel_stops_the_hashing_and_the_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_files, "sha256_windows", _hash_until_stopped)
    check = BackgroundCheck(_checkpoint(tmp_path, a=b"a"), ["a"], "the fix")
    check.cancel()
    assert not _check_threads()
    with pytest.raises(CancelledError):
        check.result()


def test_a_reshard_that_fails_early_stops_its_source_check(tmp_path, training_ckpt, monkeypatch):
    from llama_dist.reshard import reshard

    src = training_ckpt[0]
    assert (src / MANIFEST).is_file()
    monkeypatch.setattr(checkpoint_files, "sha256_windows", _hash_until_stopped)
    with pytest.raises(UserError, match="--mp 3 does not divide"):
        reshard(src, tmp_path / "dst", 3)
    assert not _check_threads()


CHILD = """
import sys
from llama_dist import reshard_cli
start = reshard_cli.start_source_check
def watched(src):
    print("torch imported when the check started:", "torch" in sys.modules)
    return start(src)
reshard_cli.start_source_check = watched
sys.exit(reshard_cli.cli(sys.argv[1:]))
"""


def test_the_reshard_command_starts_its_source_check_before_importing_torch(tmp_path, training_ckpt):
    """What lets the check's hashing overlap torch's import on a core of its own."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(training_ckpt[0]), str(tmp_path / "dst"), "--mp", "2"],
                         capture_output=True, text=True, check=True).stdout
    assert "torch imported when the check started: False" in out
    assert (tmp_path / "dst" / "COMMITTED").is_file()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread is Linux's")
def test_the_thread_hashes_at_nice_19_and_the_caller_finishes_what_it_left(tmp_path, monkeypatch):
    """Low priority while the caller works; once the caller waits, no starving: it hashes the rest."""
    monkeypatch.setattr(files, "HASH_WINDOW", 4096)
    ckpt = _checkpoint(tmp_path, a=os.urandom(10 * 4096))
    steps, release, real = [], threading.Event(), files.sha256_windows

    def watched(path):
        windows = real(path)
        while True:
            try:
                next(windows)
            except StopIteration as end:
                return end.value
            nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            steps.append((threading.current_thread().name, nice))
            if len(steps) == 3:
                release.wait(30)  # the thread holds here until result() has asked for the rest
            yield

    def three_steps_then_result(check: BackgroundCheck) -> None:
        deadline = time.monotonic() + 30
        while len(steps) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        # the thread goes on once result() has asked for the rest, and must then hand it over
        threading.Thread(target=lambda: check._handover.wait(30) and release.set()).start()
        check.result()

    monkeypatch.setattr(checkpoint_files, "sha256_windows", watched)
    own = (threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    three_steps_then_result(BackgroundCheck(ckpt, ["a"], "the fix"))  # the file is intact
    # a step per window: the thread's first three at nice 19, the rest in this thread at its own
    assert steps == [("manifest-check", 19)] * 3 + [own] * 7
    assert not _check_threads()

    (ckpt / "a").write_bytes(os.urandom(10 * 4096))
    steps.clear()
    release.clear()
    with pytest.raises(UserError, match="does not match its sha256"):  # found by this thread, reported alike
        three_steps_then_result(BackgroundCheck(ckpt, ["a"], "the fix"))
    assert steps == [("manifest-check", 19)] * 3 + [own] * 7
