"""torch's file format without torch: what we write is torch.save's file byte for byte,
torch reads it (zip64 included), and what we read is what torch.load reads."""

import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from llama_dist import torch_file
from llama_dist.sharded_source import SourceFile
from llama_dist.streamed_save import cast_into, save_streamed
from llama_dist.torch_file import DTYPES, as_numpy, dtype_of, read_tensor_records


def _save(path, tensors):
    specs = {key: (tuple(t.shape), dtype_of(t)) for key, t in tensors.items()}
    return save_streamed(path, specs, lambda key: iter([as_numpy(tensors[key])]))


def _serialization_id(path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/.data/serialization_id")))


STATES = {
    "dtypes and a scalar": lambda: {"a.weight": torch.randn(2, 3), "b": torch.ones(5, dtype=torch.bfloat16),
                                    "s": torch.tensor(3.0), "h": torch.randn(4, 4, 4, 4).half(),
                                    "i": torch.arange(70000), "m": torch.tensor([True, False])},
    "empty tensors": lambda: {"e": torch.empty(3, 0), "f": torch.empty(0), "g": torch.randn(1)},
    # memo indices past 255 and more items than one SETITEMS batch
    "1500 keys": lambda: {f"layers.{i}.w": torch.randn(i % 5 + 1, 2, 1, 3) for i in range(1500)},
    "one key, not ASCII": lambda: {"gewicht.ä": torch.randn(3)},
    "a 64 KiB record": lambda: {"big": torch.zeros(2**16 + 1, dtype=torch.uint8), "x": torch.randn(7)},
}


@pytest.mark.parametrize("case", list(STATES))
def test_files_are_byte_for_byte_what_torch_save_writes(tmp_path, monkeypatch, case):
    """Only half of the serialization id may differ (torch folds its names in a C++ hash
    set's order): with torch's id put in, the files are equal; the CRC half is equal anyway."""
    state = STATES[case]()
    (tmp_path / "torch").mkdir()
    (tmp_path / "ours").mkdir()
    theirs, ours = tmp_path / "torch" / "consolidated.07.pth", tmp_path / "ours" / "consolidated.07.pth"
    torch.save(state, theirs)
    _save(ours, state)
    assert _serialization_id(ours)[20:] == _serialization_id(theirs)[20:]
    assert ours.read_bytes() != theirs.read_bytes()
    monkeypatch.setattr(torch_file.ZipRecords, "serialization_id", lambda self: _serialization_id(theirs))
    _save(ours, state)
    assert ours.read_bytes() == theirs.read_bytes()


def test_the_same_tensors_give_the_same_file(tmp_path):
    state, first, second = STATES["dtypes and a scalar"](), tmp_path / "a" / "x.pth", tmp_path / "b" / "x.pth"
    first.parent.mkdir()
    second.parent.mkdir()
    _save(first, state)
    _save(second, state)
    assert first.read_bytes() == second.read_bytes()
    state["a.weight"][0, 0] += 1
    _save(second, state)
    assert _serialization_id(first) != _serialization_id(second)


def test_zip64_fields_are_read_by_torch_and_zipfile(tmp_path, monkeypatch):
    """With the 4 GiB limit lowered to 5000 bytes, records past it and one larger than it get
    zip64 fields, as files of big models do; torch.load and zipfile read them back.
    (bench/check_zip64.py compares a real 4 GiB file with torch.save's, byte for byte.)"""
    monkeypatch.setattr(torch_file, "ZIP64_LIMIT", 5000)
    state = {"small": torch.randn(10), "large": torch.randn(3000), "after": torch.randn(5).half(),
             "empty": torch.empty(0)}
    path = tmp_path / "zip64.pth"
    _save(path, state)
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        assert archive.testzip() is None  # every CRC-32 checks
    assert infos["zip64/data/1"].file_size == 12000 and infos["zip64/data/2"].header_offset > 5000
    assert b"\xff\xff\xff\xff" in path.read_bytes()[-200:]  # the end record defers to zip64's
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    after = read_tensor_records(path)["after"]
    assert after.start % 64 == 0 and after.start - infos["zip64/data/2"].header_offset < 30 + 12 + 12 + 4 + 64
    assert path.read_bytes()[after.start : after.start + after.nbytes] == state["after"].numpy().tobytes()


def test_views_of_one_storage_read_as_torch_reads_them(tmp_path):
    """torch.save keeps views that share a storage as one storage with offsets and strides."""
    base = torch.arange(100, dtype=torch.float32)
    state = {"a": base[10:20], "t": base.view(10, 10).t(), "s": base[::3], "c": base[99], "own": torch.ones(2)}
    torch.save(state, tmp_path / "views.pth")
    records = read_tensor_records(tmp_path / "views.pth")
    assert records["a"].offset == 10 and records["t"].stride == (1, 10) and records["a"].storage == "0"
    source = SourceFile(tmp_path / "views.pth", lambda path: pytest.fail("read with torch"), lambda path, keys: None)
    for key, tensor in state.items():
        assert np.array_equal(source.arrays[key], tensor.numpy()), key


def test_a_file_saved_from_gpu_tensors_is_read_without_torch(tmp_path):
    """A checkpoint saved from CUDA tensors names the location "cuda:0" in data.pkl; torch.load
    maps it to the CPU, and this reader, which never allocates on a device, reads it alike.
    Rewritten with zipfile, whose records are not aligned to 64 bytes."""
    state = {"tok_embeddings.weight": torch.randn(6, 4), "norm.weight": torch.randn(4).bfloat16()}
    torch.save(state, tmp_path / "cpu.pth")
    with zipfile.ZipFile(tmp_path / "cpu.pth") as src, zipfile.ZipFile(tmp_path / "gpu.pth", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                assert data.count(b"X\x03\x00\x00\x00cpu") == 1  # once, then fetched from the memo
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            dst.writestr(info.filename, data)
    loaded = torch.load(tmp_path / "gpu.pth", map_location="cpu", weights_only=True)
    source = SourceFile(tmp_path / "gpu.pth", lambda path: pytest.fail("read with torch"), lambda path, keys: None)
    for key, tensor in state.items():
        assert torch.equal(torch_file.as_torch(source.arrays[key], source.dtypes[key]), loaded[key]), key


def _claim_size(path, record: str, nbytes: int) -> None:
    """Make the central directory say that `record` holds `nbytes`."""
    import struct

    data = bytearray(path.read_bytes())
    entry = data.rindex(b"PK\x01\x02", 0, data.rindex(record.encode()))
    data[entry + 20 : entry + 28] = struct.pack("<II", nbytes, nbytes)
    path.write_bytes(bytes(data))


def test_other_files_are_left_to_torch(tmp_path):
    """None for what this module does not read; torch.load then reads it or refuses it."""
    import argparse

    cases = {
        "legacy.pth": lambda p: torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=False),
        "object.pth": lambda p: torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=1)}, p),
        "nested.pth": lambda p: torch.save({"model": {"w": torch.ones(2)}}, p),
        "parameter.pth": lambda p: torch.save({"w": torch.nn.Parameter(torch.ones(2))}, p),
        "not_a_zip.pth": lambda p: p.write_bytes(b"hello"),
        "truncated.pth": lambda p: (torch.save({"w": torch.ones(2)}, p), p.write_bytes(p.read_bytes()[:-30])),
        "size_lies.pth": lambda p: (torch.save({"w": torch.ones(2)}, p), _claim_size(p, "size_lies/data/0", 1 << 30)),
    }
    for name, make in cases.items():
        make(tmp_path / name)
        assert read_tensor_records(tmp_path / name) is None, name
    loaded = []
    source = SourceFile(tmp_path / "legacy.pth", lambda p: loaded.append(p) or torch.load(p, weights_only=True),
                        lambda path, keys: None)
    assert loaded and np.array_equal(source.arrays["w"], np.ones(2, np.float32))


def as_float32_torch(array, dtype):
    return np.asarray(torch_file.as_torch(array, DTYPES[dtype]).float())


def test_casts_round_as_torch_does():
    """Every cast --dtype offers, bit for bit against torch's .to(): ties to even, subnormals,
    overflow to inf, NaN."""
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([
        torch.randn(20000, generator=gen) * 10.0 ** torch.randint(-8, 8, (20000,), generator=gen),
        torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan"), 65504.0, 65520.0,
                      1e-8, 6e-8, 3.3895e38, -3.3895e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11]),
        torch.arange(0, 1 << 16, dtype=torch.int32).view(torch.int16).view(torch.bfloat16).float(),
    ])
    for src in ("float32", "bfloat16", "float16"):
        source = values.to(getattr(torch, src))
        for dst in ("float32", "bfloat16", "float16"):
            expected = as_numpy(source.to(getattr(torch, dst)))
            out = np.empty(expected.shape, dtype=DTYPES[dst].numpy)
            cast_into(out, as_numpy(source), DTYPES[src], DTYPES[dst])
            same = out.view(f"u{out.itemsize}") == expected.view(f"u{out.itemsize}")
            if src == "float16":  # torch widens a half NaN with its payload, or to 0x7FFFFFFF in its last elements
                same |= np.isnan(as_float32_torch(out, dst)) & np.isnan(as_float32_torch(expected, dst))
            assert same.all(), (src, dst, np.flatnonzero(~same)[:5])
    with pytest.raises(ValueError, match="only between floating-point"):
        cast_into(np.empty(2, np.float32), np.arange(2), DTYPES["int64"], DTYPES["float32"])


def test_a_reshard_never_imports_torch(tmp_path, training_ckpt):
    src, _, _ = training_ckpt
    code = ("import sys\nfrom llama_dist.cli import main\n"
            f"assert main(['reshard', {str(src)!r}, {str(tmp_path / 'resharded')!r}, '--mp', '1']) == 0\n"
            f"assert main(['reshard', {str(tmp_path / 'resharded')!r}, {str(tmp_path / 'bf16')!r}, '--mp', '2', "
            "'--dtype', 'bf16']) == 0\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
    assert (tmp_path / "bf16" / "consolidated.01.pth").is_file()
