"""Reshard's write paths: the CRC-32s, the staging buffer, O_DIRECT and the page cache,
and how much memory a whole reshard holds."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_dist.reshard import reshard
from reshard_helpers import LLAMA2, assert_committed_checkpoint, assert_same, load, model_weights, write_checkpoint


def _direct_io_works(directory: Path) -> bool:
    import os

    from llama_dist import streamed_save

    if not streamed_save.DIRECT_IO:
        return False
    try:
        os.close(os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError as err:
        assert err.errno in streamed_save._NO_DIRECT_IO
        return False
    return True


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "page cache"])
def test_the_file_goes_to_the_disk_in_whole_windows(tmp_path, monkeypatch, direct):
    """Direct writes whole aligned windows (the last padded, then cut back); writes through
    the cache go in pieces of at most WRITE_PIECE, and the disk's writeback of each window
    starts once it is written, so that the closing fsync has little left."""
    import fcntl
    import os

    from llama_dist import files, streamed_save
    from llama_dist.torch_file import DTYPES

    if direct and not _direct_io_works(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    monkeypatch.setattr(streamed_save, "DIRECT_IO", direct)
    monkeypatch.setattr(streamed_save, "WINDOW", 4 * streamed_save.ALIGN)
    monkeypatch.setattr(streamed_save, "WRITE_PIECE", 1000)
    writes, started, real_pwrite = [], [], os.pwrite

    def pwrite(fd, data, pos):
        writes.append((bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT), pos, len(data)))
        return real_pwrite(fd, data, pos)

    monkeypatch.setattr(streamed_save.os, "pwrite", pwrite)
    monkeypatch.setattr(streamed_save, "start_writeback", lambda fd, pos, nbytes: started.append((pos, nbytes)))
    tensors = {"w": torch.randn(300, 200), "norm": torch.randn(7), "step": torch.tensor(3.0)}
    path = tmp_path / "shard.pth"
    digest = streamed_save.save_streamed(path, {k: (tuple(v.shape), DTYPES["float32"]) for k, v in tensors.items()},
                                         lambda key: iter([tensors[key].numpy()]))
    size = path.stat().st_size
    assert_same(load(path), tensors)
    assert digest == files.sha256_file(path)
    covered = sorted((pos, pos + nbytes) for _, pos, nbytes in writes)
    assert covered[0][0] == 0 and all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    assert covered[-1][1] == -(-size // streamed_save.ALIGN) * streamed_save.ALIGN  # padded, then cut back
    assert all(is_direct == direct for is_direct, _, _ in writes)
    if direct:
        assert all(pos % streamed_save.ALIGN == 0 and nbytes % streamed_save.ALIGN == 0 for _, pos, nbytes in writes)
        assert not started
    else:
        assert max(nbytes for _, _, nbytes in writes) == 1000
        assert sorted(started) == [(pos, min(streamed_save.WINDOW, covered[-1][1] - pos))
                                   for pos in range(0, covered[-1][1], streamed_save.WINDOW)]
    # best effort: a call the kernel refuses (here a closed descriptor) is no error
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    files.start_writeback(fd, 0, 4096)


def test_crc32_with_a_running_value_matches_zlib_on_the_joined_bytes():
    import os
    import random
    import zlib

    from llama_dist.streamed_save import crc32

    rng = random.Random(0)
    for len_b in (0, 1, 7, 64, 4096, 100_003):
        a, b = os.urandom(rng.randrange(0, 3000)), os.urandom(len_b)
        assert crc32(memoryview(b)) == zlib.crc32(b), len_b  # zlib-ng's, where installed
        assert crc32(memoryview(b), crc32(memoryview(a))) == zlib.crc32(a + b), len_b


def test_staging_copies_only_what_it_must_into_one_buffer_it_reuses():
    from llama_dist.streamed_save import _Staging
    from llama_dist.torch_file import DTYPES

    def address(array):
        return array.__array_interface__["data"][0]

    f32, bf16 = DTYPES["float32"], DTYPES["bfloat16"]
    staging, whole = _Staging(), np.arange(24, dtype=np.float32).reshape(4, 6)
    assert staging.assemble(whole, f32, f32) is whole  # contiguous, right dtype: no copy
    left, right = whole[:, :2], whole[:, 2:]
    joined = staging.assemble([left, right], f32, f32)
    assert np.array_equal(joined, whole) and not np.shares_memory(joined, whole)
    first = address(joined)
    made_contiguous = staging.assemble(right, f32, f32)  # a strided view, made contiguous
    assert np.array_equal(made_contiguous, right) and address(made_contiguous) == first
    cast = staging.assemble([left, right], f32, bf16)
    expected = torch.from_numpy(whole).bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert cast.dtype == np.uint16 and np.array_equal(cast, expected) and address(cast) == first
    bigger = np.arange(48, dtype=np.float32).reshape(8, 6)
    assert np.array_equal(staging.assemble([bigger[:, :3], bigger[:, 3:]], f32, f32), bigger)
    assert staging.assemble(np.float32(2.5).reshape(()), f32, bf16).shape == ()  # a scalar


def _refuse_direct_io(monkeypatch, where: str) -> list:
    """os.open (at open) or os.pwrite (at the first write) fail with EINVAL on an O_DIRECT file."""
    import errno
    import fcntl
    import os

    from llama_dist import streamed_save

    refused, real_open, real_pwrite = [], os.open, os.pwrite

    def opening(path, flags, *rest):
        if flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *rest)

    def writing(fd, data, pos):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, pos)

    if where == "open":
        monkeypatch.setattr(streamed_save.os, "open", opening)
    else:
        monkeypatch.setattr(streamed_save.os, "pwrite", writing)
    return refused


@pytest.mark.parametrize("variant", ["small blocks, eager page release", "through the page cache",
                                     "O_DIRECT refused at open", "O_DIRECT refused at the first write",
                                     "sources of an unknown layout", "one file at a time",
                                     "windows of one block, writes of 100 bytes"])
def test_every_write_path_gives_the_same_checkpoint(tmp_path, training_ckpt, monkeypatch, variant):
    """Blocks of 256 bytes (source pages released after every block), writes through the
    page cache instead of O_DIRECT (chosen, or forced by a file system that refuses it
    when the file is opened or when it is first written), torch.load instead of the zip
    layout, destination files one after another instead of in threads at once, and a
    ring of two one-block windows written in pieces of 100 bytes."""
    from llama_dist import reshard as reshard_module
    from llama_dist import sharded_source, streamed_save

    src, _, _ = training_ckpt
    reshard(src, tmp_path / "reference", 2)
    refused = []
    if variant.startswith("small"):
        monkeypatch.setattr(reshard_module, "CHUNK_BYTES", 256)
        monkeypatch.setattr(sharded_source, "RELEASE_LAG", 0)
    elif variant == "through the page cache":
        monkeypatch.setattr(streamed_save, "DIRECT_IO", False)
    elif variant.startswith("O_DIRECT refused"):
        monkeypatch.setattr(streamed_save, "DIRECT_IO", True)
        refused = _refuse_direct_io(monkeypatch, "open" if variant.endswith("open") else "write")
    elif variant == "one file at a time":
        monkeypatch.setattr(reshard_module, "PARALLEL_FILES", 1)
    elif variant.startswith("windows"):
        monkeypatch.setattr(streamed_save, "DIRECT_IO", False)
        monkeypatch.setattr(streamed_save, "WINDOW", streamed_save.ALIGN)
        monkeypatch.setattr(streamed_save, "WINDOWS", 2)
        monkeypatch.setattr(streamed_save, "WRITE_PIECE", 100)
    else:
        monkeypatch.setattr(sharded_source, "read_tensor_records", lambda path: None)
    reshard(src, tmp_path / "variant", 2)
    if variant.startswith("O_DIRECT refused"):
        assert refused, "the refusal should have been met and survived"
    for name in ("consolidated.00.pth", "consolidated.01.pth", "optimizer.00.pt", "optimizer.01.pt"):
        assert (tmp_path / "variant" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert_committed_checkpoint(tmp_path / "variant")
    reshard(tmp_path / "variant", tmp_path / "back", 1)
    assert_same(load(tmp_path / "back" / "consolidated.00.pth"), load(src / "consolidated.00.pth"))


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from Linux's /proc")
def test_pages_read_from_a_source_leave_the_resident_set(tmp_path, monkeypatch):
    from llama_dist import sharded_source
    from llama_dist.meta_format import load_shard
    from llama_dist.torch_file import DTYPES

    def resident_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20

    torch.save({"w": torch.randn(16 << 20)}, tmp_path / "big.pth")  # 64 MiB
    files = sharded_source.Sharded([tmp_path / "big.pth"], load_shard, lambda path, keys: None,
                                    {"w": (16 << 20,)}, {"w": DTYPES["float32"]}, {"w": None})
    sources = sharded_source.MappedSources(files)
    weight = sources.tensors("w")[0]
    before = resident_mib()
    total = float(weight.sum())  # reads every page through the mapping
    assert resident_mib() - before > 48
    monkeypatch.setattr(sharded_source, "RELEASE_LAG", 0)
    sources.done_with(weight)
    assert resident_mib() - before < 16
    assert float(weight.sum()) == total  # released pages read back from the page cache
    sources.close()


PEAK_PROBE = """
import re, sys
from pathlib import Path
from llama_dist import reshard, sharded_source, streamed_save

def status_kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

# the bounds a 4 GB checkpoint meets at 32 MiB, 256 MiB and 8 MiB, scaled down to this one
reshard.CHUNK_BYTES, sharded_source.RELEASE_LAG, streamed_save.WINDOW = 1 << 20, 8 << 20, 256 << 10
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
