"""Validation loss: `evaluate` against a hand-computed cross-entropy, the data-parallel
average in real gloo ranks, and the `llama-dist eval` command's one-line errors."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_dist import meta_format
from llama_dist.cli import main as cli_main
from llama_dist.distributed import init_distributed, seed_everything, shutdown
from llama_dist.evaluate import evaluate
from llama_dist.generation import load_model
from llama_dist.loader import TokenLoader
from llama_dist.model import ModelArgs, Transformer
from llama_dist.tokenizer import Tokenizer
from multiproc import run_ranks
from test_generation import write_checkpoint

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=32)
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def batches(n: int, seed: int = 5, batch: int = 3, seq_len: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, ARGS.vocab_size, (batch, seq_len + 1), generator=g)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def hand_loss(model: Transformer, data: list) -> float:
    """-log p(target) summed by hand from log_softmax, over every token of every batch."""
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in data:
            logp = torch.log_softmax(model(inputs).double(), dim=-1)  # (B, T, V)
            total -= logp.gather(-1, targets[..., None]).sum().item()
            count += targets.numel()
    return total / count


def _model() -> Transformer:
    init_distributed(mp=1, backend="gloo", device="cpu")
    seed_everything(0)
    return Transformer(ARGS)


def test_evaluate_is_the_mean_token_cross_entropy():
    model = _model()
    data = batches(5)
    result = evaluate(model, data, batches=3)
    model.eval()
    expected = hand_loss(model, data[:3])
    assert result["batches"] == 3 and result["tokens"] == 3 * 3 * 10
    assert result["loss"] == pytest.approx(expected, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    assert result["loss"] == pytest.approx(math.log(ARGS.vocab_size), abs=0.2)  # a fresh model is near uniform

    everything = evaluate(model, data)  # batches=None: the whole iterable
    assert everything["batches"] == 5
    assert everything["loss"] == pytest.approx(hand_loss(model, data), abs=1e-5)


def test_evaluate_restores_the_mode_and_keeps_no_graph():
    model = _model()
    model.train()
    result = evaluate(model, batches(2))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    evaluate(model, batches(1))
    assert not model.training
    assert isinstance(result["loss"], float)


def test_evaluate_skips_ignored_targets():
    model = _model()
    inputs, targets = batches(1)[0]
    masked = targets.clone()
    masked[:, 5:] = -100
    result = evaluate(model, [(inputs, masked)])
    with torch.no_grad():
        logp = torch.log_softmax(model(inputs).double(), dim=-1)[:, :5]
    expected = -logp.gather(-1, targets[:, :5, None]).mean().item()
    assert result["tokens"] == 3 * 5
    assert result["loss"] == pytest.approx(expected, abs=1e-5)


def _dp_rank():
    info = init_distributed(mp=1, backend="gloo", device="cpu")
    seed_everything(0)
    model = Transformer(ARGS)
    # each data-parallel rank scores different batches, of different token counts
    data = batches(2, seed=10 + info.dp_rank, batch=2 + info.dp_rank)
    return evaluate(model, data)


def test_evaluate_averages_over_data_parallel_ranks():
    ranks = run_ranks(_dp_rank, 2)
    model = _model()
    data = batches(2, seed=10, batch=2) + batches(2, seed=11, batch=3)
    expected = hand_loss(model.eval(), data)
    for result in ranks:
        assert result["tokens"] == (2 * 2 + 2 * 3) * 10
        assert result["loss"] == pytest.approx(expected, abs=1e-5)
    assert ranks[0]["loss"] == ranks[1]["loss"]


def test_cli_eval_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["eval", str(tmp_path / "nope"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err


# --------------------------------------------------------------------------- the command on prepared data


def _tiny_ckpt_args(vocab: int) -> ModelArgs:
    return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=32, max_seq_len=16)


def split_checkpoint(src: Path, dst: Path, mp: int) -> None:
    """An MP=mp copy of an MP=1 checkpoint, cut on each weight's shard dimension."""
    args = meta_format.read_params(src)
    state = meta_format.load_shard(src / meta_format.shard_file(0), mmap=False)
    dst.mkdir()
    for rank in range(mp):
        shard = {}
        for key, tensor in state.items():
            dim = meta_format.shard_dim(key, args)
            shard[key] = tensor if dim is None else tensor.chunk(mp, dim=dim)[rank]
        meta_format.save_shard(shard, dst / meta_format.shard_file(rank))
    for name in (meta_format.PARAMS_FILE, meta_format.TOKENIZER_FILE):
        shutil.copy(src / name, dst / name)


EVAL_ARGV = ["--batches", "3", "--seq-len", "16", "--batch-size", "2", "--device", "cpu"]


def _printed_loss(stdout: str) -> float:
    match = re.search(r"val loss (\S+)  perplexity (\S+)", stdout)
    assert match, stdout
    loss, perplexity = float(match.group(1)), float(match.group(2))
    assert perplexity == pytest.approx(math.exp(loss), rel=1e-3)
    return loss


def test_cli_eval_matches_the_loss_by_hand_at_mp1_and_mp2(tmp_path, data_dir, capsys):
    tokenizer = data_dir / "tokenizer.model"
    vocab = Tokenizer(tokenizer).n_words
    ckpt1, ckpt2 = tmp_path / "mp1", tmp_path / "mp2"
    write_checkpoint(ckpt1, _tiny_ckpt_args(vocab), tokenizer)
    shutdown()  # the command starts its own world of one
    for name in DIST_ENV:
        os.environ.pop(name, None)

    assert cli_main(["eval", str(ckpt1), "--data", str(data_dir), *EVAL_ARGV]) == 0
    loss1 = _printed_loss(capsys.readouterr().out)
    model = load_model(ckpt1, 16, 2, device="cpu")
    loader = TokenLoader(str(data_dir), split="val", seq_len=16, micro_batch_size=2, dp_rank=0, dp_size=1,
                         seed=1234)
    expected = hand_loss(model, [next(loader) for _ in range(3)])
    assert loss1 == pytest.approx(expected, abs=1e-4)

    split_checkpoint(ckpt1, ckpt2, 2)
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    run = subprocess.run([sys.executable, "-m", "llama_dist.cli", "eval", str(ckpt2), "--data", str(data_dir),
                          *EVAL_ARGV], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert "starting 2 ranks" in run.stderr and "mp 2" in run.stderr
    assert run.stdout.count("val loss") == 1  # rank 0 only
    assert _printed_loss(run.stdout) == pytest.approx(loss1, abs=2e-4)


@pytest.mark.parametrize("flag", ["--seq-len", "--batch-size"])
def test_cli_eval_zero_lengths_are_refused_not_taken_for_the_default(tmp_path, capsys, flag):
    assert cli_main(["eval", str(tmp_path), "--data", str(tmp_path), flag, "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag} must be 1 or more, got 0" in err, err
