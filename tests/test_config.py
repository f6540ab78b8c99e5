"""Config: file + overrides, coercion by type, and a one-line message for each mistake."""

import subprocess
import sys

import pytest

from llama_dist.config import ConfigError, load_config, validate


def test_file_then_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  dim: 256\n  n_heads: 8\n  vocab_size: 512\ntrain:\n  steps: 7\n")
    cfg = load_config(str(path), ["train.steps=9", "optim.lr=1e-4"])
    assert cfg.model.dim == 256 and cfg.model.n_heads == 8  # from the file
    assert cfg.train.steps == 9  # the override beats the file
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.model.n_layers == 32  # untouched default


def test_bundled_name_resolves():
    assert load_config("tiny").model.dim == 128
    assert load_config("configs/tiny.yaml").model.vocab_size == 4096


def test_values_are_coerced_by_type():
    cfg = load_config("tiny", [
        "train.steps=12", "optim.lr=3e-4", "log.tensorboard=false", "train.compile=yes",
        "model.n_kv_heads=null", "model.ffn_dim_multiplier=1.3", "model.norm_eps=1e-6",
        "train.run_dir=runs/x", "model.rope_theta=500000", "log.cpu_peak_tflops=0.5",
    ])
    assert cfg.train.steps == 12 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.log.tensorboard is False and cfg.train.compile is True
    assert cfg.model.n_kv_heads is None and cfg.model.ffn_dim_multiplier == 1.3
    assert cfg.model.rope_theta == 500000.0 and isinstance(cfg.model.rope_theta, float)
    assert cfg.train.run_dir == "runs/x" and cfg.log.cpu_peak_tflops == 0.5


@pytest.mark.parametrize("override, message", [
    ("train.steps=ten", "'train.steps' must be int, got 'ten'"),
    ("train.steps=1.5", "'train.steps' must be int, got 1.5"),
    ("train.steps=1.25e1", "'train.steps' must be a whole number, got 1.25e1"),  # not truncated to 12
    ("train.steps=1e-3", "'train.steps' must be a whole number, got 1e-3"),  # not truncated to 0
    ("log.tensorboard=maybe", "'log.tensorboard' must be bool"),
    ("optim.lr=fast", "'optim.lr' must be float"),
    ("model.dimm=3", "unknown key 'model.dimm'; valid keys in 'model': dim, n_layers"),
    ("modle.dim=3", "unknown config section 'modle'; valid sections: model, parallel, data"),
    ("train.steps", "must look like section.key=value"),
    ("steps=3", "must be section.key"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_text_settings_keep_the_text_as_typed():
    """YAML reads 010 as octal 8, 1.10 as 1.1 and yes as true: a directory name is none of those."""
    cfg = load_config("tiny", ["train.run_dir=010", "data.dir=1.10", "data.tokenizer=yes", "train.dtype=fp32"])
    assert (cfg.train.run_dir, cfg.data.dir, cfg.data.tokenizer) == ("010", "1.10", "yes")
    assert load_config("tiny", ["model.rope_theta=1e4"]).model.rope_theta == 10000.0  # numbers still parse


def test_a_config_that_is_not_text_is_named_in_one_line(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(bytes(range(128, 256)))
    with pytest.raises(ConfigError, match=r"weights.yaml: cannot be read as a YAML text file") as err:
        load_config(str(path))
    assert "\n" not in str(err.value)


def test_whole_numbers_with_an_exponent_are_ints():
    cfg = load_config("tiny", ["train.steps=1e3", "optim.warmup_steps=2.5e1"])
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.optim.warmup_steps == 25


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'; valid keys in 'optim': lr, min_lr"):
        load_config(str(path))


def test_missing_file_names_the_bundled_choices():
    with pytest.raises(ConfigError, match="config file 'nope' not found; give a path or one of: .*tiny"):
        load_config("nope")


@pytest.mark.parametrize("overrides, message", [
    (["parallel.mp=3"], "model.n_heads=4 is not divisible by parallel.mp=3"),
    (["model.n_kv_heads=3"], "model.n_heads=4 is not divisible by model.n_kv_heads=3"),
    (["model.n_heads=8", "model.n_kv_heads=2", "parallel.mp=4"], "model.n_kv_heads=2 is not divisible by parallel.mp=4"),
    (["model.dim=130"], "model.dim=130 is not divisible by model.n_heads=4"),
    (["model.dim=120", "model.n_heads=8"], "head dim model.dim/model.n_heads=15 must be even"),
    (["model.vocab_size=4095", "parallel.mp=2"], "model.vocab_size=4095 is not divisible by parallel.mp=2"),
    (["model.multiple_of=5", "parallel.mp=2"], "FFN width 345 is not divisible by parallel.mp=2"),
    (["data.seq_len=512"], "data.seq_len=512 exceeds model.max_seq_len=256"),
    (["optim.min_lr=1"], "optim.min_lr=1.0 is above optim.lr=0.003"),
    (["train.dtype=fp8"], "train.dtype='fp8' must be auto, fp32 or bf16"),
    (["train.device=cuda", "parallel.backend=gloo"], "train.device=cuda does not go with parallel.backend=gloo"),
    (["train.device=cpu", "parallel.backend=nccl"], "train.device=cpu does not go with parallel.backend=nccl"),
    (["model.n_layers=0"], "model.n_layers must be positive, got 0"),
])
def test_invalid_combinations_name_both_values(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["log.interval=0"], "log.interval must be positive, got 0"),  # else a ZeroDivisionError in train.py
    (["train.steps=0"], "train.steps must be positive, got 0"),
    (["train.eval_batches=0"], "train.eval_batches must be positive, got 0; set train.eval_interval=0"),
    (["optim.beta1=1"], "optim.beta1 must be in [0, 1), got 1.0"),
    (["optim.beta2=-0.1"], "optim.beta2 must be in [0, 1), got -0.1"),
    (["optim.eps=-1e-8"], "optim.eps must be >= 0, got -1e-08"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps must be >= 0, got -1"),
    (["optim.lr=-0.1", "optim.min_lr=-1"], "optim.lr must be >= 0, got -0.1"),
    (["optim.min_lr=-1e-5"], "optim.min_lr must be >= 0, got -1e-05"),
    (["optim.lr=.nan"], "optim.lr must be >= 0, got nan"),
    (["optim.grad_clip=-1"], "optim.grad_clip must be >= 0, got -1.0"),
    (["checkpoint.keep_last=-2"], "checkpoint.keep_last must be >= 0, got -2"),
    (["train.eval_interval=-5"], "train.eval_interval must be >= 0, got -5"),
    (["train.max_bad_steps=0"], "train.max_bad_steps must be positive, got 0"),
    (["model.norm_eps=0"], "model.norm_eps must be positive, got 0.0"),  # params.json would lose it
    (["parallel.timeout_minutes=0"], "parallel.timeout_minutes must be positive, got 0.0"),
    (["parallel.timeout_minutes=inf"], "parallel.timeout_minutes must be at most 525600 (a year), got inf"),
    # past what timedelta takes: an OverflowError traceback in every rank
    (["parallel.timeout_minutes=1e13"], "parallel.timeout_minutes must be at most 525600 (a year), got 10000000000000.0"),
    (["train.run_dir="], "train.run_dir must not be empty; give a directory"),  # else checkpoints land in ./
    (["data.dir= "], "data.dir must not be empty; give a directory"),
    (["log.cpu_peak_tflops=-2"], "log.cpu_peak_tflops must be a positive number of TFLOP/s, got -2.0"),
    (["log.cpu_peak_tflops=.nan"], "log.cpu_peak_tflops must be a positive number of TFLOP/s, got nan"),
    (["model.use_scaled_rope=true"], "model.use_scaled_rope=true needs a model.rope_theta"),
])
def test_out_of_range_values(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_range_edges_are_accepted():
    cfg = load_config("tiny", ["optim.beta1=0", "optim.beta2=0.999", "optim.eps=0", "optim.warmup_steps=0",
                               "optim.lr=0", "optim.min_lr=0", "log.interval=1", "train.steps=1"])
    assert cfg.optim.beta2 == 0.999 and cfg.train.steps == 1
    # with validation off, its batch count is not used
    assert load_config("tiny", ["train.eval_interval=0", "train.eval_batches=0"]).train.eval_batches == 0


def test_world_size_must_match_parallel_sizes():
    cfg = load_config("tiny", ["parallel.mp=2"])
    with pytest.raises(ConfigError, match="world size 3 is not divisible by parallel.mp=2"):
        validate(cfg, world_size=3)
    cfg.parallel.dp = 3
    with pytest.raises(ConfigError, match=r"parallel.dp=3 x parallel.mp=2 does not equal the world size 4"):
        validate(cfg, world_size=4)
    cfg.parallel.dp = 2
    validate(cfg, world_size=4)


def test_cli_prints_resolved_yaml_and_one_line_errors():
    ok = subprocess.run([sys.executable, "-m", "llama_dist.cli", "config", "tiny", "train.steps=5"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    import yaml

    assert yaml.safe_load(ok.stdout)["train"]["steps"] == 5
    bad = subprocess.run([sys.executable, "-m", "llama_dist.cli", "config", "tiny", "model.dimm=3"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        bad.stderr.strip()
    ] and "unknown key 'model.dimm'" in bad.stderr and "Traceback" not in bad.stderr
