"""The names of a checkpoint directory's files, and the sha256 manifest that vouches for them.

No torch here: `llama-dist reshard` checks its source against the manifest while
torch is still being imported (see reshard_cli).
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Optional

from llama_dist.errors import UserError
from llama_dist.files import sha256_file

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


def verify_manifest(ckpt_dir: Path, names: list[str], fix: str = RESUME_FIX,
                    stop: Optional[threading.Event] = None) -> None:
    """Each of `names` is listed in manifest.json with the sha256 it has now; `fix` ends the error.

    `stop`, once set, abandons the check with CancelledError.
    """
    manifest_path = ckpt_dir / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{ckpt_dir} has no {MANIFEST}; it is not a complete llama_dist checkpoint")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{manifest_path} is not a manifest of files and sha256s; {fix}") from None
    for name in names:
        if name not in files:
            raise UserError(f"{ckpt_dir / name} is not listed in {MANIFEST}; {fix}")
        if sha256_file(ckpt_dir / name, stop) != files[name]["sha256"]:
            raise UserError(f"{ckpt_dir / name} does not match its sha256 in {MANIFEST}: the file is corrupt; {fix}")


class BackgroundCheck:
    """verify_manifest in a thread of its own. hashlib lets go of the GIL while it hashes,
    so the check takes a core that the caller's own work leaves idle."""

    def __init__(self, ckpt_dir: Path, names: list[str], fix: str) -> None:
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        # a daemon: a check abandoned by a failing caller never holds up the interpreter's exit
        self._thread = threading.Thread(target=self._run, args=(ckpt_dir, names, fix),
                                        name="manifest-check", daemon=True)
        self._thread.start()

    def _run(self, ckpt_dir: Path, names: list[str], fix: str) -> None:
        try:
            verify_manifest(ckpt_dir, names, fix, self._stop)
        except BaseException as err:  # noqa: BLE001 - handed to the caller by result(), CancelledError too
            self._error = err

    def result(self) -> None:
        """Wait for the check; raise what it raised (CancelledError once cancelled)."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def raise_if_failed(self) -> None:
        """Raise what the check raised, if it has finished and failed; never wait."""
        if not self._thread.is_alive() and self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Stop hashing (within one window) and wait for the thread; a finished check is left as it is."""
        self._stop.set()
        self._thread.join()
