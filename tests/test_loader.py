"""The loader over synthetic shards whose token k is k: every row names the sample it came from."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_helpers import write_synthetic_data
from llama_dist import shards
from llama_dist.errors import UserError
from llama_dist.loader import TokenLoader
from multiproc import run_ranks

SEQ = 16
TRAIN = [700, 1234, 567]  # uneven shards: samples straddle shard ends
VAL = [300]


@pytest.fixture
def data(tmp_path):
    write_synthetic_data(tmp_path / "data", TRAIN, VAL)
    return tmp_path / "data"


def samples_of(inputs: torch.Tensor) -> list[int]:
    """Sample ids of a batch: row r starts at token r_id * SEQ, and token k is k."""
    return [int(row[0]) // SEQ for row in inputs]


def take(loader, steps):
    out = []
    for _ in range(steps):
        inputs, _ = next(loader)
        out += samples_of(inputs)
    return out


def global_order(data_dir, count, seed=1234):
    """The global sample sequence, read one sample at a time by a single rank."""
    return take(TokenLoader(str(data_dir), "train", SEQ, 1, 0, 1, seed=seed), count)


def test_batches_are_consecutive_windows_shifted_by_one(data):
    loader = TokenLoader(str(data), "train", SEQ, 4, 0, 1)
    n_tokens = sum(TRAIN)
    assert loader.n_samples == (n_tokens - 1) // SEQ
    for _ in range(60):  # more than an epoch: rows across every shard end
        inputs, targets = next(loader)
        assert inputs.shape == targets.shape == (4, SEQ) and inputs.dtype == targets.dtype == torch.int64
        for row, target in zip(inputs, targets):
            start = int(row[0])
            assert start % SEQ == 0 and start + SEQ < n_tokens
            assert torch.equal(row, torch.arange(start, start + SEQ))
            assert torch.equal(target, torch.arange(start + 1, start + SEQ + 1))


def test_each_epoch_is_a_fresh_permutation_of_every_sample(data):
    loader = TokenLoader(str(data), "train", SEQ, 1, 0, 1)
    n = loader.n_samples
    order = take(loader, 3 * n)
    epochs = [order[i * n : (i + 1) * n] for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != sorted(epochs[0])
    assert loader.epoch == 3
    assert global_order(data, n, seed=1234) == epochs[0]  # deterministic
    assert global_order(data, n, seed=99) != epochs[0]


def test_dp_ranks_split_each_global_batch(data):
    reference = global_order(data, 2 * 3 * 50)
    ranks = [TokenLoader(str(data), "train", SEQ, 3, r, 2) for r in range(2)]
    for step in range(50):
        got = [samples_of(next(r)[0]) for r in ranks]
        assert got[0] + got[1] == reference[step * 6 : (step + 1) * 6]


def _rank_batches(data_dir: str, steps: int):
    from llama_dist.distributed import current, init_distributed

    init_distributed(mp=2, backend="gloo", device="cpu")
    info = current()
    loader = TokenLoader(data_dir, "train", SEQ, 3, info.dp_rank, info.dp_size)
    batches = [next(loader) for _ in range(steps)]
    return info.dp_rank, info.mp_rank, [(x.tolist(), y.tolist()) for x, y in batches]


def test_real_ranks_dp2_mp2_disjoint_across_dp_identical_across_mp(data):
    steps = 4
    results = run_ranks(_rank_batches, 4, str(data), steps)
    assert sorted((dp, mp) for dp, mp, _ in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    by_dp = {}
    for dp, _, batches in results:
        if dp in by_dp:
            assert batches == by_dp[dp]  # model-parallel peers see the same tokens
        by_dp[dp] = batches
    reference = global_order(data, 2 * 3 * steps)
    for step in range(steps):
        rows = [torch.tensor(by_dp[dp][step][0]) for dp in (0, 1)]
        got = [samples_of(r) for r in rows]
        assert not set(got[0]) & set(got[1])
        assert got[0] + got[1] == reference[step * 6 : (step + 1) * 6]


def test_resume_at_the_same_dp_size_is_exact(data):
    uninterrupted = TokenLoader(str(data), "train", SEQ, 4, 1, 2)
    expected = [next(uninterrupted) for _ in range(80)]
    first = TokenLoader(str(data), "train", SEQ, 4, 1, 2)
    for _ in range(33):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON types
    resumed = TokenLoader(str(data), "train", SEQ, 4, 1, 2)
    resumed.load_state_dict(state)
    for want in expected[33:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("new_dp", [1, 4])
def test_resume_at_another_dp_size_neither_repeats_nor_skips(data, new_dp):
    mbs, steps_before, steps_after = 3, 23, 30  # 23 * 6 samples: past one epoch of 156
    reference = global_order(data, mbs * (2 * steps_before + new_dp * steps_after))
    before = [TokenLoader(str(data), "train", SEQ, mbs, r, 2) for r in range(2)]
    consumed = []
    for _ in range(steps_before):
        for loader in before:
            consumed += samples_of(next(loader)[0])
    states = [loader.state_dict() for loader in before]
    assert states[0] == states[1]  # the position is global: any rank's state will do
    after = [TokenLoader(str(data), "train", SEQ, mbs, r, new_dp) for r in range(new_dp)]
    for loader in after:
        loader.load_state_dict(states[0])
    for _ in range(steps_after):
        for loader in after:
            consumed += samples_of(next(loader)[0])
    assert consumed == reference


def test_fresh_val_loaders_give_the_same_batches(data):
    def first_batches():
        loader = TokenLoader(str(data), "val", SEQ, 2, 0, 1)
        return [next(loader)[0] for _ in range(5)]

    a, b = first_batches(), first_batches()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(int(t.max()) < sum(VAL) for t in a)  # val tokens only


def test_memory_mapped_not_copied(data):
    loader = TokenLoader(str(data), "train", SEQ, 2, 0, 1)
    assert all(isinstance(t, np.memmap) for t in loader._tokens)


# --------------------------------------------------------------------------- errors


def test_missing_or_empty_directory_says_run_prepare(tmp_path):
    with pytest.raises(UserError, match="does not exist.*llama-dist prepare"):
        TokenLoader(str(tmp_path / "nope"), "train", SEQ, 1, 0, 1)
    with pytest.raises(UserError, match="manifest.json is missing.*llama-dist prepare"):
        TokenLoader(str(tmp_path), "train", SEQ, 1, 0, 1)


def test_vocab_mismatch_names_both_sizes(data):
    with pytest.raises(UserError, match="65536-token vocabulary.*vocab_size 32000"):
        TokenLoader(str(data), "train", SEQ, 1, 0, 1, expected_vocab_size=32000)
    TokenLoader(str(data), "train", SEQ, 1, 0, 1, expected_vocab_size=65536)


def test_split_smaller_than_one_global_batch(data):
    # val has 300 tokens = 18 samples of 16; dp 4 x mbs 5 needs 20
    with pytest.raises(UserError, match=r"val split .* 300 tokens, fewer than one global batch .*val-fraction"):
        TokenLoader(str(data), "val", SEQ, 5, 0, 4)


def test_missing_split(tmp_path):
    write_synthetic_data(tmp_path / "d", [500], [])
    with pytest.raises(UserError, match="no 'val' split"):
        TokenLoader(str(tmp_path / "d"), "val", SEQ, 1, 0, 1)


def test_corrupted_shard_is_detected_with_checksums(data):
    path = data / "train-00001.bin"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF  # one flipped byte in the tokens: header and length still fine
    path.write_bytes(bytes(raw))
    TokenLoader(str(data), "train", SEQ, 1, 0, 1)  # not checked unless asked
    with pytest.raises(UserError, match="train-00001.bin is corrupted"):
        TokenLoader(str(data), "train", SEQ, 1, 0, 1, verify_checksums=True)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"NOTMAGIC" + raw[8:], "bad magic"),
    (lambda raw: raw[:8] + (7).to_bytes(4, "little") + raw[12:], "format version 7"),
    (lambda raw: raw[:-10], "truncated"),
])
def test_damaged_headers_are_detected_on_open(data, damage, message):
    path = data / "train-00002.bin"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=message):
        TokenLoader(str(data), "train", SEQ, 1, 0, 1)


def test_resuming_with_another_seq_len_or_other_data_is_refused(data, tmp_path):
    state = TokenLoader(str(data), "train", SEQ, 2, 0, 1).state_dict()
    with pytest.raises(UserError, match="seq_len=16.*keep seq_len unchanged"):
        TokenLoader(str(data), "train", SEQ * 2, 2, 0, 1).load_state_dict(state)
    write_synthetic_data(tmp_path / "other", [900], VAL)
    with pytest.raises(UserError, match="changed since this state was saved"):
        TokenLoader(str(tmp_path / "other"), "train", SEQ, 2, 0, 1).load_state_dict(state)


def test_manifest_shard_mismatch(data):
    manifest = json.loads((data / shards.MANIFEST).read_text())
    manifest["shards"][0]["tokens"] += 1
    (data / shards.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="manifest lists 701"):
        TokenLoader(str(data), "train", SEQ, 1, 0, 1)


OPEN_WITH_LIMIT = """
import resource, sys
soft, hard = int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard if hard > 0 else resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from llama_dist.errors import UserError
from llama_dist.loader import TokenLoader
try:
    loader = TokenLoader(sys.argv[1], "train", 16, 2, 0, 1)
    next(loader)
    print("opened", len(loader._tokens), "shards; soft limit now", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
except UserError as err:
    print("UserError:", err)
"""


@pytest.mark.parametrize("hard, expected", [
    (0, r"opened 150 shards; soft limit now \d+"),  # 0: the hard limit stays as it is, room to raise
    (64, r"UserError: the train split of \S+ has 150 shards, .*open only 64 files .*`ulimit -n \d+`.*"),
])
def test_many_shards_raise_the_open_file_limit_or_say_ulimit(tmp_path, hard, expected):
    """A soft limit below the shard count (1024 under systemd and Slurm) was a raw EMFILE."""
    resource = pytest.importorskip("resource")
    if 0 <= resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1024:
        pytest.skip("the hard limit on open files is below 1024 here")
    write_synthetic_data(tmp_path / "d", [20] * 150, [20])
    run = subprocess.run([sys.executable, "-c", OPEN_WITH_LIMIT, str(tmp_path / "d"), "64", str(hard)],
                         capture_output=True, text=True, timeout=120)
    assert re.fullmatch(expected, run.stdout.strip()), run.stdout + run.stderr
