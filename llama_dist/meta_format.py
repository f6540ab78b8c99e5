"""Meta's checkpoint directory: `consolidated.NN.pth` per model-parallel rank + `params.json`.

Facts we match (see Meta's `Llama.build`): it globs `*.pth`, sorts them, needs
`MP == len(checkpoints)`, loads `checkpoints[mp_rank]` and builds
`ModelArgs(**params)`. So the directory holds no other `*.pth` file, a shard is a
flat dict of tensors keyed by Meta's names, and params.json has only Meta's keys.
Only load_shard imports torch, when called: the reshard reads shards without it.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Iterable, Optional

from llama_dist.checkpoint_files import PARAMS_FILE, SHARD_NAME, TOKENIZER_FILE, shard_file  # noqa: F401 - Meta's names, here too
from llama_dist.errors import UserError, load_error_reason
from llama_dist.files import atomic_write_text
from llama_dist.model_args import ModelArgs
from llama_dist.streamed_save import save_streamed
from llama_dist.torch_file import as_numpy, dtype_of

META_KEY = re.compile(
    r"^(tok_embeddings\.weight|norm\.weight|output\.weight|rope\.freqs|"
    r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123]|attention_norm|ffn_norm)\.weight)$"
)
COLUMN_PARALLEL = ("attention.wq.", "attention.wk.", "attention.wv.", "feed_forward.w1.",
                   "feed_forward.w3.", "output.")
ROW_PARALLEL = ("attention.wo.", "feed_forward.w2.")


def _shard_order(path: Path) -> tuple:
    """Shards by number, not by name: past 100 shards `consolidated.100.pth` sorts before `.11.`."""
    match = SHARD_NAME.match(path.name)
    return (0, int(match.group(1)), path.name) if match else (1, 0, path.name)


def shard_paths(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The `*.pth` files in shard order (Meta's sorted order below 101), checked to be consolidated.00 .. NN."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise UserError(f"checkpoint directory {ckpt_dir} does not exist")
    paths = sorted(ckpt_dir.glob("*.pth"), key=_shard_order)
    if not paths:
        raise UserError(f"no consolidated.*.pth shards in {ckpt_dir}; is this a checkpoint directory?")
    for index, path in enumerate(paths):
        match = SHARD_NAME.match(path.name)
        if not match or int(match.group(1)) != index:
            names = ", ".join(p.name for p in paths)
            raise UserError(
                f"{ckpt_dir} has *.pth files {names}; expected consolidated.00.pth .. "
                f"consolidated.{len(paths) - 1:02d}.pth with none missing or extra"
            )
    return paths


def read_params(ckpt_dir: str | os.PathLike, **sizes: int) -> ModelArgs:
    """params.json as ModelArgs; `sizes` may add max_seq_len and max_batch_size, as Meta's build does."""
    path = Path(ckpt_dir) / PARAMS_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing; a Meta-format checkpoint needs params.json beside its shards")
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(params, dict):
        raise UserError(f"{path} holds {type(params).__name__}, not an object of Meta's ModelArgs keys")
    try:
        args = ModelArgs(**params, **sizes)
    except TypeError as err:
        raise UserError(f"{path} has a key Meta's ModelArgs does not know ({err})") from None
    check_params(path, args)
    return args


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no layer count


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_params(path: str | os.PathLike, args: ModelArgs) -> None:
    """Sizes the model can be built with: a string, 0 or a head count that does not divide would
    otherwise surface later as a TypeError or ZeroDivisionError deep inside the model."""
    def bad(key: str, value, want: str) -> UserError:
        return UserError(f"{path} has {key}={json.dumps(value)}; it must be {want}")

    for key in ("dim", "n_layers", "n_heads", "multiple_of"):
        value = getattr(args, key)
        if not _is_int(value) or value <= 0:
            raise bad(key, value, "a positive integer")
    if args.n_kv_heads is not None and (not _is_int(args.n_kv_heads) or args.n_kv_heads <= 0):
        raise bad("n_kv_heads", args.n_kv_heads, "a positive integer (or absent, for one per head)")
    # Meta's Llama 2 releases say -1: the vocabulary is the tokenizer's, filled in on load
    if not _is_int(args.vocab_size) or (args.vocab_size <= 0 and args.vocab_size != -1):
        raise bad("vocab_size", args.vocab_size, "a positive integer, or -1 for the tokenizer's")
    for key in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
        value = getattr(args, key)
        optional = key != "norm_eps"  # None is Meta's default for the other two
        if (value is not None or not optional) and (not _is_number(value) or not 0 < value < float("inf")):
            raise bad(key, value, "a positive number" + (" (or absent)" if optional else ""))
    if not isinstance(args.use_scaled_rope, bool):
        raise bad("use_scaled_rope", args.use_scaled_rope, "true or false")
    if args.use_scaled_rope and args.rope_theta is None:  # Meta's 3.1 code would assume theta 500000
        raise UserError(f"{path} has use_scaled_rope but no rope_theta; Llama 3.1's params.json has both")
    # dim need not divide evenly: like Meta's, the model's heads span n_heads * (dim // n_heads)
    if args.head_dim < 2 or args.head_dim % 2:
        raise UserError(f"{path} has dim={args.dim} and n_heads={args.n_heads}, a head width dim // n_heads of "
                        f"{args.head_dim}; the rotary embedding needs an even width of 2 or more: fix params.json")
    if args.n_heads % args.kv_heads:
        raise UserError(f"{path} has n_heads={args.n_heads}, which n_kv_heads={args.kv_heads} does not divide; "
                        f"fix params.json so that each key/value head serves n_heads / n_kv_heads")


def write_params(ckpt_dir: str | os.PathLike, args: ModelArgs) -> None:
    atomic_write_text(Path(ckpt_dir) / PARAMS_FILE, json.dumps(args.params_json(), indent=2) + "\n")


def shard_dim(key: str, args: ModelArgs) -> Optional[int]:
    """The dimension a weight is split on across model-parallel ranks; None if replicated."""
    if key == "tok_embeddings.weight":
        # Llama 3 (rope_theta set): VocabParallelEmbedding splits the vocabulary (dim 0);
        # Llama 2: ParallelEmbedding splits the embedding dimension (dim 1)
        return 0 if args.vocab_parallel_embedding else 1
    name = key.split(".", 2)[-1] if key.startswith("layers.") else key
    if name.startswith(COLUMN_PARALLEL):
        return 0
    if name.startswith(ROW_PARALLEL):
        return 1
    return None


def check_meta_keys(path: str | os.PathLike, keys: Iterable[str]) -> None:
    """Only Meta's names, which are strings: a shard saved as `{1: tensor}` is refused here too."""
    unknown = [k for k in keys if not isinstance(k, str) or not META_KEY.match(k)]
    if unknown:
        raise UserError(f"{path} is not a Meta-format state dict: unexpected key {unknown[0]!r}")


def load_shard(path: str | os.PathLike, mmap: bool = True) -> dict:
    """One shard (torch tensors), memory-mapped, that cannot run code; rejects anything but Meta's flat dict."""
    import torch

    # torch memory-maps only zip files; a legacy (pre-1.6 format) shard, which Meta's plain
    # torch.load reads, is read into memory instead of being refused
    if mmap and Path(path).is_file() and not zipfile.is_zipfile(path):
        mmap = False
    try:
        state = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle and zip errors alike mean a bad file
        raise UserError(f"{path} is not a readable torch checkpoint ({load_error_reason(err)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a Meta-format state dict (expected a flat dict of tensors)")
    check_meta_keys(path, state)
    return state


def save_shard(state: dict, path: str | os.PathLike) -> str:
    """A torch.load-able file of `state` (each tensor its own storage, as Meta's loader expects),
    written to NAME.tmp, synced and renamed; returns its sha256, hashed from memory while the
    bytes are written rather than read back afterwards."""
    specs = {key: (tuple(value.shape), dtype_of(value)) for key, value in state.items()}
    # one tensor at a time to the host: a GPU model is never copied whole
    return save_streamed(Path(path), specs, lambda key: iter([as_numpy(state[key].detach().cpu())]))
