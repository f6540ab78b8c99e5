"""Reshard: bit-for-bit round trips, both embedding layouts, the training state, each
check's message, atomic output, and the same logits from resharded shards in real
gloo ranks. The write paths and memory are in test_reshard_streaming.py; the reference
checkpoints come from reshard_helpers.py."""

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from multiproc import run_ranks
from reshard_helpers import (LLAMA2, LLAMA3, assert_committed_checkpoint, assert_same, load, model_weights,
                             optimizer_state, sha256, split, write_checkpoint)

from llama_dist.cli import main as llama_dist_main
from llama_dist.distributed import init_distributed
from llama_dist.errors import UserError
from llama_dist.meta_format import read_params, write_params
from llama_dist.model import Transformer
from llama_dist.reshard import reshard
from llama_dist.sharded_source import load_merged_state_dict


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
        source = yaml.safe_load((src / "config.yaml").read_text())
        assert config == {**source, "parallel": {**source["parallel"], "mp": mp}}
        assert config["parallel"]["dp"] == -1 and config["parallel"]["backend"] == "auto"
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


def test_llama31_params_are_carried_over(tmp_path):
    """Llama 3.1's use_scaled_rope (a key Llama 3's loader does not know) stays in params.json."""
    args = dataclasses.replace(LLAMA3, use_scaled_rope=True)
    weights = model_weights(args)
    src = write_checkpoint(tmp_path / "src", args, weights, 2)
    reshard(src, tmp_path / "mp1", 1)
    assert read_params(tmp_path / "mp1") == read_params(src) and read_params(src).use_scaled_rope
    assert_same(load(tmp_path / "mp1" / "consolidated.00.pth"), weights)


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


def test_dtype_refuses_what_it_cannot_cast(tmp_path):
    weights = model_weights(LLAMA2)
    weights["norm.weight"] = torch.ones_like(weights["norm.weight"], dtype=torch.int64)
    src = write_checkpoint(tmp_path / "src", LLAMA2, weights, 1)
    with pytest.raises(UserError, match="--dtype casts floating-point weights, and .* holds others"):
        reshard(src, tmp_path / "cast", 1, dtype="bf16")
    with pytest.raises(UserError, match="unknown dtype 'int8'; choose one of bf16, fp16, fp32"):
        reshard(src, tmp_path / "cast", 1, dtype="int8")
    assert not (tmp_path / "cast").exists()
    reshard(src, tmp_path / "as_is", 1)  # moved as they are, whatever their dtype
    assert load(tmp_path / "as_is" / "consolidated.00.pth")["norm.weight"].dtype == torch.int64


def test_integer_weights_split_and_merge_as_they_are(tmp_path):
    weights = model_weights(LLAMA2)
    wo = "layers.0.attention.wo.weight"  # row-parallel: each new shard is a column slice
    weights[wo] = torch.randint(-128, 128, weights[wo].shape, dtype=torch.int8)
    src = write_checkpoint(tmp_path / "src", LLAMA2, weights, 1)
    reshard(src, tmp_path / "mp2", 2)
    for rank, expected in enumerate(split(weights, 2, False)):
        assert_same(load(tmp_path / "mp2" / f"consolidated.{rank:02d}.pth"), expected)
    reshard(tmp_path / "mp2", tmp_path / "mp1", 1)
    assert_same(load(tmp_path / "mp1" / "consolidated.00.pth"), weights)


def test_llama1_rope_freqs_are_dropped(tmp_path):
    weights = model_weights(LLAMA2)
    src = write_checkpoint(tmp_path / "mp2", LLAMA2, weights, 2)
    freqs = torch.randn(LLAMA2.head_dim // 2, 2)
    for path in src.glob("*.pth"):
        torch.save({**load(path), "rope.freqs": freqs}, path)
    reshard(src, tmp_path / "mp1", 1)
    assert_same(load(tmp_path / "mp1" / "consolidated.00.pth"), weights)


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


def test_corrupt_source_is_refused_unless_no_verify(tmp_path, capsys):
    src, _ = _break("corrupt", tmp_path)
    with pytest.raises(UserError, match="does not match its sha256"):
        reshard(src, tmp_path / "checked", 1)
    # the command starts its check first thing, and reports it the same way
    assert llama_dist_main(["reshard", str(src), str(tmp_path / "cli_checked"), "--mp", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "consolidated.01.pth does not match its sha256" in err, err
    assert not (tmp_path / "cli_checked").exists()
    reshard(src, tmp_path / "as_is", 1, verify=False)
    changed = load(src / "consolidated.01.pth")["layers.1.feed_forward.w2.weight"]
    merged = load(tmp_path / "as_is" / "consolidated.00.pth")["layers.1.feed_forward.w2.weight"]
    assert torch.equal(merged[:, merged.shape[1] // 2 :], changed)  # the file as it is, w2 split on dim 1
    assert llama_dist_main(["reshard", str(src), str(tmp_path / "cli"), "--mp", "1", "--no-verify"]) == 0


def test_a_failed_source_check_stops_the_writing_at_the_next_tensor(tmp_path, monkeypatch):
    from llama_dist import reshard as reshard_module
    from llama_dist.reshard_cli import start_source_check

    src, _ = _break("corrupt", tmp_path)
    check = start_source_check(src)
    with pytest.raises(UserError):
        check.result()  # finished, and failed, before the reshard starts
    filled, save_streamed = [], reshard_module.save_streamed

    def counting(path, specs, fill, sources=None):
        def counted(key):
            filled.append(key)
            yield from fill(key)
        return save_streamed(path, specs, counted, sources)

    monkeypatch.setattr(reshard_module, "save_streamed", counting)
    with pytest.raises(UserError, match="consolidated.01.pth does not match its sha256"):
        reshard(src, tmp_path / "dst", 1, source_check=check)
    assert len(filled) == 1  # of the shard's 21 tensors
    assert not (tmp_path / "dst").exists() and not list(tmp_path.glob("dst.tmp-*"))


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
    training = kind in ("optimizer", "uncommitted", "corrupt", "unfinished", "pruned", "bad_yaml", "state_list")
    src = write_checkpoint(tmp_path / "src", args, weights, shards, optimizer_state(weights) if training else None,
                           commit=kind not in ("uncommitted", "unfinished", "pruned"))
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
    elif kind in ("unfinished", "pruned"):  # a save killed before train_state.json; a delete cut short
        doomed = ["train_state.json", "manifest.json", "config.yaml"]
        doomed += ["optimizer.00.pt", "optimizer.01.pt"] if kind == "pruned" else []
        for name in doomed:
            (src / name).unlink()
    elif kind == "bad_yaml":  # a tab cannot indent YAML
        (src / "config.yaml").write_text("model:\n\tdim: 64\n")
    elif kind == "state_list":
        (src / "train_state.json").write_text("[7]")
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
    "uncommitted": r"src has manifest.json, optimizer.00.pt, optimizer.01.pt, rng.00000.pt and 2 more but no "
                   r"COMMITTED marker",
    "unfinished": r"src has optimizer.00.pt, optimizer.01.pt, rng.00000.pt, rng.00001.pt but no COMMITTED "
                  r"marker: an incomplete checkpoint .*; reshard a committed one$",
    "pruned": r"src has rng.00000.pt, rng.00001.pt but no COMMITTED marker",
    "bad_yaml": r"config.yaml is not valid YAML \(found character '\\t' that cannot start any token, line 2\); "
                r"fix or remove it$",
    "state_list": r"train_state.json is not a training state \(a JSON object with an integer dp\); the "
                  r"checkpoint is damaged: reshard an earlier one$",
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
    info = init_distributed(mp=2, backend="gloo", device="cpu")
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


def _run_console_script(argv: list[str]) -> subprocess.CompletedProcess:
    """`llama-dist ARGV` as its console script runs it, with an atexit hook that reports the
    interpreter's teardown."""
    code = ("import atexit, sys; atexit.register(lambda: print('teardown ran'));"
            f"sys.argv = ['llama-dist', *{argv!r}]; from llama_dist.cli import run; run()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_console_script_reshard_ends_without_the_teardown_and_loses_nothing(tmp_path):
    src = write_checkpoint(tmp_path / "src", LLAMA2, model_weights(LLAMA2), 2)
    done = _run_console_script(["reshard", str(src), str(tmp_path / "one"), "--mp", "1"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("resharded ") and "teardown ran" not in done.stdout
    reshard(src, tmp_path / "reference", 1)
    assert sha256(tmp_path / "one" / "consolidated.00.pth") == sha256(tmp_path / "reference" / "consolidated.00.pth")
    assert_committed_checkpoint(tmp_path / "one")

    bad = _run_console_script(["reshard", str(src), str(tmp_path / "bad"), "--mp", "3"])
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not divide" in bad.stderr
    # other commands keep the normal exit
    config = _run_console_script(["config", "tiny"])
    assert config.returncode == 0 and config.stdout.rstrip().endswith("teardown ran")


class _Bar:
    """Stands in for tqdm: records the total, the updates and whether it would draw."""

    made: list["_Bar"] = []

    def __init__(self, total, disable, **_):
        self.total, self.disable, self.updates, self.closed = total, disable, [], False
        _Bar.made.append(self)

    def update(self, n):
        self.updates.append(n)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("mp", [2, 4])
def test_progress_counts_every_byte_written(tmp_path, training_ckpt, monkeypatch, mp):
    import llama_dist.reshard as reshard_module

    monkeypatch.setattr(reshard_module, "tqdm", _Bar)
    _Bar.made.clear()
    src = training_ckpt[0]
    reshard(src, tmp_path / "on", mp, progress=True)  # replicated norms are written once per shard
    reshard(tmp_path / "on", tmp_path / "back", 1)
    on, back = _Bar.made
    written = sum(t.numel() * t.element_size() for path in sorted((tmp_path / "on").glob("*.pt*"))
                  for t in load(path).values())
    assert on.total == sum(on.updates) == written and on.closed and on.disable is None  # drawn on a terminal
    assert back.total == sum(back.updates) and back.disable is True  # the library's default: no bar


def test_a_disk_without_room_for_the_new_checkpoint_is_refused_before_it_writes(tmp_path, training_ckpt,
                                                                               monkeypatch):
    from llama_dist import files

    src, _, _ = training_ckpt
    monkeypatch.setattr(files, "free_bytes", lambda path: 0)
    with pytest.raises(UserError) as refused:
        reshard(src, tmp_path / "out", 2)
    match = re.fullmatch(rf"the disk holding {re.escape(str(tmp_path / 'out'))} has 0\.0 MB free and the mp=2 "
                         rf"checkpoint takes ([\d.]+) MB; free space there or choose another destination",
                         str(refused.value))
    assert match, refused.value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mp1"]  # nothing staged
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty; choose another destination or pass --force"):
        reshard(src, tmp_path / "full", 2)  # what is wrong with DST itself is said first
    monkeypatch.undo()
    reshard(src, tmp_path / "out", 2)
    written = sum(p.stat().st_size for p in (tmp_path / "out").iterdir() if p.suffix in (".pth", ".pt"))
    assert abs(float(match.group(1)) * 1e6 - written) < 0.02 * written  # the tensors of both ranks' files
