"""The rank-aware, resumable token loader over prepared shards.

A split's shards form one token stream, memory-mapped (every rank on a machine
shares the page cache; nobody copies the corpus). Sample i is the window of
seq_len + 1 tokens starting at i * seq_len: inputs and targets shifted by one.

Order: epoch e visits every sample once, in a permutation drawn from (seed, e);
the epochs follow each other into one endless global sequence. One optimizer
step consumes the next micro_batch_size * dp_size samples of it, and dp rank r
takes the r-th run of micro_batch_size. So the order depends only on the seed,
never on the number of ranks, and the whole state is one number: how many
samples all ranks together have consumed. Resuming at a different dp_size picks
up at that number; nothing is repeated or skipped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from llama_dist import shards
from llama_dist.files import sha256_file
from llama_dist.errors import UserError

STATE_VERSION = 1
FILE_HEADROOM = 64  # descriptors left over for everything else: sockets, logs, checkpoint files


def _open_files() -> int:
    """File descriptors this process holds now (0 where the system will not say)."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(listing))
        except OSError:
            continue
    return 0


def allow_open_files(count: int, what: str) -> None:
    """Make room for `count` more open files, or say in one line how to.

    Every memory-mapped shard holds a file descriptor for the loader's life, and a soft
    limit of 1024 (the systemd and Slurm default) is a raw EMFILE halfway through a big
    corpus; the soft limit may be raised up to the hard one without privileges.
    """
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = _open_files() + count + FILE_HEADROOM
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard == resource.RLIM_INFINITY or hard >= need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
            return
        except (ValueError, OSError):  # macOS refuses more than kern.maxfilesperproc
            pass
    ceiling = "unlimited" if hard == resource.RLIM_INFINITY else hard
    raise UserError(f"{what} has {count} shards, each held open while training, but this process may open only "
                    f"{soft} files (hard limit {ceiling}); run `ulimit -n {need}` first, or prepare with a larger "
                    "--shard-tokens")


class TokenLoader:
    """Yields (inputs, targets), int64 tensors of shape (micro_batch_size, seq_len), forever.

    Takes dp_rank and dp_size (not the global rank): every model-parallel rank of one
    data-parallel group gets the same batches.
    """

    def __init__(
        self,
        data_dir: str,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int = 1234,
        verify_checksums: bool = False,
        expected_vocab_size: Optional[int] = None,
    ):
        if seq_len < 1 or micro_batch_size < 1:
            raise UserError(f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must be positive")
        if not 0 <= dp_rank < dp_size:
            raise UserError(f"dp_rank {dp_rank} is outside the data-parallel group of size {dp_size}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.manifest = shards.read_manifest(self.data_dir)
        self.vocab_size: int = self.manifest["tokenizer"]["vocab_size"]
        if expected_vocab_size is not None and expected_vocab_size != self.vocab_size:
            raise UserError(
                f"{self.data_dir} was tokenized with a {self.vocab_size}-token vocabulary but the model has "
                f"vocab_size {expected_vocab_size}; set model.vocab_size={self.vocab_size} or prepare the data "
                f"with a {expected_vocab_size}-token tokenizer"
            )
        self._check_tokenizer()
        self._tokens = self._open_split(verify_checksums)
        lengths = np.array([len(t) for t in self._tokens], dtype=np.int64)
        self._ends = np.cumsum(lengths)  # token offset where each shard ends in the split's stream
        self.n_tokens = int(self._ends[-1])
        self.n_samples = max(self.n_tokens - 1, 0) // seq_len
        need = self.global_batch_samples
        if self.n_samples < need:
            raise UserError(
                f"the {split} split of {self.data_dir} has {self.n_tokens:,} tokens, fewer than one global batch "
                f"needs ({need} samples x {seq_len} + 1 = {need * seq_len + 1:,} tokens for dp_size {dp_size} x "
                f"micro_batch_size {micro_batch_size}); prepare more data"
                + (" or a larger --val-fraction" if split == "val" else "") + ", or use a smaller batch or seq_len"
            )
        self.position = 0  # samples consumed by all dp ranks together, across epochs
        self._perms: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ opening

    def _check_tokenizer(self) -> None:
        """A tokenizer.model retrained in place would no longer match these shards' ids."""
        path = self.data_dir / "tokenizer.model"
        if path.is_file() and sha256_file(path) != self.manifest["tokenizer"]["sha256"]:
            raise UserError(
                f"{path} is not the tokenizer these shards were made with (it was replaced after "
                f"`llama-dist prepare`); rerun prepare with it, into {self.data_dir}"
            )

    def _open_split(self, verify: bool) -> list[np.ndarray]:
        entries = [s for s in self.manifest["shards"] if s["split"] == self.split]
        if not entries:
            found = sorted({s["split"] for s in self.manifest["shards"]})
            hint = "; prepare with --val-fraction > 0 and more documents" if self.split == "val" else ""
            raise UserError(f"{self.data_dir} has no '{self.split}' split (it has: {', '.join(found) or 'none'}){hint}")
        allow_open_files(len(entries), f"the {self.split} split of {self.data_dir}")
        expected_dtype = np.dtype(self.manifest["dtype"])
        arrays = []
        for entry in entries:
            path = self.data_dir / entry["file"]
            if not path.is_file():
                raise UserError(f"shard {path} listed in the manifest is missing; rerun llama-dist prepare")
            header = shards.read_header(path)
            if header.count != entry["tokens"] or header.dtype != expected_dtype:
                raise UserError(
                    f"{path} holds {header.count} {header.dtype.name} tokens but the manifest lists "
                    f"{entry['tokens']} {expected_dtype.name}; rerun llama-dist prepare"
                )
            if verify and sha256_file(path) != entry["sha256"]:
                raise UserError(f"{path} is corrupted (sha256 differs from the manifest); rerun llama-dist prepare")
            arrays.append(shards.open_shard(path))
        return arrays

    # ------------------------------------------------------------------ sizes

    @property
    def global_batch_samples(self) -> int:
        return self.micro_batch_size * self.dp_size

    @property
    def tokens_per_batch(self) -> int:
        """Tokens in one batch of this rank."""
        return self.micro_batch_size * self.seq_len

    @property
    def tokens_per_step(self) -> int:
        """Tokens all dp ranks together consume per step."""
        return self.global_batch_samples * self.seq_len

    @property
    def batches_per_epoch(self) -> int:
        return self.n_samples // self.global_batch_samples

    @property
    def epoch(self) -> int:
        return self.position // self.n_samples

    # ------------------------------------------------------------------ order

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # 4 bytes a sample (200 MB for 100B tokens at seq_len 2048), shuffled in place
            dtype = np.int32 if self.n_samples < 2**31 else np.int64
            perm = np.arange(self.n_samples, dtype=dtype)
            np.random.default_rng([self.seed % 2**63, epoch]).shuffle(perm)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}  # a batch may straddle two
            self._perms[epoch] = perm
        return self._perms[epoch]

    def sample_indices(self, position: int, count: int) -> np.ndarray:
        """Sample ids at global positions position .. position + count - 1."""
        positions = np.arange(position, position + count, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.n_samples)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs).tolist():
            mask = epochs == epoch
            out[mask] = self._permutation(epoch)[offsets[mask]]
        return out

    def _read(self, start: int, length: int, out: np.ndarray) -> None:
        """Tokens [start, start + length) of the split's stream, across shard ends if need be."""
        shard = int(np.searchsorted(self._ends, start, side="right"))
        filled = 0
        while filled < length:
            shard_start = int(self._ends[shard - 1]) if shard else 0
            lo = start + filled - shard_start
            take = min(length - filled, len(self._tokens[shard]) - lo)
            out[filled : filled + take] = self._tokens[shard][lo : lo + take]
            filled += take
            shard += 1

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.position + self.dp_rank * self.micro_batch_size
        samples = self.sample_indices(first, self.micro_batch_size)
        window = np.empty((self.micro_batch_size, self.seq_len + 1), dtype=np.int64)
        for row, sample in enumerate(samples.tolist()):
            self._read(sample * self.seq_len, self.seq_len + 1, window[row])
        self.position += self.global_batch_samples
        batch = torch.from_numpy(window)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    # ------------------------------------------------------------------ resuming

    def data_fingerprint(self) -> str:
        """Identifies this split's tokens: the shard checksums from the manifest."""
        digest = hashlib.sha256()
        for entry in self.manifest["shards"]:
            if entry["split"] == self.split:
                digest.update(entry["sha256"].encode())
        return digest.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON types; the same on every rank, since the position is global."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "position": self.position,
            "epoch": self.epoch,
            "sample_in_epoch": self.position % self.n_samples,
            "n_samples": self.n_samples,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "data": self.data_fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved global position, whatever dp_size or micro_batch_size saved it."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"loader state version {state.get('version')} is not {STATE_VERSION}; cannot resume it")
        for key in ("split", "seq_len", "seed"):
            if state[key] != getattr(self, key):
                raise UserError(
                    f"the saved loader state has {key}={state[key]!r} but this run uses {getattr(self, key)!r}; "
                    f"keep {key} unchanged to resume the data order"
                )
        if state["data"] != self.data_fingerprint():
            raise UserError(
                f"the {self.split} split of {self.data_dir} changed since this state was saved "
                f"({state['n_samples']:,} samples then, {self.n_samples:,} now); resume with the data it was saved on"
            )
        self.position = int(state["position"])
