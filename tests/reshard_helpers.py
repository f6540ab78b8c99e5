"""Checkpoints for the reshard tests: reference shards cut with torch.chunk on a split
table written out here, not with the code under test, and checks of what a reshard wrote."""

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import torch

from llama_dist.config import Config
from llama_dist.distributed import init_distributed, seed_everything
from llama_dist.meta_format import write_params
from llama_dist.model import ModelArgs, Transformer

LLAMA2 = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=96, multiple_of=16, max_seq_len=32)
LLAMA3 = dataclasses.replace(LLAMA2, rope_theta=500000.0)


def split_dim(key: str, llama3: bool):
    """Meta's layout (META_FORMAT.md), written out independently of meta_format.shard_dim."""
    if key == "tok_embeddings.weight":
        return 0 if llama3 else 1
    if key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    if key.endswith("norm.weight"):
        return None
    return 0  # wq, wk, wv, w1, w3, output


def model_weights(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    init_distributed(mp=1, backend="gloo", device="cpu")
    seed_everything(seed)
    return {k: v.detach().clone() for k, v in Transformer(args).state_dict().items()}


def optimizer_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    state = {}
    for name, w in weights.items():
        state[f"exp_avg/{name}"] = torch.randn(w.shape, generator=gen)
        state[f"exp_avg_sq/{name}"] = torch.rand(w.shape, generator=gen)
        state[f"step/{name}"] = torch.tensor(7.0)
    return state


def split(state: dict[str, torch.Tensor], mp: int, llama3: bool) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for key, tensor in state.items():
        dim = split_dim(key.split("/", 1)[-1], llama3)
        parts = [tensor] * mp if dim is None or tensor.dim() == 0 else torch.chunk(tensor, mp, dim=dim)
        for rank in range(mp):
            shards[rank][key] = parts[rank].clone()
    return shards


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_checkpoint(path: Path, args: ModelArgs, weights: dict, mp: int, optimizer=None, commit=True) -> Path:
    """A checkpoint directory as docs/checkpoint-format.md describes (a release dir without `optimizer`)."""
    path.mkdir(parents=True)
    llama3 = args.rope_theta is not None
    for rank, shard in enumerate(split(weights, mp, llama3)):
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")
    write_params(path, args)
    (path / "tokenizer.model").write_bytes(b"\x0a\x05fake sentencepiece model bytes")
    if optimizer is None:
        return path
    for rank, shard in enumerate(split(optimizer, mp, llama3)):
        torch.save(shard, path / f"optimizer.{rank:02d}.pt")
    for rank in range(mp):
        torch.save({"torch": torch.get_rng_state()}, path / f"rng.{rank:05d}.pt")
    state = {"step": 7, "tokens_seen": 7168, "skipped_steps": 0, "mp": mp, "dp": 1, "world_size": mp,
             "loader": {"epoch": 0, "position": 56}, "scheduler": {"step": 7}}
    (path / "train_state.json").write_text(json.dumps(state))
    config = Config(model=args)
    config.parallel.mp = mp
    (path / "config.yaml").write_text(config.to_yaml())
    files = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size} for p in sorted(path.iterdir())}
    (path / "manifest.json").write_text(json.dumps({"files": files}))
    if commit:
        (path / "COMMITTED").write_text("")
    return path


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def assert_same(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


def assert_committed_checkpoint(path: Path) -> None:
    """Manifest hashes match the files (hashed here), zip CRCs are valid, COMMITTED exists."""
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    on_disk = {p.name for p in path.iterdir()} - {"manifest.json", "COMMITTED"}
    assert set(manifest) == on_disk
    for name, entry in manifest.items():
        assert entry == {"sha256": sha256(path / name), "bytes": (path / name).stat().st_size}, name
    assert (path / "COMMITTED").exists()
    for name in on_disk:
        if name.endswith((".pth", ".pt")):
            with zipfile.ZipFile(path / name) as zf:
                assert zf.testzip() is None, name
    assert not list(path.parent.glob(f"{path.name}.tmp-*"))
