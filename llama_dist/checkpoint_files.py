"""The names of a checkpoint directory's files, and the sha256 manifest that vouches for them.

No torch here: `llama-dist reshard`, which never imports torch, checks its source
against the manifest in a thread (see reshard_cli).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Callable, Generator, Optional

from llama_dist.errors import UserError
from llama_dist.files import run_steps, sha256_file, sha256_windows

# Meta's
PARAMS_FILE = "params.json"
TOKENIZER_FILE = "tokenizer.model"
SHARD_NAME = re.compile(r"^consolidated\.(\d+)\.pth$")
# ours, beside Meta's (docs/checkpoint-format.md)
COMMIT_MARKER = "COMMITTED"
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
CONFIG_FILE = "config.yaml"
OPTIMIZER_FILE = re.compile(r"^optimizer\.\d+\.pt$")

RESUME_FIX = "resume from an earlier checkpoint (delete this directory) or set checkpoint.verify=false"


def shard_file(mp_rank: int) -> str:
    return f"consolidated.{mp_rank:02d}.pth"


def optimizer_file(mp_rank: int) -> str:
    return f"optimizer.{mp_rank:02d}.pt"


def manifest_entries(paths: list[Path], digests: dict[str, str]) -> dict[str, dict]:
    """The manifest's line for each file: its sha256 (from `digests`, taken while the file was
    written, or else read back) and its size."""
    return {p.name: {"sha256": digests.get(p.name) or sha256_file(p), "bytes": p.stat().st_size} for p in paths}


def _check_steps(ckpt_dir: Path, names: list[str], fix: str) -> Generator[None, None, None]:
    """verify_manifest's work, yielding before each hash window."""
    manifest_path = ckpt_dir / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{ckpt_dir} has no {MANIFEST}; it is not a complete llama_dist checkpoint")
    try:
        files = json.loads(manifest_path.read_text())["files"]
        if not all(isinstance(entry["sha256"], str) for entry in files.values()):
            raise TypeError("a sha256 that is not a string")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise UserError(f"{manifest_path} is not a manifest of files and sha256s; {fix}") from None
    for name in names:
        if name not in files:
            raise UserError(f"{ckpt_dir / name} is not listed in {MANIFEST}; {fix}")
        if (yield from sha256_windows(ckpt_dir / name)) != files[name]["sha256"]:
            raise UserError(f"{ckpt_dir / name} does not match its sha256 in {MANIFEST}: the file is corrupt; {fix}")


def verify_manifest(ckpt_dir: Path, names: list[str], fix: str = RESUME_FIX,
                    stop: Optional[threading.Event] = None) -> None:
    """Each of `names` is listed in manifest.json with the sha256 it has now; `fix` ends the error.

    `stop`, once set, abandons the check with CancelledError.
    """
    run_steps(_check_steps(ckpt_dir, names, fix), stop)


def _lower_thread_priority() -> None:
    """nice 19 for the calling thread alone. Linux keeps a nice value per thread; elsewhere
    setpriority would renice the whole process, so nothing is done there."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


class BackgroundCheck:
    """verify_manifest in a thread of its own while the caller works, then in the caller.

    hashlib lets go of the GIL while it hashes, so the thread takes a core that the
    caller's work leaves idle. At nice 19 it also gives way where the caller's threads
    want every core (a reshard's copies and the hashes of the files it writes, which
    the next write waits for), since the check has until the commit to finish. What
    is left when the caller asks for the result, the caller hashes itself at its own
    priority, so a busy machine cannot starve the check.
    """

    def __init__(self, ckpt_dir: Path, names: list[str], fix: str) -> None:
        self._steps = _check_steps(ckpt_dir, names, fix)
        self._stop, self._handover = threading.Event(), threading.Event()
        self._error: Optional[BaseException] = None
        self._finished = False
        # a daemon: a check abandoned by a failing caller never holds up the interpreter's exit
        self._thread = threading.Thread(target=self._run, name="manifest-check", daemon=True)
        self._thread.start()

    def _advance(self, until: Callable[[], bool]) -> None:
        try:
            if not run_steps(self._steps, self._stop, until)[0]:
                return  # handed over to the caller
        except BaseException as err:  # noqa: BLE001 - handed to the caller by result(), CancelledError too
            self._error = err
        self._finished = True

    def _run(self) -> None:
        _lower_thread_priority()
        self._advance(self._handover.is_set)

    def result(self) -> None:
        """Finish the check in this thread; raise what it raised (CancelledError once cancelled)."""
        self._handover.set()
        self._thread.join()  # within one window
        if not self._finished:
            self._advance(lambda: False)
        if self._error is not None:
            raise self._error

    def raise_if_failed(self) -> None:
        """Raise what the check raised, if it has finished and failed; never wait."""
        if self._finished and self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Stop hashing (within one window) and wait for the thread; a finished check is left as it is."""
        self._stop.set()
        self._thread.join()
        if not self._finished:  # handed over, and the caller never went on
            self._steps.close()
            self._error, self._finished = CancelledError("manifest check cancelled"), True
