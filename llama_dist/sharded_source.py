"""Read a sharded Meta checkpoint: its shards checked against each other and against
params.json, memory-mapped once, and merged tensor by tensor.

Shared by `reshard` (which splits again for another model-parallel size) and
`export_hf` (which wants the full tensors).
"""

from __future__ import annotations

import collections
import math
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch

from llama_dist.errors import UserError
from llama_dist.meta_format import load_shard, read_params, shard_dim, shard_paths
from llama_dist.model import ModelArgs
from llama_dist.streamed_save import storage_records

# Llama 1's rotary table: every loader recomputes it, and ours loads strictly
DROPPED_KEYS = frozenset({"rope.freqs"})
RELEASE_LAG = 256 << 20  # source bytes handed out after a span before its pages are released
PathLike = Union[str, os.PathLike]


@dataclass
class Sharded:
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
class ModelShards:
    args: ModelArgs
    weights: Sharded
    vocab_size: int
    dropped: list[str]  # keys left out (rope.freqs)


def read_sharded(paths: list[Path], load: Callable) -> tuple[dict, dict, set]:
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


def expected_shapes(args: ModelArgs, vocab: int) -> dict[str, tuple[int, ...]]:
    """The full (unsharded) shape of every weight that params.json implies."""
    d, q, kv, ffn = args.dim, args.n_heads * args.head_dim, args.kv_heads * args.head_dim, args.ffn_hidden_dim
    per_layer = {"attention.wq": (q, d), "attention.wk": (kv, d), "attention.wv": (kv, d), "attention.wo": (d, q),
                 "feed_forward.w1": (ffn, d), "feed_forward.w2": (d, ffn), "feed_forward.w3": (ffn, d),
                 "attention_norm": (d,), "ffn_norm": (d,)}
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (vocab, d)}
    for i in range(args.n_layers):
        shapes |= {f"layers.{i}.{name}.weight": shape for name, shape in per_layer.items()}
    return shapes | {"norm.weight": (d,), "output.weight": (vocab, d)}


def inspect_model(ckpt_dir: Path) -> ModelShards:
    """params.json and the shards, checked against each other."""
    paths = shard_paths(ckpt_dir)  # first: it says so when the directory does not exist
    args = read_params(ckpt_dir)
    shapes, dtypes, dropped = read_sharded(paths, load_shard)
    weights = Sharded(paths, load_shard, shapes, dtypes, {k: shard_dim(k, args) for k in shapes})
    # Llama 2's params.json says vocab_size -1: the vocabulary is whatever the output layer has
    vocab = args.vocab_size
    if vocab <= 0 and "output.weight" in shapes:
        vocab = weights.full_shape("output.weight")[0]
    expected = expected_shapes(args, vocab)
    where = f"params.json (n_layers={args.n_layers}) does not belong to these shards"
    for key in (k for k in expected if k not in shapes):
        raise UserError(f"the shards lack '{key}'; {where}")
    for key in (k for k in shapes if k not in expected):
        raise UserError(f"the shards hold '{key}', which the model has no place for; {where}")
    for key, shape in expected.items():
        if weights.full_shape(key) != shape:
            raise UserError(f"'{key}' merges to {weights.full_shape(key)} over {len(paths)} shards "
                            f"but params.json implies {shape}; {where}")
    return ModelShards(args, weights, vocab, sorted(dropped))


# --------------------------------------------------------------------------- mapped and merged


class MappedSources:
    """The source files of one kind, each memory-mapped once.

    A file in torch's zip layout is mapped whole (copy-on-write, never written) and its
    tensors are views of the mapping, read without a copy. Pages read through a mapping
    stay in the resident set, so each span handed out is released (MADV_DONTNEED:
    touched again, it is re-read from the page cache) once RELEASE_LAG more bytes have
    been handed out after it. A file of another layout is torch.load-ed (mmap) and kept.
    Threads writing different destination files may share one: the first `tensors`
    call opens every source, and page releases are counted under a lock.
    """

    def __init__(self, files: Sharded):
        self.files = files
        self._states: dict[int, dict[str, torch.Tensor]] = {}
        self._maps: dict[int, tuple[mmap.mmap, int]] = {}  # rank: (mapping, its address)
        self._spans: collections.deque = collections.deque()  # (rank, start, end) in the order handed out
        self._unreleased = 0
        self._lock = threading.Lock()  # destination files may be written in threads of their own

    def _open(self, rank: int) -> dict[str, torch.Tensor]:
        path = self.files.paths[rank]
        records = storage_records(path)
        if records is not None and records.keys() >= self.files.shapes.keys():
            try:
                with open(path, "rb") as handle:  # the mapping holds the file open on its own
                    mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
                flat = torch.frombuffer(mapping, dtype=torch.uint8)
                state = {}
                for key, shape in self.files.shapes.items():
                    record, dtype = records[key], self.files.dtypes[key]
                    if record.nbytes != math.prod(shape) * dtype.itemsize:
                        raise ValueError(f"'{key}' does not fill its storage")
                    state[key] = flat[record.start : record.start + record.nbytes].view(dtype).view(shape)
            except (ValueError, RuntimeError, OSError):  # unaligned or partial storages: torch's loader
                pass
            else:
                self._maps[rank] = (mapping, flat.data_ptr())
                return state
        return self.files.load(path)

    def tensors(self, key: str) -> list[torch.Tensor]:
        with self._lock:
            for rank in range(len(self.files.paths)):
                if rank not in self._states:
                    self._states[rank] = self._open(rank)
        return [self._states[rank][key] for rank in range(len(self.files.paths))]

    def _where(self, tensor: torch.Tensor) -> Optional[tuple[int, int, int]]:
        """(rank, start, end): the span of a source file that a view of its mapping covers."""
        ptr = tensor.data_ptr()
        for rank, (mapping, address) in self._maps.items():
            if address <= ptr < address + len(mapping):
                extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
                start = ptr - address
                return rank, start, start + extent * tensor.element_size() * (tensor.numel() > 0)
        return None

    def done_with(self, tensor: torch.Tensor) -> None:
        """The caller no longer needs `tensor`'s pages resident (a later read still works)."""
        where = self._where(tensor)
        if where is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        with self._lock:
            self._spans.append(where)
            self._unreleased += where[2] - where[1]
            while self._unreleased > RELEASE_LAG:
                rank, start, end = self._spans.popleft()
                self._unreleased -= end - start
                first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
                if last > first:
                    self._maps[rank][0].madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        """Drop the tensors and mappings: a mapping goes once no view of it is left."""
        self._states, self._maps = {}, {}


def check_replicated(key: str, tensors: list[torch.Tensor], paths: list[Path]) -> None:
    for path, tensor in zip(paths[1:], tensors[1:]):
        if not torch.equal(tensor, tensors[0]):
            diff = (tensor.float() - tensors[0].float()).abs().max().item()
            raise UserError(f"'{key}' is replicated but differs between {paths[0].name} and {path.name} "
                            f"(max |diff| {diff:.3g}); the shards do not come from one checkpoint")


def iter_merged_tensors(ckpt_dir: PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """The full (unsharded) weights one at a time, in file order, so a caller can hold just a few.

    A single-shard checkpoint's tensors (and replicated ones) come as copy-on-write
    memory-mapped views of the file rather than copies. Copy one before changing it
    in place while iterating: the pages of views already yielded are released as the
    iteration goes on, and a released page reads back from the file.
    """
    model = inspect_model(Path(ckpt_dir))
    sources = MappedSources(model.weights)
    try:
        for key in model.weights.shapes:
            tensors, dim = sources.tensors(key), model.weights.dims[key]
            if dim is None:
                check_replicated(key, tensors, model.weights.paths)
            yield key, tensors[0] if dim is None or len(tensors) == 1 else torch.cat(tensors, dim=dim)
            for tensor in tensors:
                sources.done_with(tensor)
    finally:
        sources.close()


def load_merged_state_dict(ckpt_dir: PathLike) -> dict[str, torch.Tensor]:
    """The whole model's weights as one Meta-keyed dict, as an mp=1 model loads them."""
    return dict(iter_merged_tensors(ckpt_dir))

