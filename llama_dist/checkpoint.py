"""Training checkpoints that load unchanged in Meta's `Llama.build`.

The layout is in docs/checkpoint-format.md: Meta's shards and params.json, with
the optimizer, RNG and train state beside them as non-`.pth` files. A directory
counts only once rank 0 writes COMMITTED after every rank has finished, so a
crash at any point leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from llama_dist.checkpoint_files import (
    COMMIT_MARKER,
    CONFIG_FILE,
    MANIFEST,
    PARAMS_FILE,
    RESUME_FIX,
    TOKENIZER_FILE,
    TRAIN_STATE,
    BackgroundCheck,
    manifest_entries,
    optimizer_file,
    shard_file,
    verify_manifest,
)
from llama_dist.config import Config
from llama_dist.distributed import DistInfo, barrier
from llama_dist.errors import UserError
from llama_dist.files import atomic_copy_file, atomic_write_text, fsync_path, is_disk_full
from llama_dist.meta_format import load_shard, read_params, save_shard, shard_paths, write_params
from llama_dist.run_markers import restarted

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step:06d}"


def rng_file(rank: int) -> str:
    return f"rng.{rank:05d}.pt"


def is_committed(ckpt_dir: Path) -> bool:
    return (ckpt_dir / COMMIT_MARKER).is_file()


def committed_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first; partial ones are ignored."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir() and is_committed(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def unfinished_saves(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of every step dir without its commit marker: saves that crashed or are under way."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((int(match.group(1)), path) for path in root.iterdir()
                  if (match := STEP_DIR.match(path.name)) and path.is_dir() and not is_committed(path))


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    found = committed_checkpoints(run_dir)
    return found[-1][1] if found else None


# --------------------------------------------------------------------------- optimizer state


def optimizer_state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state keyed by parameter name, so a reshard can split it like the weights.

    The tensors stay where they are: save_shard copies one at a time to the host, so a
    GPU rank never holds its whole optimizer state (twice its weights) in host memory.
    """
    flat: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                flat[f"{key}/{name}"] = value.detach()
    return flat


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    """Rebuild optimizer.state_dict() from name-keyed tensors; load_state_dict places them.

    `flat` may be memory-mapped: each moment is copied once, straight to its parameter's
    device (no host copy of the whole state on a GPU rank, and on CPU no state that
    aliases a file a later prune deletes). `step` stays where load_state_dict wants it.
    """
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        kind, name = key.split("/", 1)
        by_name.setdefault(name, {})[kind] = value
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, param in model.named_parameters():
        entry = {kind: value.clone() if kind == "step" else value.to(param.device, copy=True)
                 for kind, value in by_name.get(name, {}).items()}
        if entry:
            state[index[id(param)]] = entry
    if flat and not state:
        raise UserError("optimizer state in the checkpoint matches no parameter of this model")
    full = optimizer.state_dict()
    full["state"] = state
    optimizer.load_state_dict(full)


# --------------------------------------------------------------------------- save


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
    cfg: Config,
    tokenizer_path: Optional[Path],
    info: DistInfo,
) -> Path:
    """Collective: every rank calls it. Returns the committed directory."""
    target = step_dir(run_dir, step)
    if info.is_rank0:
        if target.exists() and not is_committed(target):
            _remove_step_dir(target)  # the leftovers of a crashed save of this step
        target.mkdir(parents=True, exist_ok=True)
    if is_committed(target):  # already saved (e.g. preempted right after resuming)
        barrier()
        return target
    barrier()

    written: list[Path] = []
    digests: dict[str, str] = {}  # sha256s of the tensor files, taken while they were written
    full: Optional[str] = None  # this rank ran out of space: every rank hears of it at the gather
    try:
        if info.dp_rank == 0:  # dp replicas hold the same shard: one writer per mp rank
            path = target / shard_file(info.mp_rank)
            digests[path.name] = save_shard(model.state_dict(), path)
            written.append(path)
            path = target / optimizer_file(info.mp_rank)
            digests[path.name] = save_shard(optimizer_state_tensors(model, optimizer), path)
            written.append(path)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and info.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(info.device)
        path = target / rng_file(info.rank)
        digests[path.name] = save_shard(rng, path)
        written.append(path)
        _fault_point("save", step, info)

        if info.is_rank0:
            write_params(target, cfg.model)
            atomic_write_text(target / TRAIN_STATE, json.dumps(train_state, indent=2) + "\n")
            atomic_write_text(target / CONFIG_FILE, cfg.to_yaml())
            written += [target / PARAMS_FILE, target / TRAIN_STATE, target / CONFIG_FILE]
            if tokenizer_path is not None and Path(tokenizer_path).is_file():
                atomic_copy_file(tokenizer_path, target / TOKENIZER_FILE)
                written.append(target / TOKENIZER_FILE)
    except OSError as err:
        if not is_disk_full(err):
            raise
        _drop_own_files(target, info)  # at once: the other ranks may still be writing
        full = err.strerror or "no space left on device"

    # each rank hashes what it wrote; rank 0 writes the manifest, then the marker
    mine = ({} if full else manifest_entries(written, digests), full)
    gathered: list[Any] = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    failed = [reason for _, reason in gathered if reason]
    if failed:  # every rank has stopped writing: the step's files go, whoever wrote them
        if info.is_rank0:
            _remove_step_dir(target)
        barrier()
        raise _disk_full(run_dir, target, failed[0])
    if info.is_rank0:
        files: dict[str, Any] = {}
        for part, _ in gathered:
            files.update(part)
        try:
            atomic_write_text(target / MANIFEST, json.dumps({"step": step, "files": dict(sorted(files.items()))},
                                                            indent=1))
            fsync_path(target)
            atomic_write_text(target / COMMIT_MARKER, f"{step}\n")
            fsync_path(target)
            fsync_path(target.parent)  # the step's own entry, before a prune removes older ones
        except OSError as err:
            if not is_disk_full(err):
                raise
            _remove_step_dir(target)  # the other ranks wait at the barrier until torchrun ends them
            raise _disk_full(run_dir, target, err.strerror or "no space left on device") from None
    barrier()
    return target


def _disk_full(run_dir: str | os.PathLike, target: Path, reason: str) -> UserError:
    last = committed_checkpoints(run_dir)
    kept = f"{last[-1][1].name} stays the one a rerun resumes from" if last else "no checkpoint was saved before"
    return UserError(f"no space left to save {target} ({reason}); its files are removed and {kept}. "
                     f"Free space there (checkpoint.keep_last keeps fewer) and run again")


def _drop_own_files(target: Path, info: DistInfo) -> None:
    """What this rank wrote, or began to write, into an uncommitted step dir: a save that ran out of
    space gives its space back at once, and rank 0 removes the whole step once every rank has stopped."""
    names = [rng_file(info.rank)]
    if info.dp_rank == 0:
        names += [shard_file(info.mp_rank), optimizer_file(info.mp_rank)]
    if info.is_rank0:
        names += [PARAMS_FILE, TRAIN_STATE, CONFIG_FILE, TOKENIZER_FILE]
    for name in names:
        for path in (target / name, target / f"{name}.tmp"):
            path.unlink(missing_ok=True)


def _fault_point(where: str, step: int, info: DistInfo) -> None:
    """Tests kill a rank here (LLAMA_DIST_FAULT_KILL=save:STEP:RANK) to prove atomicity; only in
    torchrun's first attempt, so that ranks it restarts (--max-restarts) get past the fault."""
    spec = os.environ.get("LLAMA_DIST_FAULT_KILL", "")
    if spec == f"{where}:{step}:{info.rank}" and not restarted():
        os._exit(9)


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, keep_every: int) -> list[Path]:
    """Delete committed checkpoints beyond the newest keep_last, keeping multiples of keep_every,
    and the leftovers of crashed saves from before the newest checkpoint (nothing loads them)."""
    found = committed_checkpoints(run_dir)
    doomed = []
    for step, path in found[: max(0, len(found) - max(1, keep_last))]:
        if keep_every and step % keep_every == 0:
            continue
        _remove_step_dir(path)
        doomed.append(path)
    if not found:
        return doomed
    for step, path in unfinished_saves(run_dir):
        if step < found[-1][0]:
            _remove_step_dir(path)
            doomed.append(path)
    return doomed


def _remove_step_dir(path: Path) -> None:
    """A step directory linked in from elsewhere (an imported checkpoint) loses the link only:
    its files are not the run's to delete. A real one is uncommitted first, so that a delete
    cut short leaves a directory no resume picks."""
    if path.is_symlink():
        path.unlink()
        return
    (path / COMMIT_MARKER).unlink(missing_ok=True)
    shutil.rmtree(path)


# --------------------------------------------------------------------------- load


def check_compatible(ckpt_dir: Path, cfg: Config, mp_size: int) -> None:
    """Meta's MP == len(checkpoints) convention and params.json against the config."""
    shards = shard_paths(ckpt_dir)
    if len(shards) != mp_size:
        raise UserError(
            f"checkpoint {ckpt_dir} has MP={len(shards)} shards but this run has parallel.mp={mp_size}; "
            f"set parallel.mp={len(shards)} or run `llama-dist reshard {ckpt_dir} NEW_DIR --mp {mp_size}`"
        )
    # weights alone (a Meta release resharded into the run, say) have nothing to resume
    missing = [name for name in (TRAIN_STATE, *(optimizer_file(r) for r in range(len(shards))))
               if not (ckpt_dir / name).is_file()]
    if missing:
        raise UserError(f"checkpoint {ckpt_dir} holds no {missing[0]}, so training cannot resume from it "
                        f"(it holds weights only); to start a run from its weights, move it out of "
                        f"{ckpt_dir.parent} and set checkpoint.init_from to it")
    if cfg.checkpoint.verify:  # a corrupt params.json would otherwise be blamed on the config below
        verify_manifest(ckpt_dir, [PARAMS_FILE], RESUME_FIX)
    mismatch = _params_mismatch(ckpt_dir, cfg)
    if mismatch:
        raise UserError(f"checkpoint {ckpt_dir} has {mismatch}; use the checkpoint's model config or a new "
                        f"train.run_dir")


def _params_mismatch(ckpt_dir: Path, cfg: Config, release_vocab: bool = False) -> Optional[str]:
    """The first key where params.json and the model config differ, said as both values; with
    release_vocab, a release's vocab_size -1 (its tokenizer's) matches any."""
    saved = read_params(ckpt_dir).params_json()
    wanted = cfg.model.params_json()
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) != wanted.get(key) and not (release_vocab and key == "vocab_size" and saved.get(key) == -1):
            return f"{key}={saved.get(key)} in params.json but the config has model.{key}={wanted.get(key)}"
    return None


INIT_FIX = "point checkpoint.init_from at an intact checkpoint, or set checkpoint.verify=false"


def check_init_weights(ckpt_dir: Path, cfg: Config, mp_size: int) -> None:
    """checkpoint.init_from against this run: Meta's MP == len(checkpoints) and params.json
    against the model config. A release's vocab_size -1 means its tokenizer's, and the loader
    checks the data's vocabulary against model.vocab_size."""
    if not ckpt_dir.is_dir():
        raise UserError(f"checkpoint.init_from={ckpt_dir} is not a directory; give a checkpoint's "
                        f"(consolidated.NN.pth and params.json)")
    shards = shard_paths(ckpt_dir)
    if len(shards) != mp_size:
        raise UserError(
            f"checkpoint.init_from={ckpt_dir} has MP={len(shards)} shards but this run has parallel.mp={mp_size}; "
            f"run `llama-dist reshard {ckpt_dir} NEW_DIR --mp {mp_size}` and start from NEW_DIR"
        )
    if cfg.checkpoint.verify and (ckpt_dir / MANIFEST).is_file():  # ours; a Meta release has none
        verify_manifest(ckpt_dir, [PARAMS_FILE], INIT_FIX)
    mismatch = _params_mismatch(ckpt_dir, cfg, release_vocab=True)
    if mismatch:
        raise UserError(f"checkpoint.init_from={ckpt_dir} has {mismatch}; set the model config to the checkpoint's")


def load_init_weights(ckpt_dir: Path, model: nn.Module, cfg: Config, info: DistInfo) -> None:
    """This rank's shard of checkpoint.init_from into the model, cast to its precision."""
    check_init_weights(ckpt_dir, cfg, info.mp_size)
    path = ckpt_dir / shard_file(info.mp_rank)
    if cfg.checkpoint.verify and (ckpt_dir / MANIFEST).is_file():
        verify_manifest(ckpt_dir, [path.name], INIT_FIX)
    state = load_shard(path)
    state.pop("rope.freqs", None)  # Llama 1 files carry it; every loader ignores it
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_checkpoint(
    ckpt_dir: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], cfg: Config, info: DistInfo,
) -> dict[str, Any]:
    """Load this rank's part of a committed checkpoint; returns the train state."""
    check_compatible(ckpt_dir, cfg, info.mp_size)
    names = [shard_file(info.mp_rank), TRAIN_STATE]
    if optimizer is not None:
        names.append(optimizer_file(info.mp_rank))
    rng_path = ckpt_dir / rng_file(info.rank)
    if rng_path.is_file():
        names.append(rng_path.name)
    # the sha256s are checked in a thread while the files load (hashlib lets go of the GIL), and
    # must pass before the state is used; where a load fails, a corrupt file is the better reason
    if not cfg.checkpoint.verify:
        return _load_files(ckpt_dir, model, optimizer, info, rng_path)
    check = BackgroundCheck(ckpt_dir, names, RESUME_FIX)
    try:
        train_state = _load_files(ckpt_dir, model, optimizer, info, rng_path)
    except Exception:
        check.result()  # raises instead, where the check failed too
        raise
    else:
        check.result()
    finally:
        check.cancel()  # on an interrupt; a no-op once the check has finished
    return train_state


def _load_files(ckpt_dir: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], info: DistInfo,
                rng_path: Path) -> dict[str, Any]:
    try:
        train_state = json.loads((ckpt_dir / TRAIN_STATE).read_text())
        if not isinstance(train_state, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:  # reached with checkpoint.verify=false; the manifest check catches it first
        raise UserError(f"{ckpt_dir / TRAIN_STATE} is damaged ({err}); resume from an earlier checkpoint "
                        f"(delete this directory)") from None
    state = load_shard(ckpt_dir / shard_file(info.mp_rank))  # memory-mapped: copied once, into the model
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{ckpt_dir / shard_file(info.mp_rank)} does not fit the model: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    if optimizer is not None:
        path = ckpt_dir / optimizer_file(info.mp_rank)
        if not path.is_file():
            raise UserError(f"{path} is missing; this checkpoint cannot resume training (it holds weights only)")
        load_optimizer_state(model, optimizer, torch.load(path, map_location="cpu", mmap=True, weights_only=True))
    if train_state.get("world_size") == info.world_size and rng_path.is_file():
        rng = torch.load(rng_path, map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and info.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], info.device)
    return train_state
