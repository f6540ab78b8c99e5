"""The trainer's pieces one at a time: the LR schedule, weight-decay groups, the rank-0 step
line, throughput windows, torch.compile, optimizer state and precision. What a run refuses to
start with is in test_train_refusals.py."""

import io
import logging
import math
import re

import pytest
import torch

from llama_dist import distributed
from llama_dist.model import Transformer, flops_per_token
from llama_dist.train import build_optimizer, lr_at, train
from test_train import _train_and_record, tiny_config

from conftest import VOCAB

# --------------------------------------------------------------------------- lr_at


def _schedule_config(tmp_path, warmup, steps, lr=1e-3, min_lr=1e-4):
    return tiny_config(tmp_path, tmp_path / "run", f"optim.lr={lr}", f"optim.min_lr={min_lr}",
                       f"optim.warmup_steps={warmup}", f"train.steps={steps}")


def test_lr_warms_up_linearly_to_the_peak(tmp_path):
    """Step k of W warmup steps runs at lr * (k + 1) / W: never 0, and exactly lr at the last one."""
    cfg = _schedule_config(tmp_path, warmup=10, steps=110)
    lr, warmup = cfg.optim.lr, cfg.optim.warmup_steps
    assert lr_at(0, cfg) == pytest.approx(lr / warmup)
    for step in range(warmup):
        assert lr_at(step, cfg) == pytest.approx(lr * (step + 1) / warmup), step
    assert lr_at(warmup - 1, cfg) == pytest.approx(lr)
    assert lr_at(warmup, cfg) == pytest.approx(lr)  # cosine starts at its top
    # the peak is optim.lr, and nothing exceeds it
    assert max(lr_at(s, cfg) for s in range(cfg.train.steps + 5)) == pytest.approx(lr)


def test_lr_decays_by_a_cosine_to_min_lr_and_stays_there(tmp_path):
    """After warmup: min + (lr - min) * (1 + cos(pi * progress)) / 2, floored at min_lr from train.steps on."""
    cfg = _schedule_config(tmp_path, warmup=10, steps=110)
    lr, min_lr, warmup, steps = cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, cfg.train.steps
    span = steps - warmup
    assert lr_at(warmup + span // 2, cfg) == pytest.approx((lr + min_lr) / 2)  # the midpoint
    quarter = min_lr + (lr - min_lr) * (1 + math.cos(math.pi / 4)) / 2
    assert lr_at(warmup + span // 4, cfg) == pytest.approx(quarter)
    assert lr_at(steps, cfg) == pytest.approx(min_lr)
    for step in (steps + 1, steps + 50, 10 * steps):
        assert lr_at(step, cfg) == pytest.approx(min_lr), step
    decay = [lr_at(s, cfg) for s in range(warmup, steps + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly falling on the way down


def test_lr_without_warmup_starts_at_the_peak(tmp_path):
    """optim.warmup_steps=0 (as the equivalence tests use) must not divide by zero."""
    cfg = _schedule_config(tmp_path, warmup=0, steps=8)
    assert lr_at(0, cfg) == pytest.approx(cfg.optim.lr)
    assert lr_at(4, cfg) == pytest.approx((cfg.optim.lr + cfg.optim.min_lr) / 2)
    assert lr_at(8, cfg) == pytest.approx(cfg.optim.min_lr)


# --------------------------------------------------------------------------- build_optimizer


def _decay_by_name(tmp_path, *overrides):
    cfg = tiny_config(tmp_path, tmp_path / "run", "optim.weight_decay=0.25", *overrides)
    distributed.init_distributed(1, "gloo", "cpu")
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    group_of = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            assert id(param) not in group_of, "a parameter is in two groups"
            group_of[id(param)] = group["weight_decay"]
    named = dict(model.named_parameters())
    assert len(group_of) == len(named), "a parameter is in no group"
    return cfg, named, {name: group_of[id(p)] for name, p in named.items()}


def test_norms_and_embeddings_get_no_weight_decay(tmp_path):
    """Decay on gains and embedding rows hurts LLaMA training; every other matrix decays."""
    cfg, params, decay = _decay_by_name(tmp_path)
    exempt = {n for n, p in params.items() if p.ndim == 1} | {"tok_embeddings.weight"}
    assert "norm.weight" in exempt and "layers.0.attention_norm.weight" in exempt  # the rule has subjects
    for name in params:
        expected = 0.0 if name in exempt else cfg.optim.weight_decay
        assert decay[name] == expected, name
    assert decay["output.weight"] == cfg.optim.weight_decay  # the output matrix is no embedding


def test_decay_norms_and_embeddings_decays_every_parameter(tmp_path):
    cfg, params, decay = _decay_by_name(tmp_path, "optim.decay_norms_and_embeddings=true")
    assert decay == {name: cfg.optim.weight_decay for name in params}


# --------------------------------------------------------------------------- the step line

STEP_LINE = re.compile(
    r"^step (?P<step>\d+)/(?P<steps>\d+) \| loss (?P<loss>\S+) \| lr (?P<lr>\S+) \| "
    r"grad norm (?P<norm>\S+) \| (?P<tps>[\d,]+) tok/s \| MFU (?P<mfu>\S+)% \| mem (?P<mem>\S+) GiB \| "
    r"ETA (?P<eta>\d+h\d\dm|\d+m\d\ds)$"
)


def _train_printing(cfg) -> str:
    """Train, and return what the llama_dist logger printed, through its own handler and format."""
    handlers = [h for h in distributed.get_logger().handlers if isinstance(h, logging.StreamHandler)]
    assert handlers, "the llama_dist logger prints nothing"
    buffer = io.StringIO()
    previous = [h.setStream(buffer) for h in handlers]
    try:
        assert train(cfg) == 0
    finally:
        for handler, stream in zip(handlers, previous):
            handler.setStream(stream)
    return buffer.getvalue()


def test_rank0_step_line_has_every_field_with_numbers(data_dir, tmp_path):
    """What a user watches: the printed line."""
    cfg = tiny_config(data_dir, tmp_path / "run", "train.steps=4", "log.interval=1")
    printed = _train_printing(cfg)
    matches = [STEP_LINE.match(line) for line in printed.splitlines() if line.startswith("step ")]
    assert matches and all(matches), printed
    assert [int(m["step"]) for m in matches] == [1, 2, 3, 4]
    peak = cfg.log.cpu_peak_tflops * 1e12
    for m in matches:
        step = int(m["step"])
        assert int(m["steps"]) == cfg.train.steps
        loss = float(m["loss"])
        assert loss == pytest.approx(math.log(VOCAB), rel=0.1)  # a random model's loss
        assert m["lr"] == f"{lr_at(step - 1, cfg):.3e}"  # the rate this step's update used
        norm = float(m["norm"])
        assert math.isfinite(norm) and norm > 0
        tokens_per_sec = float(m["tps"].replace(",", ""))
        assert tokens_per_sec > 0
        # MFU = achieved FLOP/s over the peak (log.cpu_peak_tflops here), in percent
        mfu = 100 * tokens_per_sec * flops_per_token(cfg.model, cfg.data.seq_len) / peak
        slack = 100 * 0.5 * flops_per_token(cfg.model, cfg.data.seq_len) / peak + 0.05  # the rounding
        assert float(m["mfu"]) == pytest.approx(mfu, abs=slack)
        assert float(m["mem"]) > 0


# --------------------------------------------------------------------------- compile


def test_compiled_training_matches_eager(data_dir, tmp_path):
    """train.compile=true must really compile, and change the numbers no more than fusion does."""
    # NOTE: slow on a 2-core CPU: about 50 s with a cold inductor cache (C++ kernels are built),
    # about 10 s once the inductor cache (/tmp/torchinductor_$USER) holds them
    import torch._dynamo

    torch._dynamo.utils.counters.clear()
    code, compiled, _, _, _ = _train_and_record(data_dir, tmp_path / "compiled", ["train.steps=2", "train.compile=true"])
    assert code == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    distributed.shutdown()
    code, eager, _, _, _ = _train_and_record(data_dir, tmp_path / "eager", ["train.steps=2"])
    assert code == 0
    assert [step for step, _ in compiled] == [step for step, _ in eager] == [1, 2]
    for (_, got), (_, expected) in zip(compiled, eager):
        assert math.isfinite(got)
        assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("pause, override", [("validate", "train.eval_interval=2"),
                                             ("save", "checkpoint.interval=2")])
def test_validation_and_save_time_are_left_out_of_throughput(data_dir, tmp_path, monkeypatch, pause, override):
    """A validation or a save inside a log window is not training time: tok/s counts every step
    of the window over those steps' own time. The loop's clock is a fake that moves only in the
    steps (STEP_S each) and the pause (5 * STEP_S), so the figure is exact whatever the host's
    load: counted, the pause would make the 4 steps take 9 step times."""
    from llama_dist import train as train_module
    from llama_dist.train import Trainer

    step_s = 0.25
    clock = [1000.0]
    monkeypatch.setattr(train_module, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    train_step, paused = Trainer.train_step, getattr(Trainer, pause)

    def slow_step(self, *args):
        clock[0] += step_s
        return train_step(self, *args)

    def slow_pause(self):
        clock[0] += 5 * step_s
        return paused(self)

    monkeypatch.setattr(Trainer, "train_step", slow_step)
    monkeypatch.setattr(Trainer, pause, slow_pause)
    cfg = tiny_config(data_dir, tmp_path / "run", "train.steps=4", "log.interval=4", override)
    printed = _train_printing(cfg)
    line = next(STEP_LINE.match(text) for text in printed.splitlines() if text.startswith("step 4/"))
    tokens_per_step = cfg.data.seq_len * cfg.data.micro_batch_size
    assert float(line["tps"].replace(",", "")) == round(tokens_per_step / step_s)


def test_save_shard_writes_each_tensor_alone_and_returns_the_files_sha256(tmp_path):
    """Views of one big tensor must not drag its whole storage into the file (Meta's loader
    reads each tensor as saved), and the returned sha256, taken while writing, is the file's."""
    from llama_dist.files import sha256_file
    from llama_dist.meta_format import save_shard

    base = torch.randn(64, 32)
    state = {"rows": base[:4], "transposed": base[:8, :8].t(), "scalar": torch.tensor(2.5),
             "half": torch.randn(16).to(torch.bfloat16)}
    path = tmp_path / "consolidated.00.pth"
    digest = save_shard(state, path)
    assert digest == sha256_file(path)
    back = torch.load(path, weights_only=True)
    assert list(back) == list(state)
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor) and back[key].dtype == tensor.dtype, key
        assert back[key].untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), key
    assert path.stat().st_size < base.numel() * base.element_size()  # the 8 KiB base is not in it
    assert not list(tmp_path.glob("*.tmp"))


def test_optimizer_state_goes_to_the_host_one_tensor_at_a_time():
    """optimizer_state_tensors leaves each moment on its device (the meta device stands in for a
    GPU here, which no tensor can be copied out of); save_shard copies them over one by one."""
    from llama_dist.checkpoint import optimizer_state_tensors

    model = torch.nn.Linear(4, 3, device="meta")
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.state[model.weight] = {"exp_avg": torch.empty(3, 4, device="meta"), "step": torch.tensor(1.0)}
    state = optimizer_state_tensors(model, optimizer)
    assert state["exp_avg/weight"].device.type == "meta" and state["step/weight"].item() == 1.0


@pytest.mark.parametrize("capability, dtype, expected", [
    ((9, 0), "auto", torch.bfloat16),  # H100
    ((8, 0), "auto", torch.bfloat16),  # A100
    ((7, 0), "auto", torch.float32),  # V100: bf16 only emulated, slower than fp32
    ((7, 5), "bf16", torch.bfloat16),  # T4, asked for explicitly
    ((9, 0), "fp32", torch.float32),
])
def test_auto_precision_is_bf16_only_on_gpus_with_bf16_tensor_cores(tmp_path, monkeypatch, capability, dtype,
                                                                     expected):
    from llama_dist.train import resolve_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cfg = tiny_config(tmp_path, tmp_path / "run", f"train.dtype={dtype}")
    assert resolve_dtype(cfg, torch.device("cuda", 0)) == expected
    assert resolve_dtype(cfg, torch.device("cpu")) == (torch.bfloat16 if dtype == "bf16" else torch.float32)
