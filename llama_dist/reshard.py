"""Change a checkpoint's model-parallel size: MP=N shards in, MP=M shards out.

Each weight is merged or split on its shard dimension (`meta_format.shard_dim`),
tensor by tensor. Sources are memory-mapped, and pages already read are released
from the resident set; each destination file is a torch.save skeleton whose tensor
bytes are then written in place block by block (a block that is a contiguous run
of a source file is copied by the kernel), so no destination shard is ever held
whole. Peak memory stays at a few hundred MiB over the interpreter's, whatever the
checkpoint's size.

Everything goes into a temporary sibling of DST, renamed into place at the end;
SRC is only read, and every check runs before the first byte is written. The
training state follows the weights: optimizer moments are split like their
parameters, train_state.json and config.yaml get the new mp, rng files (one per
rank of the old world) are dropped, and a fresh manifest and COMMITTED close it.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import mmap
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
import yaml

from llama_dist.distributed import get_logger
from llama_dist.errors import UserError
from llama_dist.checkpoint import COMMIT_MARKER as COMMITTED
from llama_dist.checkpoint import MANIFEST, TRAIN_STATE
from llama_dist.files import atomic_write_text, sha256_file
from llama_dist.meta_format import load_shard, read_params, shard_dim, shard_file, shard_paths
from llama_dist.model import ModelArgs
from llama_dist.streamed_save import save_streamed, storage_records

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CHUNK_BYTES = 32 << 20  # the most of one destination tensor assembled at once
RELEASE_LAG = 256 << 20  # source bytes handed out after a span before its pages are released
CONFIG_FILE = "config.yaml"
OPTIMIZER_FILE = re.compile(r"^optimizer\.\d+\.pt$")
OPTIMIZER_KEY = re.compile(r"^(exp_avg|exp_avg_sq|step)/(.+)$")
# rng files hold a generator per global rank of the old world; checklist.chk (in Meta's
# releases) holds md5s of the old shards: neither is true after a reshard
STALE_FILE = re.compile(r"^(rng\.\d+\.pt|checklist\.chk|.*\.tmp)$")
# Llama 1's rotary table: every loader recomputes it, and ours loads strictly
DROPPED_KEYS = frozenset({"rope.freqs"})

log = get_logger("llama_dist.reshard")
PathLike = Union[str, os.PathLike]

# --------------------------------------------------------------------------- what SRC holds


@dataclass
class _Sharded:
    """One kind of per-rank file (model shards or optimizer states), alike on every rank."""

    paths: list[Path]
    load: Callable[[Path], dict[str, torch.Tensor]]
    shapes: dict[str, torch.Size]  # one rank's shape, in the first file's key order
    dtypes: dict[str, torch.dtype]
    dims: dict[str, Optional[int]]  # the shard dimension; None: replicated

    def full_shape(self, key: str) -> tuple[int, ...]:
        shape, dim = list(self.shapes[key]), self.dims[key]
        if dim is not None:
            shape[dim] *= len(self.paths)
        return tuple(shape)


@dataclass
class _Model:
    args: ModelArgs
    weights: _Sharded
    vocab_size: int
    dropped: list[str]  # keys left out (rope.freqs)


def _read_sharded(paths: list[Path], load: Callable) -> tuple[dict, dict, set]:
    """Shapes and dtypes of every rank's file, checked equal across ranks; and the keys left out."""
    shapes, dtypes, ignored, first = {}, {}, set(), paths[0].name
    for index, path in enumerate(paths):
        state = load(path)  # memory-mapped: only the pickled metadata is read here
        ignored |= DROPPED_KEYS & state.keys()
        here = {k: (v.shape, v.dtype) for k, v in state.items() if k not in DROPPED_KEYS}
        del state
        if index == 0:
            shapes, dtypes = {k: s for k, (s, _) in here.items()}, {k: d for k, (_, d) in here.items()}
            continue
        for key in sorted(shapes.keys() ^ here.keys()):
            which = f"lacks '{key}' that {first} has" if key in shapes else f"has '{key}' that {first} lacks"
            raise UserError(f"{path.name} {which}; the shards do not come from one checkpoint")
        for key, (shape, dtype) in here.items():
            if (shape, dtype) != (shapes[key], dtypes[key]):
                raise UserError(f"'{key}' is {tuple(shape)} {dtype} in {path.name} but {tuple(shapes[key])} "
                                f"{dtypes[key]} in {first}; every shard of a checkpoint has the same shapes")
    return shapes, dtypes, ignored


def _expected_shapes(args: ModelArgs, vocab: int) -> dict[str, tuple[int, ...]]:
    """The full (unsharded) shape of every weight that params.json implies."""
    d, q, kv, ffn = args.dim, args.n_heads * args.head_dim, args.kv_heads * args.head_dim, args.ffn_hidden_dim
    per_layer = {"attention.wq": (q, d), "attention.wk": (kv, d), "attention.wv": (kv, d), "attention.wo": (d, q),
                 "feed_forward.w1": (ffn, d), "feed_forward.w2": (d, ffn), "feed_forward.w3": (ffn, d),
                 "attention_norm": (d,), "ffn_norm": (d,)}
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (vocab, d)}
    for i in range(args.n_layers):
        shapes |= {f"layers.{i}.{name}.weight": shape for name, shape in per_layer.items()}
    return shapes | {"norm.weight": (d,), "output.weight": (vocab, d)}


def _inspect_model(ckpt_dir: Path) -> _Model:
    """params.json and the shards, checked against each other."""
    paths = shard_paths(ckpt_dir)  # first: it says so when the directory does not exist
    args = read_params(ckpt_dir)
    shapes, dtypes, dropped = _read_sharded(paths, load_shard)
    weights = _Sharded(paths, load_shard, shapes, dtypes, {k: shard_dim(k, args) for k in shapes})
    # Llama 2's params.json says vocab_size -1: the vocabulary is whatever the output layer has
    vocab = args.vocab_size
    if vocab <= 0 and "output.weight" in shapes:
        vocab = weights.full_shape("output.weight")[0]
    expected = _expected_shapes(args, vocab)
    where = f"params.json (n_layers={args.n_layers}) does not belong to these shards"
    for key in (k for k in expected if k not in shapes):
        raise UserError(f"the shards lack '{key}'; {where}")
    for key in (k for k in shapes if k not in expected):
        raise UserError(f"the shards hold '{key}', which the model has no place for; {where}")
    for key, shape in expected.items():
        if weights.full_shape(key) != shape:
            raise UserError(f"'{key}' merges to {weights.full_shape(key)} over {len(paths)} shards "
                            f"but params.json implies {shape}; {where}")
    return _Model(args, weights, vocab, sorted(dropped))


def _check_divisible(model: _Model, mp: int) -> None:
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


def _load_optimizer(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle and zip errors alike mean a bad file
        raise UserError(f"{path} is not a readable torch file ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and OPTIMIZER_KEY.match(k) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"{path} is not an optimizer state as docs/checkpoint-format.md describes "
                        f"(a flat dict of exp_avg/, exp_avg_sq/ and step/ tensors)")
    return state


def _inspect_optimizer(ckpt_dir: Path, model: _Model) -> Optional[_Sharded]:
    """The optimizer.NN.pt files, one per model shard, each moment shaped like its weight's shard."""
    found = sorted(p for p in ckpt_dir.iterdir() if OPTIMIZER_FILE.match(p.name))
    n = len(model.weights.paths)
    paths = [ckpt_dir / f"optimizer.{rank:02d}.pt" for rank in range(n)]
    if not found:
        return None
    if found != paths:
        raise UserError(f"{ckpt_dir} has {', '.join(p.name for p in found)} but {n} model shards; "
                        f"expected optimizer.00.pt .. optimizer.{n - 1:02d}.pt, one per shard")
    shapes, dtypes, _ = _read_sharded(paths, _load_optimizer)
    dims: dict[str, Optional[int]] = {}
    for key, shape in shapes.items():
        kind, name = OPTIMIZER_KEY.match(key).groups()
        if name not in model.weights.shapes:
            raise UserError(f"{paths[0].name} has '{key}' for a weight the model does not have")
        if kind != "step" and shape != model.weights.shapes[name]:
            raise UserError(f"'{key}' is {tuple(shape)} in {paths[0].name} but its weight is "
                            f"{tuple(model.weights.shapes[name])}; the optimizer state belongs to another model")
        dims[key] = None if kind == "step" else model.weights.dims[name]
    return _Sharded(paths, _load_optimizer, shapes, dtypes, dims)


def _training_texts(src: Path, n: int, mp: int) -> dict[str, str]:
    """train_state.json and config.yaml with the new mp, prepared before anything is written."""
    texts = {}
    if (src / TRAIN_STATE).exists():
        if not (src / COMMITTED).exists():
            raise UserError(f"{src} has no {COMMITTED} marker: an incomplete checkpoint (a run stopped "
                            f"while saving); reshard a committed one")
        try:
            state = json.loads((src / TRAIN_STATE).read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{src / TRAIN_STATE} is not valid JSON ({err})") from None
        if state.get("mp", n) != n:
            raise UserError(f"{src / TRAIN_STATE} says mp={state['mp']} but {src} holds {n} shards; "
                            f"the checkpoint is inconsistent")
        # same data parallelism on M * dp processes; a different launch is the trainer's to reconcile
        state["mp"], state["world_size"] = mp, int(state.get("dp", 1)) * mp
        texts[TRAIN_STATE] = json.dumps(state, indent=2) + "\n"
    if (src / CONFIG_FILE).exists():
        config = yaml.safe_load((src / CONFIG_FILE).read_text()) or {}
        if not isinstance(config, dict) or not isinstance(config.setdefault("parallel", {}), dict):
            raise UserError(f"{src / CONFIG_FILE} is not a config of sections; fix or remove it")
        config["parallel"]["mp"] = mp
        texts[CONFIG_FILE] = yaml.safe_dump(config, sort_keys=False)
    return texts


# --------------------------------------------------------------------------- reading pieces


class _MappedSources:
    """The source files of one kind, each memory-mapped once.

    A file in torch's zip layout is mapped whole (copy-on-write, never written) and its
    tensors are views of the mapping, so `locate` can tell the writer where a block's
    bytes lie and the kernel copies them file to file. Pages read through a mapping
    stay in the resident set, so each span handed out is released (MADV_DONTNEED:
    touched again, it is re-read from the page cache) once RELEASE_LAG more bytes have
    been handed out after it. A file of another layout is torch.load-ed (mmap) and kept.
    """

    def __init__(self, files: _Sharded):
        self.files = files
        self._states: dict[int, dict[str, torch.Tensor]] = {}
        self._maps: dict[int, tuple[int, mmap.mmap, int]] = {}  # rank: (fd, mapping, its address)
        self._spans: collections.deque = collections.deque()  # (rank, start, end) in the order handed out
        self._unreleased = 0

    def _open(self, rank: int) -> dict[str, torch.Tensor]:
        path = self.files.paths[rank]
        records = storage_records(path)
        if records is not None and records.keys() >= self.files.shapes.keys():
            fd = os.open(path, os.O_RDONLY)
            try:
                mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                flat = torch.frombuffer(mapping, dtype=torch.uint8)
                state = {}
                for key, shape in self.files.shapes.items():
                    record, dtype = records[key], self.files.dtypes[key]
                    if record.nbytes != math.prod(shape) * dtype.itemsize:
                        raise ValueError(f"'{key}' does not fill its storage")
                    state[key] = flat[record.start : record.start + record.nbytes].view(dtype).view(shape)
            except (ValueError, RuntimeError, OSError):  # unaligned or partial storages: torch's loader
                os.close(fd)
            else:
                self._maps[rank] = (fd, mapping, flat.data_ptr())
                return state
        return self.files.load(path)

    def tensors(self, key: str) -> list[torch.Tensor]:
        for rank in range(len(self.files.paths)):
            if rank not in self._states:
                self._states[rank] = self._open(rank)
        return [self._states[rank][key] for rank in range(len(self.files.paths))]

    def _where(self, tensor: torch.Tensor) -> Optional[tuple[int, int, int]]:
        """(rank, start, end): the span of a source file that a view of its mapping covers."""
        ptr = tensor.data_ptr()
        for rank, (_, mapping, address) in self._maps.items():
            if address <= ptr < address + len(mapping):
                extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
                start = ptr - address
                return rank, start, start + extent * tensor.element_size() * (tensor.numel() > 0)
        return None

    def locate(self, block: torch.Tensor) -> Optional[tuple[int, int]]:
        """(file descriptor, offset) of a contiguous block that is a view of a source mapping."""
        where = self._where(block) if block.is_contiguous() else None
        return None if where is None else (self._maps[where[0]][0], where[1])

    def done_with(self, tensor: torch.Tensor) -> None:
        """The caller no longer needs `tensor`'s pages resident (a later read still works)."""
        where = self._where(tensor)
        if where is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        self._spans.append(where)
        self._unreleased += where[2] - where[1]
        while self._unreleased > RELEASE_LAG:
            rank, start, end = self._spans.popleft()
            self._unreleased -= end - start
            first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
            if last > first:
                self._maps[rank][1].madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        for fd, _, _ in self._maps.values():
            os.close(fd)
        self._states, self._maps = {}, {}


def _check_replicated(key: str, tensors: list[torch.Tensor], paths: list[Path]) -> None:
    for path, tensor in zip(paths[1:], tensors[1:]):
        if not torch.equal(tensor, tensors[0]):
            diff = (tensor.float() - tensors[0].float()).abs().max().item()
            raise UserError(f"'{key}' is replicated but differs between {paths[0].name} and {path.name} "
                            f"(max |diff| {diff:.3g}); the shards do not come from one checkpoint")


def _row_blocks(parts: list[torch.Tensor], dim: int) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """The parts joined on `dim`, as blocks of whole rows of at most CHUNK_BYTES, each with its rows."""
    if parts[0].dim() == 0:
        yield parts[0], parts[:1]
        return
    row_bytes = sum(part[0].numel() for part in parts) * parts[0].element_size()
    step = max(1, CHUNK_BYTES // max(1, row_bytes))
    for start in range(0, parts[0].shape[0], step):
        rows = [part[start : start + step] for part in parts]
        yield rows[0] if len(rows) == 1 else torch.cat(rows, dim=dim), rows


def _pieces(sources: list[torch.Tensor], dim: Optional[int], rank: int,
            mp: int) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
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
            parts.append(source.narrow(dim, start - index * width, stop - start))
    if dim == 0:
        for part in parts:
            yield from _row_blocks([part], 0)
    else:
        yield from _row_blocks(parts, dim)


def _reshard_files(files: _Sharded, mp: int, dst_paths: list[Path],
                   dtype_of: Callable[[str], torch.dtype]) -> dict[str, str]:
    """Write the M destination files of one kind straight from the N mapped sources; their sha256s."""
    sources, digests = _MappedSources(files), {}
    try:
        for rank, path in enumerate(dst_paths):
            specs = {}
            for key in files.shapes:
                shape, dim = list(files.full_shape(key)), files.dims[key]
                if dim is not None:
                    shape[dim] //= mp
                specs[key] = (tuple(shape), dtype_of(key))

            def fill(key: str, rank: int = rank) -> Iterator[torch.Tensor]:
                tensors = sources.tensors(key)
                if files.dims[key] is None:
                    _check_replicated(key, tensors, files.paths)
                for block, rows in _pieces(tensors, files.dims[key], rank, mp):
                    yield block
                    for row in rows:
                        sources.done_with(row)

            digests[path.name] = save_streamed(path, specs, fill, sources.locate)
    finally:
        sources.close()
    return digests


# --------------------------------------------------------------------------- the directory


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


@contextmanager
def staged_directory(dst: PathLike, force: bool = False) -> Iterator[Path]:
    """A fresh sibling of `dst` to write into, renamed to `dst` only if the block completes.

    A non-empty `dst` is refused unless `force`; then it is replaced only once the new
    directory is complete (two renames: for a moment neither name exists).
    """
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} exists and is not a directory; choose another destination")
    if _non_empty(dst) and not force:
        raise UserError(f"{dst} is not empty; choose another destination or pass --force to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _non_empty(dst):
        old = dst.with_name(f"{dst.name}.old-{secrets.token_hex(4)}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)  # a rename replaces an empty directory


def write_manifest_and_commit(ckpt_dir: Path, digests: Optional[dict[str, str]] = None) -> None:
    """manifest.json (sha256 and size of every other file), then the COMMITTED marker, last.

    `digests` holds sha256s computed while writing, so that big files are not read again.
    """
    digests = digests or {}
    files = {p.name: {"sha256": digests.get(p.name) or sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(ckpt_dir.iterdir()) if p.is_file() and p.name not in (MANIFEST, COMMITTED)}
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
        else:
            dropped.append(name)
    for name, text in texts.items():
        atomic_write_text(tmp / name, text)
    if dropped:
        log.info(f"reshard: not carried over (tied to the old layout): {', '.join(dropped)}")


def parse_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def reshard(src: PathLike, dst: PathLike, mp: int, dtype: Union[str, torch.dtype, None] = None,
            force: bool = False) -> None:
    """Write the checkpoint in `src` to `dst` with `mp` model-parallel shards.

    `dtype` casts the model weights (for a release); optimizer moments keep theirs.
    """
    src, dst = Path(src), Path(dst)
    cast_to = parse_dtype(dtype)
    model = _inspect_model(src)
    _check_divisible(model, mp)
    optimizer = _inspect_optimizer(src, model)
    n = len(model.weights.paths)
    texts = _training_texts(src, n, mp)
    src_real, dst_real = src.resolve(), dst.resolve()
    if src_real == dst_real or src_real in dst_real.parents or dst_real in src_real.parents:
        raise UserError(f"destination {dst} overlaps the source {src}; choose a directory outside it")
    if cast_to not in (None, torch.float32) and optimizer is not None:
        log.info(f"reshard: casting a training checkpoint's weights to {cast_to}; its optimizer stays fp32")
    if model.dropped:
        log.info(f"reshard: dropped {', '.join(model.dropped)} (Llama 1's rotary table; loaders recompute it)")

    with staged_directory(dst, force) as tmp:
        weights = model.weights
        digests = _reshard_files(weights, mp, [tmp / shard_file(r) for r in range(mp)],
                                 lambda key: cast_to or weights.dtypes[key])
        if optimizer is not None:
            digests |= _reshard_files(optimizer, mp, [tmp / f"optimizer.{r:02d}.pt" for r in range(mp)],
                                      lambda key: optimizer.dtypes[key])
        _copy_other_files(src, tmp, texts)
        write_manifest_and_commit(tmp, digests)


def iter_merged_tensors(ckpt_dir: PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """The full (unsharded) weights one at a time, in file order, so a caller can hold just a few.

    A single-shard checkpoint's tensors (and replicated ones) come as copy-on-write
    memory-mapped views of the file rather than copies. Copy one before changing it
    in place while iterating: the pages of views already yielded are released as the
    iteration goes on, and a released page reads back from the file.
    """
    model = _inspect_model(Path(ckpt_dir))
    sources = _MappedSources(model.weights)
    try:
        for key in model.weights.shapes:
            tensors, dim = sources.tensors(key), model.weights.dims[key]
            if dim is None:
                _check_replicated(key, tensors, model.weights.paths)
            yield key, tensors[0] if dim is None or len(tensors) == 1 else torch.cat(tensors, dim=dim)
            for tensor in tensors:
                sources.done_with(tensor)
    finally:
        sources.close()


def load_merged_state_dict(ckpt_dir: PathLike) -> dict[str, torch.Tensor]:
    """The whole model's weights as one Meta-keyed dict, as an mp=1 model loads them."""
    return dict(iter_merged_tensors(ckpt_dir))


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llama-dist reshard",
        description="Write a checkpoint with another model-parallel size (weights and training state).",
    )
    parser.add_argument("src", help="checkpoint directory: consolidated.NN.pth + params.json")
    parser.add_argument("dst", help="new directory (must not exist or be empty, unless --force)")
    parser.add_argument("--mp", type=int, required=True, help="the new model-parallel size")
    parser.add_argument("--dtype", choices=list(DTYPES), help="cast the weights, e.g. bf16 for a release")
    parser.add_argument("--force", action="store_true", help="replace a non-empty DST once the new one is complete")
    args = parser.parse_args(argv)
    # stitching rows is memory-bound, and the write, CRC-32 and sha256 threads already fill
    # the cores: OpenMP workers spinning between the copies would only take time from them
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        reshard(args.src, args.dst, args.mp, dtype=args.dtype, force=args.force)
    finally:
        torch.set_num_threads(threads)  # the CLI can be called in-process
    size = sum(p.stat().st_size for p in Path(args.dst).iterdir())
    print(f"resharded {args.src} -> {args.dst} (mp={args.mp}, {size / 2**30:.2f} GiB) "
          f"in {time.perf_counter() - start:.1f}s")
    return 0
