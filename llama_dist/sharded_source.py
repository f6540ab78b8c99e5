"""Read a sharded Meta checkpoint: its shards checked against each other and against
params.json, memory-mapped once, and merged tensor by tensor.

Shared by `reshard` (which splits again for another model-parallel size) and
`export_hf` (which wants the full tensors). Files in torch's zip layout are read
without torch (torch_file), their tensors as numpy views of the mapped file;
torch.load reads any other (and refuses what holds more than tensors).
"""

from __future__ import annotations

import collections
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np

from llama_dist.errors import UserError
from llama_dist.meta_format import check_meta_keys, load_shard, read_params, shard_dim, shard_paths
from llama_dist.model_args import ModelArgs
from llama_dist.streamed_save import as_float32
from llama_dist.torch_file import DType, as_numpy, as_torch, dtype_of, read_tensor_records

# Llama 1's rotary table: every loader recomputes it, and ours loads strictly
DROPPED_KEYS = frozenset({"rope.freqs"})
RELEASE_LAG = 256 << 20  # source bytes handed out after a span before its pages are released
PathLike = Union[str, os.PathLike]


class SourceFile:
    """One file's tensors as arrays. In torch's zip layout: views of a copy-on-write mapping
    of the file (never written), its keys checked with `check_keys`; otherwise `load`
    (torch.load, which checks the file itself) and its tensors' memory as arrays."""

    def __init__(self, path: Path, load: Callable[[Path], dict],
                 check_keys: Callable[[Path, Iterable[str]], None]) -> None:
        self.mapping: Optional[mmap.mmap] = None
        records = read_tensor_records(path)
        if records is None:
            state = load(path)
            try:
                self.dtypes = {key: dtype_of(tensor) for key, tensor in state.items()}
            except ValueError as err:
                raise UserError(f"{path}: {err}") from None
            self.arrays = {key: as_numpy(tensor) for key, tensor in state.items()}
            return
        check_keys(path, records)
        with open(path, "rb") as handle:  # the mapping holds the file open on its own
            self.mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        self.dtypes = {key: record.dtype for key, record in records.items()}
        self.arrays = {}
        for key, r in records.items():
            size = r.dtype.itemsize
            if 0 in r.shape:
                self.arrays[key] = np.empty(r.shape, dtype=r.dtype.numpy)
            else:
                self.arrays[key] = np.ndarray(r.shape, dtype=r.dtype.numpy, buffer=self.mapping,
                                              offset=r.start + r.offset * size, strides=[s * size for s in r.stride])


@dataclass
class Sharded:
    """One kind of per-rank file (model shards or optimizer states), alike on every rank."""

    paths: list[Path]
    load: Callable[[Path], dict]  # torch.load, checked, for a file not in torch's zip layout
    check_keys: Callable[[Path, Iterable[str]], None]  # raises a UserError for a key of another kind of file
    shapes: dict[str, tuple[int, ...]]  # one rank's shape, in the first file's key order
    dtypes: dict[str, DType]
    dims: dict[str, Optional[int]]  # the shard dimension; None: replicated

    def open(self, rank: int) -> SourceFile:
        return SourceFile(self.paths[rank], self.load, self.check_keys)

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


def read_sharded(paths: list[Path], load: Callable, check_keys: Callable) -> tuple[dict, dict, set]:
    """Shapes and dtypes of every rank's file, checked equal across ranks; and the keys left out."""
    shapes, dtypes, ignored, first = {}, {}, set(), paths[0].name
    for index, path in enumerate(paths):
        source = SourceFile(path, load, check_keys)  # memory-mapped: only the pickled metadata is read here
        ignored |= DROPPED_KEYS & source.arrays.keys()
        here = {k: (tuple(v.shape), source.dtypes[k]) for k, v in source.arrays.items() if k not in DROPPED_KEYS}
        del source
        if index == 0:
            shapes, dtypes = {k: s for k, (s, _) in here.items()}, {k: d for k, (_, d) in here.items()}
            continue
        for key in sorted(shapes.keys() ^ here.keys()):
            which = f"lacks '{key}' that {first} has" if key in shapes else f"has '{key}' that {first} lacks"
            raise UserError(f"{path.name} {which}; the shards do not come from one checkpoint")
        for key, (shape, dtype) in here.items():
            if (shape, dtype) != (shapes[key], dtypes[key]):
                raise UserError(f"'{key}' is {shape} {dtype.name} in {path.name} but {shapes[key]} "
                                f"{dtypes[key].name} in {first}; every shard of a checkpoint has the same shapes")
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
    shapes, dtypes, dropped = read_sharded(paths, load_shard, check_meta_keys)
    weights = Sharded(paths, load_shard, check_meta_keys, shapes, dtypes, {k: shard_dim(k, args) for k in shapes})
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
    """The source files of one kind, each opened (memory-mapped) once.

    Pages read through a mapping stay in the resident set, so each span handed out is
    released (MADV_DONTNEED: touched again, it is re-read from the page cache) once
    RELEASE_LAG more bytes have been handed out after it. A file torch.load-ed is
    kept as it is. Threads writing different destination files may share one: the
    first `tensors` call opens every source, and page releases are counted under a lock.
    """

    def __init__(self, files: Sharded):
        self.files = files
        self._sources: dict[int, SourceFile] = {}
        self._maps: dict[int, tuple[mmap.mmap, int]] = {}  # rank: (mapping, its address)
        self._spans: collections.deque = collections.deque()  # (rank, start, end) in the order handed out
        self._unreleased = 0
        self._lock = threading.Lock()  # destination files may be written in threads of their own

    def tensors(self, key: str) -> list[np.ndarray]:
        with self._lock:
            for rank in range(len(self.files.paths)):
                if rank not in self._sources:
                    source = self._sources[rank] = self.files.open(rank)
                    if source.mapping is not None:
                        address = np.frombuffer(source.mapping, dtype=np.uint8).__array_interface__["data"][0]
                        self._maps[rank] = (source.mapping, address)
        return [self._sources[rank].arrays[key] for rank in range(len(self.files.paths))]

    def _where(self, array: np.ndarray) -> Optional[tuple[int, int, int]]:
        """(rank, start, end): the span of a source file that a view of its mapping covers."""
        if not array.size:
            return None
        ptr = array.__array_interface__["data"][0]
        for rank, (mapping, address) in self._maps.items():
            if address <= ptr < address + len(mapping):
                start = ptr - address
                extent = array.itemsize + sum((n - 1) * step for n, step in zip(array.shape, array.strides))
                return rank, start, start + extent
        return None

    def done_with(self, array: np.ndarray) -> None:
        """The caller no longer needs `array`'s pages resident (a later read still works)."""
        where = self._where(array)
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
        """Drop the arrays and mappings: a mapping goes once no view of it is left."""
        self._sources, self._maps = {}, {}


def _bits(array: np.ndarray) -> np.ndarray:
    return array if array.dtype == np.bool_ else array.view(f"u{array.itemsize}")


def check_replicated(key: str, arrays: list[np.ndarray], paths: list[Path], dtype: DType) -> None:
    """Replicated copies must be equal bit for bit: the reshard writes the first one for all."""
    for path, array in zip(paths[1:], arrays[1:]):
        if not np.array_equal(_bits(array), _bits(arrays[0])):
            diff = float(np.nanmax(np.abs(as_float32(array, dtype) - as_float32(arrays[0], dtype))))
            raise UserError(f"'{key}' is replicated but differs between {paths[0].name} and {path.name} "
                            f"(max |diff| {diff:.3g}); the shards do not come from one checkpoint")


def iter_merged_tensors(ckpt_dir: PathLike) -> Iterator[tuple[str, "torch.Tensor"]]:  # noqa: F821
    """The full (unsharded) weights as torch tensors, one at a time, in file order, so a
    caller can hold just a few.

    A single-shard checkpoint's tensors (and replicated ones) come as copy-on-write
    memory-mapped views of the file rather than copies. Copy one before changing it
    in place while iterating: the pages of views already yielded are released as the
    iteration goes on, and a released page reads back from the file.
    """
    import torch

    model = inspect_model(Path(ckpt_dir))
    sources = MappedSources(model.weights)
    try:
        for key in model.weights.shapes:
            arrays, dim, dtype = sources.tensors(key), model.weights.dims[key], model.weights.dtypes[key]
            if dim is None:
                check_replicated(key, arrays, model.weights.paths, dtype)
            tensors = [as_torch(array, dtype) for array in (arrays[:1] if dim is None else arrays)]
            yield key, tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)
            for array in arrays:
                sources.done_with(array)
    finally:
        sources.close()


def load_merged_state_dict(ckpt_dir: PathLike) -> dict:
    """The whole model's weights as one Meta-keyed dict of torch tensors, as an mp=1 model loads them."""
    return dict(iter_merged_tensors(ckpt_dir))
