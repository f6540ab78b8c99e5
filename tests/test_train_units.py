"""The trainer's pieces one at a time: the LR schedule, weight-decay groups, refusing
incompatible or corrupt checkpoints, the rank-0 step line, and torch.compile."""

import io
import json
import logging
import math
import os
import re
import shutil

import pytest
import torch

from llama_dist import distributed
from llama_dist.checkpoint import latest_checkpoint
from llama_dist.checkpoint_files import shard_file, verify_manifest
from llama_dist.errors import UserError
from llama_dist.model import Transformer, flops_per_token
from llama_dist.train import build_optimizer, lr_at, train
from multiproc import run_ranks
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


# --------------------------------------------------------------------------- refusing checkpoints


@pytest.fixture(scope="module")
def committed_run(data_dir, tmp_path_factory):
    """A real run with a committed step-2 checkpoint at mp=1; tests resume copies of it."""
    run = tmp_path_factory.mktemp("committed") / "run"
    assert train(tiny_config(data_dir, run, "train.steps=2", "checkpoint.interval=2")) == 0
    assert latest_checkpoint(run).name == "step-000002"
    return run


def _copy(run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def _resume_error(data_dir, run, overrides):
    """In each rank: resume `run` with overrides; return the UserError's message."""
    try:
        train(tiny_config(data_dir, run, "train.steps=4", *overrides))
    except UserError as err:
        return str(err)
    return None


def test_resuming_at_another_mp_size_names_both_sizes_and_reshard(data_dir, committed_run, tmp_path):
    """Two real mp=2 ranks meet an mp=1 checkpoint: both refuse (no hang) and say how to fix it."""
    run = _copy(committed_run, tmp_path)
    messages = run_ranks(_resume_error, 2, data_dir, run, ["parallel.mp=2"])
    for message in messages:
        assert message is not None, "resumed an mp=1 checkpoint at mp=2"
        assert "\n" not in message
        assert "MP=1" in message and "parallel.mp=2" in message
        assert "llama-dist reshard" in message and "--mp 2" in message
    assert latest_checkpoint(run).name == "step-000002"  # nothing was trained or saved


def test_resuming_with_another_model_shape_names_the_key(data_dir, committed_run, tmp_path):
    run = _copy(committed_run, tmp_path)
    saved_dim = tiny_config(data_dir, run).model.dim
    new_dim = saved_dim // 2
    with pytest.raises(UserError) as err:
        train(tiny_config(data_dir, run, "train.steps=4", f"model.dim={new_dim}"))
    message = str(err.value)
    assert "\n" not in message
    assert f"dim={saved_dim}" in message and f"model.dim={new_dim}" in message
    assert latest_checkpoint(run).name == "step-000002"


def test_a_flipped_byte_in_the_weights_fails_the_sha256_check(data_dir, committed_run, tmp_path):
    """checkpoint.verify is on by default, so a corrupt shard is refused before it is loaded."""
    run = _copy(committed_run, tmp_path)
    ckpt = latest_checkpoint(run)
    weights = ckpt / shard_file(0)
    verify_manifest(ckpt, [weights.name])  # intact: passes
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    with pytest.raises(UserError, match="sha256") as err:
        verify_manifest(ckpt, [weights.name])
    assert "\n" not in str(err.value)

    cfg = tiny_config(data_dir, run, "train.steps=4")
    assert cfg.checkpoint.verify
    with pytest.raises(UserError) as err:
        train(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert "sha256" in message and weights.name in message
    assert latest_checkpoint(run).name == "step-000002"


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


def test_a_truncated_shard_is_reported_as_corrupt_not_as_unreadable(data_dir, committed_run, tmp_path):
    """The files load while their sha256s are checked; when the load fails first, the check's
    verdict is the error (the loader's own would send the user looking in the wrong place)."""
    run = _copy(committed_run, tmp_path)
    weights = latest_checkpoint(run) / shard_file(0)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match=r"consolidated.00.pth does not match its sha256 in manifest.json"):
        train(tiny_config(data_dir, run, "train.steps=4"))


def test_a_flipped_byte_in_the_rng_state_fails_the_sha256_check(data_dir, committed_run, tmp_path):
    """Every file a resume reads is checked, the RNG state too, not only the weights."""
    run = _copy(committed_run, tmp_path)
    rng = latest_checkpoint(run) / "rng.00000.pt"
    data = bytearray(rng.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rng.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"rng.00000.pt does not match its sha256"):
        train(tiny_config(data_dir, run, "train.steps=4"))


def _rewrite_params(ckpt):
    path = ckpt / "params.json"
    path.write_text(path.read_text().replace('"n_layers": 2', '"n_layers": 3'))


def _strip_to_weights(ckpt):
    for name in ("optimizer.00.pt", "train_state.json"):
        (ckpt / name).unlink()


def _break_manifest_entry(ckpt):
    path = ckpt / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["params.json"] = "not an entry"
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, verify, message", [
    # a corrupt params.json is the file's fault, not the config's
    (_rewrite_params, "true", r"params.json does not match its sha256 in manifest.json"),
    # weights alone (a Meta release resharded into the run): nothing to resume, whatever verify says
    (_strip_to_weights, "true", r"holds no train_state.json, so training cannot resume from it"),
    (_strip_to_weights, "false", r"holds no train_state.json, so training cannot resume from it"),
    (_break_manifest_entry, "true", r"manifest.json is not a manifest of files and sha256s"),
    (lambda ckpt: (ckpt / "train_state.json").write_text("[1, 2]"), "false",
     r"train_state.json is damaged \(not a JSON object\); resume from an earlier checkpoint"),
])
def test_a_damaged_or_weights_only_checkpoint_is_named_in_one_line(data_dir, committed_run, tmp_path,
                                                                   damage, verify, message):
    run = _copy(committed_run, tmp_path)
    ckpt = latest_checkpoint(run)
    damage(ckpt)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    with pytest.raises(UserError, match=message) as err:
        train(tiny_config(data_dir, run, "train.steps=4", f"checkpoint.verify={verify}"))
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_a_tokenizer_path_that_is_not_there_stops_the_run_before_it_trains(data_dir, tmp_path):
    """Else every checkpoint would be committed without the tokenizer copy it should carry."""
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"data.tokenizer=\S+missing.model is not a file; fix the path"):
        train(tiny_config(data_dir, run, "train.steps=2", f"data.tokenizer={tmp_path / 'missing.model'}"))
    assert latest_checkpoint(run) is None


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


def test_resume_false_refuses_a_run_dir_that_already_has_checkpoints(data_dir, committed_run, tmp_path):
    """A fresh run would save beside the old run's checkpoints (its step-2 kept, as committed),
    and a later resume could land in the old run: refuse, and touch nothing."""
    run = _copy(committed_run, tmp_path)
    ckpt = latest_checkpoint(run)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    with pytest.raises(UserError) as err:
        train(tiny_config(data_dir, run, "train.steps=2", "checkpoint.resume=false", "train.seed=7"))
    message = str(err.value)
    assert "\n" not in message and "step-000002" in message and "checkpoint.resume=false" in message
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_preflight_refuses_what_the_ranks_would_refuse_in_one_line(data_dir, committed_run, tmp_path, monkeypatch,
                                                                   capsys):
    """`--nproc 2` checks the checkpoint it would resume before any rank starts: one line, exit 2."""
    from llama_dist import launcher
    from llama_dist.cli import main
    from llama_dist.train import preflight
    from test_train import TINY

    run = _copy(committed_run, tmp_path)
    cases = {"parallel.mp=2": "has MP=1 shards but this run has parallel.mp=2",
             "checkpoint.resume=false": "checkpoint.resume=false; choose a new train.run_dir",
             "model.n_layers=3": "n_layers=2 in params.json but the config has model.n_layers=3",
             "data.seed=9": "the saved loader state has seed=",
             "data.tokenizer=/no/such/tokenizer.model": "data.tokenizer=/no/such/tokenizer.model is not a file"}
    for override, message in cases.items():
        with pytest.raises(UserError, match=re.escape(message)):
            preflight(tiny_config(data_dir, run, override), world_size=2)
    preflight(tiny_config(data_dir, run), world_size=2)  # as saved: fine

    monkeypatch.setattr(launcher, "relaunch", lambda *args: pytest.fail("started the ranks"))
    argv = ["tiny", *TINY, f"data.dir={data_dir}", f"train.run_dir={run}", "parallel.mp=2", "--nproc", "2"]
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "llama-dist reshard" in err, err


def test_a_val_split_too_small_for_a_batch_is_refused_before_the_first_step(data_dir, tmp_path, monkeypatch):
    from llama_dist.loader import TokenLoader
    from llama_dist.train import Trainer

    val_tokens = TokenLoader(data_dir, "val", 32, 1, 0, 1).n_tokens
    batch = val_tokens // 32 + 1  # one sequence more than the val split holds
    monkeypatch.setattr(Trainer, "train_step", lambda *args: pytest.fail("trained before checking the val split"))
    cfg = tiny_config(data_dir, tmp_path / "run", "train.eval_interval=2", f"data.micro_batch_size={batch}")
    with pytest.raises(UserError, match="val split .* fewer than one global batch"):
        train(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_nccl_without_cuda_is_refused_before_any_rank_starts(data_dir, tmp_path):
    from llama_dist.train import preflight

    cfg = tiny_config(data_dir, tmp_path / "run", "train.device=auto", "parallel.backend=nccl")
    with pytest.raises(UserError, match=r"^parallel.backend=nccl needs a CUDA device and none is visible; "):
        preflight(cfg, world_size=2)


def test_more_processes_than_gpus_are_refused_in_one_line(data_dir, tmp_path, monkeypatch):
    """On a one-GPU machine, --nproc 2 (or a torchrun with 2 local ranks) would end in CUDA's
    'invalid device ordinal' traceback from rank 1, with no ERROR file for the launcher."""
    from llama_dist.train import preflight

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = tiny_config(data_dir, tmp_path / "run", "parallel.mp=2", "train.device=auto", "parallel.backend=auto")
    message = r"^2 processes on this node but 1 GPU\(s\) visible, and each process takes one; start 1 per node"
    with pytest.raises(UserError, match=message):
        preflight(cfg, world_size=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # what torchrun tells each rank
    with pytest.raises(UserError, match=message):
        distributed.init_distributed(mp=2)
    assert distributed.pick_device("auto", "auto", local_processes=1).type == "cuda"
    assert distributed.pick_device("auto", "gloo", local_processes=2).type == "cpu"  # gloo: CPU tensors


def test_train_command_line_takes_overrides_after_options_and_refuses_nproc_below_one(monkeypatch, capsys):
    from llama_dist import train as train_module

    seen = []
    monkeypatch.setattr(train_module, "train", lambda cfg: seen.append(cfg) or 0)
    assert train_module.cli(["tiny", "--nproc", "1", "train.steps=3", "optim.lr=1e-3"]) == 0
    assert (seen[0].train.steps, seen[0].optim.lr) == (3, 1e-3)
    for bad in ("0", "-3"):  # ran one process as if nothing were wrong
        with pytest.raises(SystemExit) as exited:
            train_module.cli(["tiny", "--nproc", bad])
        assert exited.value.code == 2 and f"--nproc must be 1 or more, got {bad}" in capsys.readouterr().err
    assert len(seen) == 1


def test_compiling_on_a_cpu_without_a_cpp_compiler_is_one_line(data_dir, tmp_path):
    """Before: the first step failed deep in inductor with a traceback per rank."""
    import subprocess
    import sys

    from test_train import TINY

    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    env.update(PATH=str(empty), OMP_NUM_THREADS="1")  # no g++ to be found
    cmd = [sys.executable, "-m", "llama_dist.train", "tiny", *TINY, f"data.dir={data_dir}",
           f"train.run_dir={tmp_path / 'run'}", "train.steps=1", "train.compile=true"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "train.compile=true on a CPU needs a C++ compiler and none was found" in last, done.stderr
    assert "Traceback" not in done.stderr and latest_checkpoint(tmp_path / "run") is None


def test_resumed_optimizer_state_is_a_copy_not_a_view_of_the_file(data_dir, committed_run, tmp_path):
    """The optimizer file is memory-mapped on load (a GPU rank never reads its whole state into
    host memory); the state must still be copied out, or a prune deleting that checkpoint, or
    anything rewriting the file, would pull the moments from under the run."""
    from llama_dist.checkpoint import optimizer_state_tensors
    from llama_dist.checkpoint_files import optimizer_file
    from llama_dist.train import Trainer

    run = _copy(committed_run, tmp_path)
    path = latest_checkpoint(run) / optimizer_file(0)
    saved = torch.load(path, weights_only=True)
    trainer = Trainer(tiny_config(data_dir, run, "train.steps=4"), distributed.init_distributed(1, "gloo", "cpu"))
    trainer.resume()
    with open(path, "r+b") as file:  # in place: the same inode a mapping would still read
        file.write(bytes(path.stat().st_size))
    state = optimizer_state_tensors(trainer.model, trainer.optimizer)
    assert state.keys() == saved.keys() and any(key.startswith("exp_avg/") for key in state)
    for key, value in saved.items():
        assert torch.equal(state[key].cpu(), value), key


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
