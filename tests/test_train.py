"""The training loop over real gloo ranks: exact resume, dp/accumulation equivalence,
Meta-format checkpoints, NaN steps, TensorBoard."""

import json

import pytest
import torch

from llama_dist import distributed
from llama_dist.checkpoint import committed_checkpoints, latest_checkpoint
from llama_dist.config import load_config
from llama_dist.run_checks import checkpoint_bytes
from llama_dist.train import EXIT_DIVERGED, Trainer, train
from multiproc import run_ranks

from conftest import VOCAB

TINY = [
    f"model.vocab_size={VOCAB}", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.multiple_of=16", "model.max_seq_len=64", "data.seq_len=32", "data.micro_batch_size=4",
    "train.eval_interval=0", "log.interval=1", "log.tensorboard=false", "log.cpu_peak_tflops=0.1",
    "optim.warmup_steps=2", "checkpoint.interval=0", "train.device=cpu", "parallel.backend=gloo",
]


def tiny_config(data_dir, run_dir, *extra):
    return load_config("tiny", [*TINY, f"data.dir={data_dir}", f"train.run_dir={run_dir}", *extra])


def _train_and_record(data_dir, run_dir, overrides):
    """Run the trainer in this rank; return (step, loss) history and the final weights."""
    cfg = tiny_config(data_dir, run_dir, *overrides)
    info = distributed.init_distributed(cfg.parallel.mp, "gloo", "cpu")
    trainer = Trainer(cfg, info)
    trainer.resume()
    history = []
    original = trainer.train_step

    def recording_step(*args):
        result = original(*args)
        history.append((trainer.step + 1, result[0]))
        return result

    trainer.train_step = recording_step
    code = trainer.run()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return code, history, weights, info.mp_rank, info.dp_rank


def _straight_then_interrupted(data_dir, root, k):
    """In each of 4 ranks: 2k steps straight; then k steps, and a fresh trainer resuming to 2k."""
    mp2 = ["parallel.mp=2"]
    straight = _train_and_record(data_dir, root / "straight", [*mp2, f"train.steps={2 * k}"])
    first = _train_and_record(data_dir, root / "resumed", [*mp2, f"train.steps={k}"])
    second = _train_and_record(data_dir, root / "resumed", [*mp2, f"train.steps={2 * k}"])
    return straight, first, second


def test_resume_is_bit_identical_at_dp2_mp2(data_dir, tmp_path):
    k = 3
    for straight, first, second in run_ranks(_straight_then_interrupted, 4, data_dir, tmp_path, k):
        assert straight[0] == first[0] == second[0] == 0
        losses = [loss for _, loss in straight[1]]
        resumed = [loss for _, loss in first[1] + second[1]]
        assert len(losses) == 2 * k and [step for step, _ in second[1]] == [k + 1, k + 2, k + 3]
        assert resumed == losses  # bit for bit, not approximately
        for name, weight in straight[2].items():
            assert torch.equal(weight, second[2][name]), name


def _one_step_weights(data_dir, run_dir, overrides):
    # eps=1 makes Adam's first update lr * g / (|g| + 1), about lr * g: linear in the
    # gradient, so equal updates mean equal gradients (eps=1e-8 would give sign(g))
    common = ["train.steps=1", "optim.grad_clip=0", "optim.eps=1.0", "optim.lr=10", "optim.min_lr=0",
              "optim.warmup_steps=0", "optim.weight_decay=0"]
    return _train_and_record(data_dir, run_dir, [*common, *overrides])[2]


def test_dp2_equals_bigger_batch_and_accumulation(data_dir, tmp_path):
    dp2 = run_ranks(_one_step_weights, 2, data_dir, tmp_path / "dp2", ["data.micro_batch_size=2"])
    # the single-process references run here, in a world of one
    big = _one_step_weights(data_dir, tmp_path / "big", ["data.micro_batch_size=4"])
    accum = _one_step_weights(data_dir, tmp_path / "accum", ["data.micro_batch_size=2", "train.grad_accum_steps=2"])
    half = _one_step_weights(data_dir, tmp_path / "half", ["data.micro_batch_size=2"])
    init = _one_step_weights(data_dir, tmp_path / "init", ["optim.lr=0"])
    for name in big:
        moved = (big[name] - init[name]).abs().max().item()
        assert moved > 1e-3, f"{name} did not move"
        for other in (dp2[0], dp2[1], accum):
            torch.testing.assert_close(other[name] - init[name], big[name] - init[name],
                                       rtol=0, atol=1e-5 * max(1.0, moved), msg=name)
        # a different batch gives a clearly different update: the comparison can fail
        assert (half[name] - big[name]).abs().max().item() > 1e-3 * moved, name


def _train_mp2(data_dir, run_dir):
    return _train_and_record(data_dir, run_dir, ["parallel.mp=2", "train.steps=40", "optim.lr=3e-3",
                                                 "optim.warmup_steps=5"])[1]


def test_loss_falls_and_mp2_checkpoint_is_metas_layout(data_dir, tmp_path):
    history = run_ranks(_train_mp2, 2, data_dir, tmp_path / "run")[0]
    first, last = history[0][1], sum(loss for _, loss in history[-5:]) / 5
    assert first == pytest.approx(torch.log(torch.tensor(float(VOCAB))).item(), rel=0.1)  # random init
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"

    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step-000040"
    assert sorted(p.name for p in ckpt.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    # the disk check's estimate: under the real size (each rank repeats the norms), never over it
    estimate = checkpoint_bytes(tiny_config(data_dir, tmp_path / "run", "parallel.mp=2"))
    assert 0.9 * sum(p.stat().st_size for p in ckpt.iterdir()) < estimate < sum(p.stat().st_size for p in ckpt.iterdir())
    params = json.loads((ckpt / "params.json").read_text())
    assert params == {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": VOCAB,
                      "multiple_of": 16, "norm_eps": 1e-5}
    hidden = 16 * ((int(2 * 4 * 64 / 3) + 15) // 16)
    expected = {  # Meta's local shapes at MP=2 (Llama 2 layout: embedding split on dim)
        "tok_embeddings.weight": (VOCAB, 32), "output.weight": (VOCAB // 2, 64), "norm.weight": (64,),
        "layers.0.attention.wq.weight": (32, 64), "layers.0.attention.wk.weight": (16, 64),
        "layers.0.attention.wv.weight": (16, 64), "layers.0.attention.wo.weight": (64, 32),
        "layers.0.feed_forward.w1.weight": (hidden // 2, 64), "layers.0.feed_forward.w3.weight": (hidden // 2, 64),
        "layers.0.feed_forward.w2.weight": (64, hidden // 2), "layers.0.attention_norm.weight": (64,),
        "layers.0.ffn_norm.weight": (64,),
    }
    for index in range(2):
        shard = torch.load(ckpt / f"consolidated.{index:02d}.pth", map_location="cpu", weights_only=True)
        assert len(shard) == 3 + 2 * 9
        for key, shape in expected.items():
            assert tuple(shard[key].shape) == shape, key
            assert shard[key].dtype == torch.float32


def test_nan_step_is_skipped_and_counted(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_DIST_FAULT_NAN", "2")
    cfg = tiny_config(data_dir, tmp_path / "run", "train.steps=4", "checkpoint.interval=2")
    assert train(cfg) == 0
    ckpts = committed_checkpoints(tmp_path / "run")
    state = json.loads((ckpts[-1][1] / "train_state.json").read_text())
    assert state["step"] == 4 and state["skipped_steps"] == 1
    # the skipped step left the weights and the optimizer exactly where step 2 put them
    monkeypatch.setenv("LLAMA_DIST_FAULT_NAN", "2")
    cfg = tiny_config(data_dir, tmp_path / "probe", "train.steps=3")
    info = distributed.init_distributed(1, "gloo", "cpu")
    trainer = Trainer(cfg, info)
    trainer.step = 2
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    from llama_dist.train import StopSignal

    _, norm, skipped, _ = trainer.train_step(StopSignal(), {2})
    assert skipped and norm != norm
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert all(p.grad is None for p in trainer.model.parameters())


def test_consecutive_nan_steps_stop_and_keep_the_good_checkpoint(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_DIST_FAULT_NAN", "2,3,4")
    cfg = tiny_config(data_dir, tmp_path / "run", "train.steps=8", "checkpoint.interval=2", "train.max_bad_steps=2")
    assert train(cfg) == EXIT_DIVERGED
    assert latest_checkpoint(tmp_path / "run").name == "step-000002"
    assert [step for step, _ in committed_checkpoints(tmp_path / "run")] == [2]


def test_tensorboard_tags_and_no_duplicated_steps_after_resume(data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    common = ["log.tensorboard=true", "train.eval_interval=3", "train.eval_batches=1", "checkpoint.interval=3"]
    assert train(tiny_config(data_dir, run, "train.steps=4", *common)) == 0
    # the step-4 checkpoint is removed, as if the run had crashed after logging step 4
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-000004")
    assert train(tiny_config(data_dir, run, "train.steps=6", *common)) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("loss/train", "loss/val", "perplexity/val", "lr", "grad_norm", "throughput/tokens_per_sec",
                "mfu", "memory", "skipped_steps"):
        assert tag in tags, tag
    steps = [e.step for e in events.Scalars("loss/train")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("loss/val")] == [3, 6]


def _train_mp2_steps(data_dir, run_dir, steps):
    return _train_and_record(data_dir, run_dir, ["parallel.mp=2", f"train.steps={steps}"])[1]


def test_resume_at_a_new_model_parallel_size_after_reshard(data_dir, tmp_path):
    from llama_dist.reshard import reshard

    straight = run_ranks(_train_mp2_steps, 2, data_dir, tmp_path / "straight", 6)[0]
    run_ranks(_train_mp2_steps, 2, data_dir, tmp_path / "mp2", 3)
    # the mp=2 checkpoint, optimizer state and loader position, resharded into a new run at mp=1
    reshard(latest_checkpoint(tmp_path / "mp2"), tmp_path / "mp1" / "checkpoints" / "step-000003", 1)
    code, resumed, _, _, _ = _train_and_record(data_dir, tmp_path / "mp1", ["train.steps=6"])
    assert code == 0 and [step for step, _ in resumed] == [4, 5, 6]
    # the same run, continued at another mp size: equal up to the order of float sums
    for (_, expected), (_, got) in zip(straight[3:], resumed):
        assert got == pytest.approx(expected, rel=1e-4)


def _train_dp2_steps(data_dir, run_dir, steps):
    return _train_and_record(data_dir, run_dir, ["data.micro_batch_size=2", f"train.steps={steps}"])[1]


def test_resume_at_a_new_data_parallel_size(data_dir, tmp_path):
    """A run started on 2 data-parallel ranks goes on on 1 with the same global batch (torchtitan
    refuses a changed dp size): the loader neither repeats nor skips a sample, so the losses are
    the straight run's up to the order of float sums."""
    straight = run_ranks(_train_dp2_steps, 2, data_dir, tmp_path / "straight", 6)[0]
    run_ranks(_train_dp2_steps, 2, data_dir, tmp_path / "run", 3)
    code, resumed, _, _, _ = _train_and_record(data_dir, tmp_path / "run", ["data.micro_batch_size=4", "train.steps=6"])
    assert code == 0 and [step for step, _ in resumed] == [4, 5, 6]
    for (_, expected), (_, got) in zip(straight[3:], resumed):
        assert got == pytest.approx(expected, rel=1e-4)
