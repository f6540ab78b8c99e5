"""Reshard: bit-for-bit round trips, both embedding layouts, the training state, each
check's message, atomic output, and the same logits from resharded shards in real
gloo ranks. Reference shards are cut here with torch.chunk on a split table written
out below, not with the code under test."""

import argparse
import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from multiproc import run_ranks

from llama_dist.cli import main as llama_dist_main
from llama_dist.config import Config
from llama_dist.distributed import init_distributed, seed_everything
from llama_dist.errors import UserError
from llama_dist.meta_format import read_params, write_params
from llama_dist.model import ModelArgs, Transformer
from llama_dist.reshard import reshard
from llama_dist.sharded_source import load_merged_state_dict

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
    init_distributed(mp=1)
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


@pytest.fixture()
def training_ckpt(tmp_path):
    weights = model_weights(LLAMA2)
    optimizer = optimizer_state(weights)
    return write_checkpoint(tmp_path / "mp1", LLAMA2, weights, 1, optimizer), weights, optimizer


def test_round_trip_1_2_4_1_is_bit_for_bit(tmp_path, training_ckpt):
    src, weights, optimizer = training_ckpt
    previous = src
    for mp in (2, 4, 1):
        dst = tmp_path / f"to{mp}"
        reshard(previous, dst, mp)
        for rank, (w, o) in enumerate(zip(split(weights, mp, False), split(optimizer, mp, False))):
            assert_same(load(dst / f"consolidated.{rank:02d}.pth"), w)
            assert_same(load(dst / f"optimizer.{rank:02d}.pt"), o)
        assert sorted(p.name for p in dst.glob("*.pth")) == [f"consolidated.{r:02d}.pth" for r in range(mp)]
        state = json.loads((dst / "train_state.json").read_text())
        assert state == {**json.loads((src / "train_state.json").read_text()), "mp": mp, "world_size": mp}
        config = yaml.safe_load((dst / "config.yaml").read_text())
        assert config == {**yaml.safe_load((src / "config.yaml").read_text()),
                          "parallel": {"mp": mp, "dp": -1, "backend": "auto"}}
        assert (dst / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
        assert (dst / "params.json").read_text() == (src / "params.json").read_text()
        assert not list(dst.glob("rng.*"))
        assert_committed_checkpoint(dst)
        previous = dst
    assert_same(load_merged_state_dict(tmp_path / "to4"), weights)


def test_llama3_splits_the_embedding_on_the_vocabulary(tmp_path):
    weights = model_weights(LLAMA3)
    src = write_checkpoint(tmp_path / "mp1", LLAMA3, weights, 1)
    reshard(src, tmp_path / "mp2", 2)
    shard = load(tmp_path / "mp2" / "consolidated.01.pth")
    assert shard["tok_embeddings.weight"].shape == (LLAMA3.vocab_size // 2, LLAMA3.dim)
    assert torch.equal(shard["tok_embeddings.weight"], weights["tok_embeddings.weight"][48:])
    assert_same(shard, split(weights, 2, llama3=True)[1])
    reshard(tmp_path / "mp2", tmp_path / "back", 1)
    assert_same(load(tmp_path / "back" / "consolidated.00.pth"), weights)
    # a release directory gets a manifest and a commit marker too, but no training files
    assert {p.name for p in (tmp_path / "back").iterdir()} == {
        "consolidated.00.pth", "params.json", "tokenizer.model", "manifest.json", "COMMITTED"}


def test_llama2_splits_the_embedding_on_the_model_dimension(tmp_path):
    weights = model_weights(LLAMA2)
    reshard(write_checkpoint(tmp_path / "mp1", LLAMA2, weights, 1), tmp_path / "mp2", 2)
    shard = load(tmp_path / "mp2" / "consolidated.00.pth")
    assert shard["tok_embeddings.weight"].shape == (LLAMA2.vocab_size, LLAMA2.dim // 2)
    assert torch.equal(shard["tok_embeddings.weight"], weights["tok_embeddings.weight"][:, :32])


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_casts_weights_but_not_optimizer_moments(tmp_path, training_ckpt, dtype, torch_dtype):
    src, weights, optimizer = training_ckpt
    reshard(src, tmp_path / "cast", 2, dtype=dtype)
    for rank in range(2):
        expected = {k: v.to(torch_dtype) for k, v in split(weights, 2, False)[rank].items()}
        assert_same(load(tmp_path / "cast" / f"consolidated.{rank:02d}.pth"), expected)
        assert_same(load(tmp_path / "cast" / f"optimizer.{rank:02d}.pt"), split(optimizer, 2, False)[rank])


def test_llama1_rope_freqs_are_dropped(tmp_path):
    weights = model_weights(LLAMA2)
    src = write_checkpoint(tmp_path / "mp2", LLAMA2, weights, 2)
    freqs = torch.randn(LLAMA2.head_dim // 2, 2)
    for path in src.glob("*.pth"):
        torch.save({**load(path), "rope.freqs": freqs}, path)
    reshard(src, tmp_path / "mp1", 1)
    assert_same(load(tmp_path / "mp1" / "consolidated.00.pth"), weights)


def test_plain_torch_save_fallback_writes_the_same_tensors(tmp_path, training_ckpt, monkeypatch):
    from llama_dist import streamed_save

    src, weights, optimizer = training_ckpt
    reshard(src, tmp_path / "streamed", 2)
    monkeypatch.setattr(streamed_save, "_STREAMING_SAVE", False)
    reshard(src, tmp_path / "plain", 2)
    for name in ("consolidated.00.pth", "consolidated.01.pth", "optimizer.00.pt", "optimizer.01.pt"):
        assert_same(load(tmp_path / "plain" / name), load(tmp_path / "streamed" / name))
    assert_committed_checkpoint(tmp_path / "plain")


def test_crc32_and_crc32_combine_match_zlib_on_the_joined_bytes():
    import os
    import random
    import zlib

    from llama_dist.streamed_save import crc32, crc32_combine

    rng = random.Random(0)
    for len_b in (0, 1, 7, 64, 4096, 100_003):
        a, b = os.urandom(rng.randrange(0, 3000)), os.urandom(len_b)
        assert crc32(memoryview(b)) == zlib.crc32(b), len_b  # zlib-ng's, where installed
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b), len_b


def test_staging_copies_only_what_it_must_into_buffers_it_reuses():
    from llama_dist.streamed_save import IN_FLIGHT, _Staging

    staging, whole = _Staging(), torch.arange(24.0).view(4, 6)
    assert staging.assemble(whole, torch.float32) is whole  # contiguous, right dtype: no copy
    left, right = whole[:, :2], whole[:, 2:]
    joined = staging.assemble([left, right], torch.float32)
    assert torch.equal(joined, whole) and joined.data_ptr() != whole.data_ptr()
    assert torch.equal(staging.assemble(right, torch.float32), right)  # a strided view, made contiguous
    cast = staging.assemble([left, right], torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, whole.to(torch.bfloat16))
    pointers = [staging.assemble(right, torch.float32).data_ptr() for _ in range(2 * (IN_FLIGHT + 1))]
    assert len(set(pointers)) == IN_FLIGHT + 1 and pointers[: IN_FLIGHT + 1] == pointers[IN_FLIGHT + 1:]


@pytest.mark.parametrize("variant", ["small blocks, eager page release", "no copy_file_range",
                                     "copy_file_range fails", "sources of an unknown layout",
                                     "one file at a time"])
def test_every_write_path_gives_the_same_checkpoint(tmp_path, training_ckpt, monkeypatch, variant):
    """Blocks of 256 bytes (many CRC-32s combined per record, source pages released after
    every block), kernel copies off or failing, torch.load instead of the zip layout,
    destination files one after another instead of in threads at once."""
    import errno

    from llama_dist import reshard as reshard_module
    from llama_dist import sharded_source, streamed_save

    src, _, _ = training_ckpt
    located = []
    real_copy = streamed_save._copy_range
    monkeypatch.setattr(streamed_save, "_copy_range", lambda *a: located.append(1) or real_copy(*a))
    reshard(src, tmp_path / "reference", 2)
    assert located, "contiguous pieces of a mapped source should be located in their file"

    if variant.startswith("small"):
        monkeypatch.setattr(reshard_module, "CHUNK_BYTES", 256)
        monkeypatch.setattr(sharded_source, "RELEASE_LAG", 0)
        monkeypatch.setattr(streamed_save, "IN_FLIGHT", 1)  # staging buffers come round every other block
    elif variant == "no copy_file_range":
        monkeypatch.setattr(streamed_save, "_COPY_FILE_RANGE", False)
    elif variant == "copy_file_range fails":
        def cross_device(*_):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr(streamed_save.os, "copy_file_range", cross_device, raising=False)
        monkeypatch.setattr(streamed_save, "_COPY_FILE_RANGE", True)
    elif variant == "one file at a time":
        monkeypatch.setattr(reshard_module, "PARALLEL_FILES", 1)
    else:
        monkeypatch.setattr(sharded_source, "storage_records", lambda path: None)
    located.clear()
    reshard(src, tmp_path / "variant", 2)
    assert bool(located) == variant.startswith(("small", "copy_file_range", "no copy", "one file"))
    for name in ("consolidated.00.pth", "consolidated.01.pth", "optimizer.00.pt", "optimizer.01.pt"):
        assert (tmp_path / "variant" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert_committed_checkpoint(tmp_path / "variant")
    reshard(tmp_path / "variant", tmp_path / "back", 1)
    assert_same(load(tmp_path / "back" / "consolidated.00.pth"), load(src / "consolidated.00.pth"))


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from Linux's /proc")
def test_pages_read_from_a_source_leave_the_resident_set(tmp_path, monkeypatch):
    from llama_dist import sharded_source
    from llama_dist.meta_format import load_shard

    def resident_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20

    torch.save({"w": torch.randn(16 << 20)}, tmp_path / "big.pth")  # 64 MiB
    files = sharded_source.Sharded([tmp_path / "big.pth"], load_shard, {"w": torch.Size([16 << 20])},
                                    {"w": torch.float32}, {"w": None})
    sources = sharded_source.MappedSources(files)
    weight = sources.tensors("w")[0]
    before = resident_mib()
    total = weight.sum().item()  # reads every page through the mapping
    assert resident_mib() - before > 48
    monkeypatch.setattr(sharded_source, "RELEASE_LAG", 0)
    sources.done_with(weight)
    assert resident_mib() - before < 16
    assert weight.sum().item() == total  # released pages read back from the page cache
    sources.close()


PEAK_PROBE = """
import re, sys
from pathlib import Path
from llama_dist import reshard, sharded_source

def status_kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

# the bounds a 4 GB checkpoint meets at 32 MiB and 256 MiB, scaled down to this one
reshard.CHUNK_BYTES, sharded_source.RELEASE_LAG = 1 << 20, 8 << 20
try:
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
except OSError:  # a kernel or sandbox that refuses it
    sys.exit(print("no clear_refs"))
before = status_kib("VmRSS")
reshard.reshard(sys.argv[1], sys.argv[2], int(sys.argv[3]))
print((status_kib("VmHWM") - before) * 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from Linux's /proc")
def test_a_whole_reshard_holds_a_small_part_of_the_checkpoint(tmp_path):
    """Streaming end to end, in a fresh process: the peak resident set grows by far less than
    the checkpoint, both merging (2 -> 1, rows stitched on dim 1) and splitting (1 -> 2)."""
    args = dataclasses.replace(LLAMA2, dim=512, n_layers=6, n_heads=8, n_kv_heads=8, vocab_size=32000,
                               multiple_of=256)
    src = write_checkpoint(tmp_path / "mp2", args, model_weights(args), 2)
    size = sum(p.stat().st_size for p in src.glob("*.pth"))
    assert size > 200e6
    for source, dst, mp in ((src, tmp_path / "mp1", 1), (tmp_path / "mp1", tmp_path / "mp2-again", 2)):
        out = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(source), str(dst), str(mp)],
                             capture_output=True, text=True, check=True).stdout
        if out.startswith("no clear_refs"):
            pytest.skip("this kernel does not let a process reset its peak resident set")
        grown = int(out.split()[-1])
        assert grown < size / 4, f"reshard to mp={mp}: the resident set grew by {grown / 1e6:.0f} MB " \
                                 f"for a {size / 1e6:.0f} MB checkpoint"


def test_source_is_never_touched(tmp_path, training_ckpt):
    src, _, _ = training_ckpt
    before = {p.name: (sha256(p), p.stat().st_mtime_ns) for p in src.iterdir()}
    reshard(src, tmp_path / "out", 2, dtype="bf16")
    with pytest.raises(UserError):
        reshard(src, tmp_path / "bad", 3)
    assert {p.name: (sha256(p), p.stat().st_mtime_ns) for p in src.iterdir()} == before


def test_strided_tensors_are_read_as_tensors_not_as_their_storage(tmp_path):
    """A transposed view fills its storage like a contiguous tensor, in another order: the
    byte-level fast path must not take it for one."""
    weights = model_weights(LLAMA2)
    key = "layers.0.attention.wo.weight"  # square, so its transpose fits the same shape
    weights[key] = weights[key].t().contiguous().t()
    assert not weights[key].is_contiguous()
    src = write_checkpoint(tmp_path / "src", LLAMA2, weights, 1)
    assert not load(src / "consolidated.00.pth")[key].is_contiguous()
    reshard(src, tmp_path / "mp2", 2)
    reshard(tmp_path / "mp2", tmp_path / "back", 1)
    assert torch.equal(load(tmp_path / "back" / "consolidated.00.pth")[key], weights[key])


def test_corrupt_source_is_refused_unless_no_verify(tmp_path):
    src, _ = _break("corrupt", tmp_path)
    with pytest.raises(UserError, match="does not match its sha256"):
        reshard(src, tmp_path / "checked", 1)
    reshard(src, tmp_path / "as_is", 1, verify=False)
    changed = load(src / "consolidated.01.pth")["layers.1.feed_forward.w2.weight"]
    merged = load(tmp_path / "as_is" / "consolidated.00.pth")["layers.1.feed_forward.w2.weight"]
    assert torch.equal(merged[:, merged.shape[1] // 2 :], changed)  # the file as it is, w2 split on dim 1
    assert llama_dist_main(["reshard", str(src), str(tmp_path / "cli"), "--mp", "1", "--no-verify"]) == 0


def test_non_empty_destination_needs_force(tmp_path, training_ckpt):
    src, weights, _ = training_ckpt
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"is not empty; .*--force"):
        reshard(src, dst, 2)
    assert (dst / "precious.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="overlaps the source"):
        reshard(src, src, 2, force=True)
    with pytest.raises(UserError, match="overlaps the source"):
        reshard(src, tmp_path, 2, force=True)  # replacing a parent would delete SRC
    reshard(src, dst, 2, force=True)
    assert not (dst / "precious.txt").exists()
    assert_same(load(dst / "consolidated.00.pth"), split(weights, 2, False)[0])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("dst")] == ["dst"]
    (tmp_path / "empty").mkdir()
    reshard(src, tmp_path / "empty", 1)  # an empty directory is fine without --force


def _break(kind: str, tmp_path: Path):
    """A checkpoint with one mistake; returns (source, mp)."""
    args, mp = LLAMA2, 2
    shards = 1 if kind == "vocab" else 2  # 97 rows do not split evenly
    if kind == "n_kv_heads":
        args, mp = dataclasses.replace(LLAMA2, n_kv_heads=2), 4
    elif kind == "ffn":  # FFN width int(2*4*64/3) = 170, a multiple of 10
        args, mp = dataclasses.replace(LLAMA2, n_heads=4, n_kv_heads=None, multiple_of=10), 4
    elif kind == "vocab":
        args = dataclasses.replace(LLAMA2, vocab_size=97)
    elif kind == "dim":  # 8 heads of 8 in a 66-wide model: only the Llama 2 embedding splits dim
        args, mp = dataclasses.replace(LLAMA2, dim=66), 4
    elif kind == "n_heads":
        mp = 3
    weights = model_weights(args)
    training = kind in ("optimizer", "uncommitted", "corrupt")
    src = write_checkpoint(tmp_path / "src", args, weights, shards, optimizer_state(weights) if training else None,
                           commit=kind != "uncommitted")
    if kind == "missing_shard":
        reshard(src, tmp_path / "four", 4)
        src = tmp_path / "four"
        (src / "consolidated.01.pth").unlink()
        (src / "consolidated.03.pth").unlink()
    elif kind == "shapes":
        shard = load(src / "consolidated.01.pth")
        shard["layers.1.attention.wq.weight"] = shard["layers.1.attention.wq.weight"][:4]
        torch.save(shard, src / "consolidated.01.pth")
    elif kind == "norms":
        shard = load(src / "consolidated.01.pth")
        shard["layers.0.ffn_norm.weight"] += 0.5
        torch.save(shard, src / "consolidated.01.pth")
    elif kind == "params_missing":
        (src / "params.json").unlink()
    elif kind == "params_mismatch":
        write_params(src, dataclasses.replace(args, n_layers=3))
    elif kind == "not_meta":
        torch.save({"model": load(src / "consolidated.00.pth")}, src / "consolidated.00.pth")
    elif kind == "pickled":  # an object that only code can rebuild, which weights_only refuses
        torch.save({**load(src / "consolidated.00.pth"), "args": argparse.Namespace(lr=1)},
                   src / "consolidated.00.pth")
    elif kind == "corrupt":  # one weight changed after the manifest was written
        shard = load(src / "consolidated.01.pth")
        shard["layers.1.feed_forward.w2.weight"][0, 0] += 1
        torch.save(shard, src / "consolidated.01.pth")
    elif kind == "optimizer":
        (src / "optimizer.01.pt").unlink()
    return src, mp


CHECKS = {
    "n_heads": r"--mp 3 does not divide n_heads=8; valid --mp values for this model: 1, 2, 4$",
    "n_kv_heads": r"--mp 4 does not divide n_kv_heads=2; valid --mp values for this model: 1, 2$",
    "ffn": r"--mp 4 does not divide the FFN width=170",
    "vocab": r"--mp 2 does not divide vocab_size=97",
    "dim": r"--mp 4 does not divide dim=66",
    "missing_shard": r"consolidated.00.pth, consolidated.02.pth; expected .* none missing",
    "shapes": r"'layers.1.attention.wq.weight' is \(4, 64\) .* in consolidated.01.pth but \(32, 64\)",
    "norms": r"'layers.0.ffn_norm.weight' is replicated but differs between consolidated.00.pth and "
             r"consolidated.01.pth",
    "params_missing": r"params.json is missing",
    "params_mismatch": r"lack 'layers.2.attention.wq.weight'; params.json \(n_layers=3\) does not belong",
    "not_meta": r"consolidated.00.pth is not a Meta-format state dict",
    "pickled": r"consolidated.00.pth is not a readable torch checkpoint \(it holds more than tensors "
               r"\(Unsupported global: GLOBAL argparse.Namespace .*weights_only=True",
    "corrupt": r"consolidated.01.pth does not match its sha256 in manifest.json: the file is corrupt; "
               r"reshard an earlier checkpoint, or pass --no-verify",
    "optimizer": r"has optimizer.00.pt but 2 model shards",
    "uncommitted": r"no COMMITTED marker",
}


@pytest.mark.parametrize("kind", list(CHECKS))
def test_each_check_is_one_clear_line(tmp_path, kind):
    src, mp = _break(kind, tmp_path)
    dst = tmp_path / "dst"
    with pytest.raises(UserError) as err:
        reshard(src, dst, mp)
    message = str(err.value)
    assert re.search(CHECKS[kind], message), message
    assert "\n" not in message
    assert not dst.exists() and not list(tmp_path.glob("dst.tmp-*"))


def test_cli_prints_one_line_and_exit_code(tmp_path, capsys):
    src = write_checkpoint(tmp_path / "src", LLAMA2, model_weights(LLAMA2), 1)
    assert llama_dist_main(["reshard", str(src), str(tmp_path / "bad"), "--mp", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not divide n_heads=8" in err
    assert llama_dist_main(["reshard", str(src), str(tmp_path / "ok"), "--mp", "2", "--dtype", "bf16"]) == 0
    assert load(tmp_path / "ok" / "consolidated.00.pth")["output.weight"].dtype == torch.bfloat16


def _rank_logits(ckpt_dirs: list[str], tokens: torch.Tensor) -> list[torch.Tensor]:
    info = init_distributed(mp=2)
    logits = []
    for ckpt in ckpt_dirs:
        model = Transformer(read_params(ckpt, max_seq_len=32, max_batch_size=2))
        model.load_state_dict(load(Path(ckpt) / f"consolidated.{info.mp_rank:02d}.pth"), strict=True)
        with torch.no_grad():
            logits.append(model.eval()(tokens))
    return logits


def test_resharded_checkpoint_gives_the_same_logits_in_gloo_ranks(tmp_path):
    tokens = torch.randint(0, LLAMA2.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    expected, resharded = [], []
    for name, args in (("llama2", LLAMA2), ("llama3", LLAMA3)):
        src = write_checkpoint(tmp_path / name, args, model_weights(args, seed=5), 1)
        model = Transformer(read_params(src, max_seq_len=32, max_batch_size=2))
        model.load_state_dict(load(src / "consolidated.00.pth"), strict=True)
        with torch.no_grad():
            expected.append(model.eval()(tokens))
        reshard(src, tmp_path / f"{name}-mp2", 2)
        resharded.append(str(tmp_path / f"{name}-mp2"))
    for rank_logits in run_ranks(_rank_logits, 2, resharded, tokens):
        for got, want in zip(rank_logits, expected):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
