"""Reshard's write paths: the torch.save fallback, the CRC-32s, the staging ring, kernel
copies on and off, and how much memory a whole reshard holds."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_dist.reshard import reshard
from reshard_helpers import LLAMA2, assert_committed_checkpoint, assert_same, load, model_weights, write_checkpoint


def test_plain_torch_save_fallback_writes_the_same_tensors(tmp_path, training_ckpt, monkeypatch):
    from llama_dist import streamed_save

    src, weights, optimizer = training_ckpt
    reshard(src, tmp_path / "streamed", 2)
    monkeypatch.setattr(streamed_save, "_STREAMING_SAVE", False)
    reshard(src, tmp_path / "plain", 2)
    for name in ("consolidated.00.pth", "consolidated.01.pth", "optimizer.00.pt", "optimizer.01.pt"):
        assert_same(load(tmp_path / "plain" / name), load(tmp_path / "streamed" / name))
    assert_committed_checkpoint(tmp_path / "plain")


def test_writeback_is_started_for_every_block_as_it_is_written(tmp_path, monkeypatch):
    """So that the disk works while the rest is hashed and written, not only at the fsync."""
    import os

    from llama_dist import files, streamed_save

    tensors = {"w": torch.randn(300, 200), "norm": torch.randn(7), "step": torch.tensor(3.0)}
    started = []
    monkeypatch.setattr(streamed_save, "start_writeback", lambda fd, pos, nbytes: started.append((pos, nbytes)))
    path = tmp_path / "shard.pth"
    streamed_save.save_streamed(path, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()},
                                lambda key: iter([tensors[key]]))
    holes = streamed_save.storage_records(path)
    assert sorted(started) == sorted((hole.start, hole.nbytes) for hole in holes.values())
    assert_same(load(path), tensors)
    # best effort: a call the kernel refuses (here a closed descriptor) is no error
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    files.start_writeback(fd, 0, 4096)


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
                                     "one file at a time", "pwrite in pieces of 100 bytes"])
def test_every_write_path_gives_the_same_checkpoint(tmp_path, training_ckpt, monkeypatch, variant):
    """Blocks of 256 bytes (many CRC-32s combined per record, source pages released after
    every block), kernel copies off or failing, torch.load instead of the zip layout,
    destination files one after another instead of in threads at once, every pwrite cut
    short at 100 bytes."""
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
    elif variant.startswith("pwrite"):
        monkeypatch.setattr(streamed_save, "_COPY_FILE_RANGE", False)  # every byte through _pwrite_all
        monkeypatch.setattr(streamed_save, "WRITE_PIECE", 100)
    else:
        monkeypatch.setattr(sharded_source, "storage_records", lambda path: None)
    located.clear()
    reshard(src, tmp_path / "variant", 2)
    assert bool(located) == variant.startswith(("small", "copy_file_range", "no copy", "one file", "pwrite"))
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
