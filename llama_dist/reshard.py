"""Change a checkpoint's model-parallel size: MP=N shards in, MP=M shards out.

Each weight is merged or split on its shard dimension (`meta_format.shard_dim`),
tensor by tensor. Sources are memory-mapped, and pages already read are released
from the resident set; each destination file is written front to back in torch's
layout, block by block (streamed_save), so no destination shard is ever held
whole; PARALLEL_FILES destination files are written at once. Peak memory stays at
a few hundred MiB over the interpreter's, whatever the checkpoint's size. Only
bytes move, so the reshard works on numpy views and never imports torch, whose
import alone would take as long as writing a 1B model (torch_file).

Everything goes into a temporary sibling of DST, renamed into place at the end;
SRC is only read, and every check runs before the first byte is written, except
SRC's sha256 manifest, which a thread checks meanwhile and which must pass before
anything is committed. The training state follows the weights: optimizer moments
are split like their parameters, train_state.json and config.yaml get the new mp,
rng files (one per rank of the old world) are dropped, and a fresh manifest and
COMMITTED close it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import yaml
from tqdm import tqdm

from llama_dist.checkpoint_files import COMMIT_MARKER as COMMITTED
from llama_dist.checkpoint_files import (CONFIG_FILE, MANIFEST, OPTIMIZER_FILE, TRAIN_STATE, BackgroundCheck,
                                         manifest_entries, optimizer_file, shard_file)
from llama_dist.errors import UserError, load_error_reason
from llama_dist.files import atomic_write_text, fsync_path, staged_directory
from llama_dist.logs import get_logger
from llama_dist.reshard_cli import DTYPE_NAMES, start_source_check
from llama_dist.sharded_source import (MappedSources, ModelShards, PathLike, Sharded, check_replicated,
                                       inspect_model, read_sharded)
from llama_dist.streamed_save import FLOAT_TYPES, Block, Spec, save_streamed
from llama_dist.torch_file import DTYPES, DType

CHUNK_BYTES = 32 << 20  # the most of one destination tensor assembled at once
PARALLEL_FILES = 2  # destination files written at once
OPTIMIZER_KEY = re.compile(r"^(exp_avg|exp_avg_sq|step)/(.+)$")
# rng files hold a generator per global rank of the old world; checklist.chk (in Meta's
# releases) holds md5s of the old shards: neither is true after a reshard
STALE_FILE = re.compile(r"^(rng\.\d+\.pt|checklist\.chk|.*\.tmp)$")
# files only a training checkpoint has (Meta's releases have none), which must then be committed
TRAINING_FILE = re.compile(rf"^(optimizer\.\d+\.pt|rng\.\d+\.pt|{re.escape(TRAIN_STATE)}|{re.escape(MANIFEST)})$")

log = get_logger("llama_dist.reshard")


def _check_divisible(model: ModelShards, mp: int) -> None:
    """Every split dimension must divide by M, as fairscale asserts when it builds the layers."""
    args = model.args
    sizes = args.mp_split_sizes(model.vocab_size)
    if mp < 1:
        raise UserError(f"--mp must be at least 1, got {mp}")
    for name, size in sizes.items():
        if size % mp:
            common = math.gcd(*sizes.values())
            valid = ", ".join(str(m) for m in range(1, common + 1) if common % m == 0)
            what = "the FFN width" if name == "ffn_hidden_dim" else name
            raise UserError(f"--mp {mp} does not divide {what}={size}; valid --mp values for this model: {valid}")


OPTIMIZER_FORMAT = "an optimizer state as docs/checkpoint-format.md describes (a flat dict of exp_avg/, " \
                   "exp_avg_sq/ and step/ tensors)"


def _check_optimizer_keys(path: Path, keys: Iterable[str]) -> None:
    if not all(isinstance(k, str) and OPTIMIZER_KEY.match(k) for k in keys):
        raise UserError(f"{path} is not {OPTIMIZER_FORMAT}")


def _load_optimizer(path: Path) -> dict:
    """With torch, for a file that is not in torch's zip layout."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle and zip errors alike mean a bad file
        raise UserError(f"{path} is not a readable torch file ({load_error_reason(err)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not {OPTIMIZER_FORMAT}")
    _check_optimizer_keys(path, state)
    return state


def _inspect_optimizer(ckpt_dir: Path, model: ModelShards) -> Optional[Sharded]:
    """The optimizer.NN.pt files, one per model shard, each moment shaped like its weight's shard."""
    found = sorted(p for p in ckpt_dir.iterdir() if OPTIMIZER_FILE.match(p.name))
    n = len(model.weights.paths)
    paths = [ckpt_dir / optimizer_file(rank) for rank in range(n)]
    if not found:
        return None
    if found != paths:
        raise UserError(f"{ckpt_dir} has {', '.join(p.name for p in found)} but {n} model shards; "
                        f"expected optimizer.00.pt .. optimizer.{n - 1:02d}.pt, one per shard")
    shapes, dtypes, _ = read_sharded(paths, _load_optimizer, _check_optimizer_keys)
    dims: dict[str, Optional[int]] = {}
    for key, shape in shapes.items():
        kind, name = OPTIMIZER_KEY.match(key).groups()
        if name not in model.weights.shapes:
            raise UserError(f"{paths[0].name} has '{key}' for a weight the model does not have")
        if kind != "step" and shape != model.weights.shapes[name]:
            raise UserError(f"'{key}' is {tuple(shape)} in {paths[0].name} but its weight is "
                            f"{tuple(model.weights.shapes[name])}; the optimizer state belongs to another model")
        dims[key] = None if kind == "step" else model.weights.dims[name]
    return Sharded(paths, _load_optimizer, _check_optimizer_keys, shapes, dtypes, dims)


def _check_committed(src: Path) -> None:
    """A directory with any training file is one of our checkpoints, which counts only once
    committed: resharding an unfinished save would give it a manifest and a marker of its own."""
    if not src.is_dir():
        return  # inspect_model says so
    training = sorted(p.name for p in src.iterdir() if TRAINING_FILE.match(p.name))
    if training and not (src / COMMITTED).is_file():
        more = f" and {len(training) - 4} more" if len(training) > 4 else ""  # an rng file per rank: hundreds
        raise UserError(f"{src} has {', '.join(training[:4])}{more} but no {COMMITTED} marker: an incomplete "
                        f"checkpoint (a run stopped while saving, or a delete cut short); reshard a committed one")


def _one_line_reason(err: Exception) -> str:
    """One line on why yaml, json or the text decoder refused a file: yaml's messages span several."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if problem and mark is not None:
        return f"{problem}, line {mark.line + 1}"
    return " ".join(str(err).split())[:200]


def read_config_yaml(path: Path) -> dict:
    """A checkpoint's config.yaml as a dict of sections; a malformed one is a one-line error."""
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid YAML ({_one_line_reason(err)}); fix or remove it") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a config of sections; fix or remove it")
    return config


def _read_train_state(path: Path, n: int) -> dict:
    """train_state.json, an object whose mp (if any) is the source's shard count."""
    try:
        state = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for a binary file
        raise UserError(f"{path} is not valid JSON ({_one_line_reason(err)}); the checkpoint is damaged: "
                        f"reshard an earlier one") from None
    if not isinstance(state, dict) or not isinstance(state.get("dp", 1), int):
        raise UserError(f"{path} is not a training state (a JSON object with an integer dp); the checkpoint "
                        f"is damaged: reshard an earlier one")
    if state.get("mp", n) != n:
        raise UserError(f"{path} says mp={state['mp']} but {path.parent} holds {n} shards; "
                        f"the checkpoint is inconsistent")
    return state


def _training_texts(src: Path, n: int, mp: int) -> dict[str, str]:
    """train_state.json and config.yaml with the new mp, prepared before anything is written."""
    texts = {}
    if (src / TRAIN_STATE).exists():
        state = _read_train_state(src / TRAIN_STATE, n)
        # same data parallelism on M * dp processes; a different launch is the trainer's to reconcile
        state["mp"], state["world_size"] = mp, state.get("dp", 1) * mp
        texts[TRAIN_STATE] = json.dumps(state, indent=2) + "\n"
    if (src / CONFIG_FILE).exists():
        config = read_config_yaml(src / CONFIG_FILE)
        if not isinstance(config.setdefault("parallel", {}), dict):
            raise UserError(f"{src / CONFIG_FILE} is not a config of sections; fix or remove it")
        config["parallel"]["mp"] = mp
        texts[CONFIG_FILE] = yaml.safe_dump(config, sort_keys=False)
    return texts


# --------------------------------------------------------------------------- reading pieces


def _row_blocks(parts: list[np.ndarray], dim: int) -> Iterator[tuple[Block, list[np.ndarray]]]:
    """The parts joined on `dim`, as blocks of whole rows of at most CHUNK_BYTES, each with its rows.

    Rows of several parts stay a list, which save_streamed joins into a buffer it reuses.
    """
    if parts[0].ndim == 0:
        yield parts[0], parts[:1]
        return
    row_bytes = sum(part[0].size for part in parts) * parts[0].itemsize
    step = max(1, CHUNK_BYTES // max(1, row_bytes))
    for start in range(0, parts[0].shape[0], step):
        rows = [part[start : start + step] for part in parts]
        if len(rows) == 1:
            yield rows[0], rows
        else:
            yield rows if dim == rows[0].ndim - 1 else np.concatenate(rows, axis=dim), rows


def _pieces(sources: list[np.ndarray], dim: Optional[int], rank: int,
            mp: int) -> Iterator[tuple[Block, list[np.ndarray]]]:
    """Shard `rank` of M of the tensor that the sources make together, as row blocks in order,
    each with the views of the sources it was made from.

    The full tensor is the sources joined on `dim`, and shard `rank` is its rank-th
    equal part on that dim: on dim 0, whole rows of one or a few sources; on dim 1,
    rows stitched from column ranges of several sources.
    """
    if dim is None:
        yield from _row_blocks(sources[:1], 0)
        return
    width = sources[0].shape[dim]  # per source shard
    size = width * len(sources) // mp  # per destination shard
    lo, hi = rank * size, (rank + 1) * size
    parts = []
    for index, source in enumerate(sources):
        start, stop = max(lo, index * width), min(hi, (index + 1) * width)  # in the full tensor
        if start < stop:
            offset = start - index * width
            parts.append(source[(slice(None),) * dim + (slice(offset, offset + stop - start),)])
    if dim == 0:
        for part in parts:
            yield from _row_blocks([part], 0)
    else:
        yield from _row_blocks(parts, dim)


class _Progress:
    """Bytes written so far, on a bar on the terminal (none in logs or tests): the writer
    threads of the destination files report to it together."""

    def __init__(self, total: int, show: bool) -> None:
        # disable=None: tqdm draws only where stderr is a terminal
        self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="reshard",
                         disable=None if show else True)
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self._bar.update(nbytes)

    def close(self) -> None:
        self._bar.close()


def _shard_specs(files: Sharded, mp: int, cast_to: Optional[DType] = None) -> dict[str, Spec]:
    """(shape, dtype) of each tensor in one of the M destination files, alike for every rank."""
    specs = {}
    for key in files.shapes:
        shape, dim = list(files.full_shape(key)), files.dims[key]
        if dim is not None:
            shape[dim] //= mp
        specs[key] = (tuple(shape), cast_to or files.dtypes[key])
    return specs


def _reshard_files(files: Sharded, specs: dict[str, Spec], dst_paths: list[Path],
                   check: Optional[BackgroundCheck], progress: _Progress) -> dict[str, str]:
    """Write the M destination files of one kind straight from the N mapped sources; their sha256s.

    A source check that has already failed stops the writing at the next tensor: a 70B
    reshard need not write on for minutes to report a corrupt shard.
    """
    sources, mp = MappedSources(files), len(dst_paths)

    def write(rank: int) -> tuple[str, str]:
        def fill(key: str) -> Iterator[Block]:
            if check is not None:
                check.raise_if_failed()
            arrays = sources.tensors(key)
            if files.dims[key] is None:
                check_replicated(key, arrays, files.paths, files.dtypes[key])
            itemsize = specs[key][1].itemsize
            for block, rows in _pieces(arrays, files.dims[key], rank, mp):
                yield block
                progress.add(sum(row.size for row in rows) * itemsize)
                for row in rows:
                    sources.done_with(row)

        return dst_paths[rank].name, save_streamed(dst_paths[rank], specs, fill, files.dtypes)

    try:
        # a file's sha256 runs on one core: several files at once keep both busy
        with ThreadPoolExecutor(max_workers=min(PARALLEL_FILES, len(dst_paths))) as pool:
            return dict(pool.map(write, range(len(dst_paths))))
    finally:
        sources.close()


# --------------------------------------------------------------------------- the directory


def write_manifest_and_commit(ckpt_dir: Path, digests: Optional[dict[str, str]] = None) -> None:
    """manifest.json (sha256 and size of every other file), then the COMMITTED marker, last.

    `digests` holds sha256s computed while writing, so that big files are not read again.
    """
    paths = [p for p in sorted(ckpt_dir.iterdir()) if p.is_file() and p.name not in (MANIFEST, COMMITTED)]
    files = manifest_entries(paths, digests or {})
    atomic_write_text(ckpt_dir / MANIFEST, json.dumps({"files": files}, indent=2) + "\n")
    atomic_write_text(ckpt_dir / COMMITTED, "")


def _copy_other_files(src: Path, tmp: Path, texts: dict[str, str]) -> None:
    """params.json, tokenizer.model and any file of the user's; the prepared texts; not stale ones."""
    dropped = []
    for path in sorted(src.iterdir()):
        name = path.name
        if path.suffix == ".pth" or OPTIMIZER_FILE.match(name) or name in (MANIFEST, COMMITTED, *texts):
            continue  # written fresh
        if path.is_file() and not STALE_FILE.match(name):
            shutil.copyfile(path, tmp / name)
            fsync_path(tmp / name)
        else:
            dropped.append(name)
    for name, text in texts.items():
        atomic_write_text(tmp / name, text)
    if dropped:
        log.info(f"reshard: not carried over (tied to the old layout): {', '.join(dropped)}")


def parse_dtype(dtype: Union[str, DType, "torch.dtype", None]) -> Optional[DType]:  # noqa: F821
    """--dtype's names (bf16, fp16, fp32), a DType, or a torch.dtype."""
    if dtype is None or isinstance(dtype, DType):
        return dtype
    name = DTYPE_NAMES.get(dtype) if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES.values():
        raise UserError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPE_NAMES)}")
    return DTYPES[name]


def reshard(src: PathLike, dst: PathLike, mp: int, dtype: Union[str, DType, "torch.dtype", None] = None,  # noqa: F821
            force: bool = False, verify: bool = True, source_check: Optional[BackgroundCheck] = None,
            progress: bool = False) -> None:
    """Write the checkpoint in `src` to `dst` with `mp` model-parallel shards.

    `dtype` casts the model weights (for a release); optimizer moments keep theirs.
    `verify` checks SRC's sha256 manifest, if it has one, in a thread while the reshard
    works; `source_check` is that check, already started (by the CLI, first thing).
    `progress` shows the bytes written on a bar where stderr is a terminal.
    """
    src = Path(src)
    check = source_check or (start_source_check(src) if verify else None)
    try:
        _reshard(src, Path(dst), mp, parse_dtype(dtype), force, check, progress)
    finally:
        if check is not None:
            check.cancel()  # after an error; a finished check stays as it is


def _reshard(src: Path, dst: Path, mp: int, cast_to: Optional[DType], force: bool,
             check: Optional[BackgroundCheck], show_progress: bool) -> None:
    _check_committed(src)  # first: an unfinished save may lack shards too
    model = inspect_model(src)
    _check_divisible(model, mp)
    optimizer = _inspect_optimizer(src, model)
    n = len(model.weights.paths)
    texts = _training_texts(src, n, mp)
    if cast_to is not None and any(d.name not in FLOAT_TYPES for d in model.weights.dtypes.values()):
        raise UserError(f"--dtype casts floating-point weights, and {src} holds others; reshard it without --dtype")
    if cast_to not in (None, DTYPES["float32"]) and optimizer is not None:
        log.info(f"reshard: casting a training checkpoint's weights to {cast_to.name}; its optimizer stays fp32")
    if model.dropped:
        log.info(f"reshard: dropped {', '.join(model.dropped)} (Llama 1's rotary table; loaders recompute it)")

    weights = model.weights
    kinds = [(weights, shard_file, _shard_specs(weights, mp, cast_to))]
    if optimizer is not None:
        kinds.append((optimizer, optimizer_file, _shard_specs(optimizer, mp)))
    # every destination file of a kind holds the same shapes
    total = mp * sum(math.prod(shape) * dtype.itemsize for _, _, specs in kinds for shape, dtype in specs.values())
    with staged_directory(dst, force, source=src, room=(total, f"the mp={mp} checkpoint")) as tmp:
        digests: dict[str, str] = {}
        progress = _Progress(total, show_progress)
        try:
            for files, name_of, specs in kinds:
                digests |= _reshard_files(files, specs, [tmp / name_of(r) for r in range(mp)], check, progress)
        finally:
            progress.close()
        if check is not None:
            check.result()  # before anything is committed
        _copy_other_files(src, tmp, texts)
        write_manifest_and_commit(tmp, digests)
