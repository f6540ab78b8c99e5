"""What a run refuses to start with, in one line and with nothing saved lost: checkpoints of
another size or shape, corrupt or weights-only ones, a missing tokenizer, more processes than
GPUs, no compiler for torch.compile; the launcher's preflight refuses the same first."""

import json
import os
import re

import pytest
import torch

from llama_dist import distributed
from llama_dist.checkpoint import latest_checkpoint
from llama_dist.checkpoint_files import shard_file, verify_manifest
from llama_dist.config import load_config
from llama_dist.errors import UserError
from llama_dist.train import train
from multiproc import run_ranks
from conftest import copy_run
from test_train import TINY, tiny_config


def _resume_error(data_dir, run, overrides):
    """In each rank: resume `run` with overrides; return the UserError's message."""
    try:
        train(tiny_config(data_dir, run, "train.steps=4", *overrides))
    except UserError as err:
        return str(err)
    return None


def test_resuming_at_another_mp_size_names_both_sizes_and_reshard(data_dir, committed_run, tmp_path):
    """Two real mp=2 ranks meet an mp=1 checkpoint: both refuse (no hang) and say how to fix it."""
    run = copy_run(committed_run, tmp_path)
    messages = run_ranks(_resume_error, 2, data_dir, run, ["parallel.mp=2"])
    for message in messages:
        assert message is not None, "resumed an mp=1 checkpoint at mp=2"
        assert "\n" not in message
        assert "MP=1" in message and "parallel.mp=2" in message
        assert "llama-dist reshard" in message and "--mp 2" in message
    assert latest_checkpoint(run).name == "step-000002"  # nothing was trained or saved


def test_resuming_with_another_model_shape_names_the_key(data_dir, committed_run, tmp_path):
    run = copy_run(committed_run, tmp_path)
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
    run = copy_run(committed_run, tmp_path)
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


def _train_mp2_for_two_steps(data_dir, run):
    return train(tiny_config(data_dir, run, "parallel.mp=2", "train.steps=2", "checkpoint.interval=2"))


def test_a_corrupt_shard_of_one_rank_stops_every_rank_before_it_trains(data_dir, tmp_path):
    """At mp=2 only rank 1 reads consolidated.01.pth: rank 0 must not go on to train and die (or
    under NCCL, wait) in its first collective with a rank that has stopped."""
    run = tmp_path / "run"
    assert run_ranks(_train_mp2_for_two_steps, 2, data_dir, run) == [0, 0]
    shard = latest_checkpoint(run) / shard_file(1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    messages = run_ranks(_resume_error, 2, data_dir, run, ["parallel.mp=2"])
    assert "sha256" in messages[1] and shard.name in messages[1]
    assert messages[0] == f"another rank could not load its part of {latest_checkpoint(run)}; its error says why"
    assert sorted(p.name for p in run.glob("ERROR.*")) == ["ERROR.1"]
    assert latest_checkpoint(run).name == "step-000002"


def test_a_truncated_shard_is_reported_as_corrupt_not_as_unreadable(data_dir, committed_run, tmp_path):
    """The files load while their sha256s are checked; when the load fails first, the check's
    verdict is the error (the loader's own would send the user looking in the wrong place)."""
    run = copy_run(committed_run, tmp_path)
    weights = latest_checkpoint(run) / shard_file(0)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match=r"consolidated.00.pth does not match its sha256 in manifest.json"):
        train(tiny_config(data_dir, run, "train.steps=4"))


def test_a_flipped_byte_in_the_rng_state_fails_the_sha256_check(data_dir, committed_run, tmp_path):
    """Every file a resume reads is checked, the RNG state too, not only the weights."""
    run = copy_run(committed_run, tmp_path)
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
    run = copy_run(committed_run, tmp_path)
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


def test_a_data_dir_that_is_a_file_is_named_as_such_first_and_leaves_no_run_dir(data_dir, tmp_path, caplog):
    (tmp_path / "notes.txt").write_text("not a dataset")
    cfg = load_config("tiny", [*TINY, f"data.dir={tmp_path / 'notes.txt'}", f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match=r"notes\.txt is a file, not a directory; give the directory `llama-dist "
                                        r"prepare` wrote"):
        train(cfg)
    assert "tokenizer.model is missing" not in caplog.text  # no advice about a tokenizer in a file
    assert not (tmp_path / "run").exists()


def test_resume_false_refuses_a_run_dir_that_already_has_checkpoints(data_dir, committed_run, tmp_path):
    """A fresh run would save beside the old run's checkpoints (its step-2 kept, as committed),
    and a later resume could land in the old run: refuse, and touch nothing."""
    run = copy_run(committed_run, tmp_path)
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

    run = copy_run(committed_run, tmp_path)
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

    run = copy_run(committed_run, tmp_path)
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
