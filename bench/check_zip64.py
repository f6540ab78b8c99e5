"""Check the zip64 layout of a file past 4 GiB against torch.save's, byte for byte.

    python bench/check_zip64.py [--dir /scratch]

A check, not a timing: tests lower the 4 GiB limit to exercise the zip64 fields
(tests/test_torch_file.py), and this writes the real thing once: a dict of a small
tensor, one uint8 tensor of 4 GiB + 100 bytes (a record larger than 4 GiB) and one
after it (a record whose offset is past 4 GiB), with torch.save and with
streamed_save, and compares the files. Only the serialization id's name half may
differ (torch_file.ZipRecords.serialization_id), so torch's is put into ours. Needs
about 9 GiB of disk and 4.3 GiB of memory; deletes what it wrote.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from llama_dist import torch_file
from llama_dist.streamed_save import save_streamed

BIG = (1 << 32) + 100
BLOCK = 64 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="where to write the two files (default: the temp dir)")
    opts = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="zip64-", dir=opts.dir))
    try:
        (root / "torch").mkdir()
        (root / "ours").mkdir()
        theirs, ours = root / "torch" / "big.pt", root / "ours" / "big.pt"
        state = {"small": torch.ones(3), "big": torch.zeros(BIG, dtype=torch.uint8),
                 "after": torch.ones(2, dtype=torch.float16)}
        torch.save(state, theirs)
        del state
        with zipfile.ZipFile(theirs) as archive:
            sid = archive.read("big/.data/serialization_id")
        torch_file.ZipRecords.serialization_id = lambda self: sid
        zeros = np.zeros(BLOCK, dtype=np.uint8)

        def fill(key: str):
            if key == "big":
                for start in range(0, BIG, BLOCK):
                    yield zeros[: min(BLOCK, BIG - start)]
            else:
                yield np.ones(3, np.float32) if key == "small" else np.ones(2, np.float16)

        specs = {"small": ((3,), torch_file.DTYPES["float32"]), "big": ((BIG,), torch_file.DTYPES["uint8"]),
                 "after": ((2,), torch_file.DTYPES["float16"])}
        save_streamed(ours, specs, fill)
        with open(theirs, "rb") as a, open(ours, "rb") as b:
            offset = 0
            while True:
                x, y = a.read(BLOCK), b.read(BLOCK)
                if x != y:
                    at = offset + next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
                    raise SystemExit(f"the files differ from byte {at}")
                if not x:
                    break
                offset += len(x)
        loaded = torch.load(ours, mmap=True, weights_only=True)
        assert loaded["big"].numel() == BIG and float(loaded["after"][1]) == 1.0
        print(f"{ours.stat().st_size} bytes, identical to torch.save's, and torch.load reads them")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
