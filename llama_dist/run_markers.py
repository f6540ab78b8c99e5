"""What a run leaves for whoever started it: exit codes, files in RUN/ and the stop signal.

torchrun reports any failed rank as exit 1, so the codes a batch script decides by
(75 preempted, 3 diverged, 2 an expected mistake) also go into small files in the run
directory, which `llama-dist train --nproc` and slurm/train.sbatch turn back into codes.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Optional

from llama_dist.files import atomic_write_text, is_disk_full
from llama_dist.logs import get_logger

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved a checkpoint on SIGTERM/SIGUSR1; requeue to resume
EXIT_DIVERGED = 3  # too many consecutive NaN/Inf steps; the last good checkpoint is kept
EXIT_MISTAKE = 2  # an expected mistake (a UserError), what `llama-dist` exits with for one
PREEMPTED_MARKER = "PREEMPTED"
DIVERGED_MARKER = "DIVERGED"  # torchrun reports every failed worker as 1: the markers tell 75 and 3 apart
ERROR_MARKER = "ERROR"  # ERROR.<rank>: an expected mistake a rank met, for `--nproc` to report as one line and 2

log = get_logger("llama_dist.train")


class StopSignal:
    """Remembers a request to save and stop; the loop checks it at step boundaries on every rank.

    SIGTERM and SIGUSR1 are what SLURM and `kill` send. Ctrl-C (SIGINT) and a closed terminal
    (SIGHUP) mean the same, as they do under `--nproc`, unless this process was started with
    them ignored (nohup, a script's `cmd &`). A second Ctrl-C stops at once, without the save.
    """

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignal":
        catch = [signal.SIGTERM, signal.SIGUSR1]
        catch += [sig for sig in (signal.SIGINT, signal.SIGHUP) if signal.getsignal(sig) is not signal.SIG_IGN]
        self._previous = {sig: signal.signal(sig, self._handle) for sig in catch}
        return self

    def __exit__(self, *_exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT:
            if self.received is not None:
                raise KeyboardInterrupt
            log.warning("Ctrl-C: saving a checkpoint at the end of this step, then stopping; "
                        "Ctrl-C again stops at once without it")
        self.received = self.received or signal.Signals(signum).name


def clear_markers(run_dir: Path, errors: bool = True) -> None:
    """An earlier run's PREEMPTED, DIVERGED or ERROR must not speak for this one. The ranks
    themselves leave the ERROR files alone (errors=False): a rank that failed to start may
    already have written its own, and the launcher cleared the old ones before any started."""
    for marker in (PREEMPTED_MARKER, DIVERGED_MARKER):
        (run_dir / marker).unlink(missing_ok=True)
    if errors:
        for marker in run_dir.glob(f"{ERROR_MARKER}.*"):
            marker.unlink(missing_ok=True)


def marker_step(path: Path) -> str:
    """The step a PREEMPTED or DIVERGED marker records ("?" where it cannot be read)."""
    try:
        return str(json.loads(path.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def rank_error(run_dir: str | os.PathLike, world_size: Optional[int] = None) -> Optional[str]:
    """The lowest rank's expected mistake, left by a run under torchrun, if any; with
    world_size, only from the ranks of such a world."""
    found = sorted(Path(run_dir).glob(f"{ERROR_MARKER}.*"),
                   key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else -1)
    if world_size is not None:
        found = [p for p in found if p.suffix[1:].isdigit() and int(p.suffix[1:]) < world_size]
    for marker in found:
        try:
            return json.loads(marker.read_text())["error"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def restarted() -> bool:
    """Whether torchrun (--max-restarts) started these ranks again after others failed."""
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"


def stopped_before_restart(run_dir: Path, world_size: int) -> Optional[int]:
    """The exit code again when torchrun restarted ranks that had stopped on purpose or met
    an expected mistake. A stop signal that reached the ranks but not torchrun, divergence
    and a mistake (a corrupt checkpoint, say) all look to torchrun like a crash: training on
    would undo the preemption or diverge again, and a mistake would be met again after the
    model is built and loaded, once per restart. ERROR files of ranks beyond this world are
    an older run's: the launcher clears them, a user's own torchrun may not."""
    if not restarted():
        return None
    for marker, code in ((PREEMPTED_MARKER, EXIT_PREEMPTED), (DIVERGED_MARKER, EXIT_DIVERGED)):
        if (run_dir / marker).is_file():
            log.warning(f"torchrun restarted the ranks, but they had stopped on purpose ({run_dir / marker}); "
                        f"exiting with {code} again")
            return code
    mistake = rank_error(run_dir, world_size)
    if mistake is not None:
        log.warning(f"torchrun restarted the ranks, but a rank had met a mistake a restart cannot mend "
                    f"({mistake}); exiting with {EXIT_MISTAKE} again")
        return EXIT_MISTAKE
    return None


def leave_rank_error(run_dir: str | os.PathLike, rank: int, world_size: int, err: Exception) -> None:
    """RUN/ERROR.<rank>: torchrun turns a rank's error into exit 1 and a traceback; this keeps the line."""
    if world_size > 1:
        marker = Path(run_dir) / f"{ERROR_MARKER}.{rank}"
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, json.dumps({"rank": rank, "error": str(err)}) + "\n")
        except OSError as write_err:  # a full disk, say: the rank's own error is the one to raise
            marker.with_name(marker.name + ".tmp").unlink(missing_ok=True)
            if not is_disk_full(write_err):
                raise
