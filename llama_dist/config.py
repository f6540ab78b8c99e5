"""One typed config tree, loaded from YAML with dotted `key=value` overrides.

Every mistake a user can make in a config file or on the command line is a
`ConfigError` with a one-line message naming the problem and the fix; the CLI
prints it without a traceback.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from llama_dist.errors import UserError
from llama_dist.model_args import ModelArgs

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError):
    """A user mistake in a config: printed as one line, never as a traceback."""


@dataclass
class ParallelConfig:
    mp: int = 1  # model-parallel (tensor-parallel) size: shards per layer
    dp: int = -1  # data-parallel size; -1 means world_size // mp
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | nccl | gloo
    timeout_minutes: float = 30.0  # how long a collective waits for the slowest rank (a save) before failing


@dataclass
class DataConfig:
    dir: str = "data/stdlib"  # output of `llama-dist prepare`: manifest.json + shards
    tokenizer: str = ""  # empty: <dir>/tokenizer.model, which prepare copies there
    seq_len: int = 256
    micro_batch_size: int = 8  # sequences per data-parallel rank per forward
    seed: int = 1234  # shuffle seed; the order depends on it and the epoch only
    verify_checksums: bool = False  # sha256 every shard on open (slow on big corpora)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # by the global norm over all shards; 0 disables
    decay_norms_and_embeddings: bool = False


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 1000  # optimizer steps
    grad_accum_steps: int = 1
    seed: int = 42  # the same on every rank, so every mp size starts from the same weights
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on a GPU with bf16 tensor cores, else fp32) | fp32 | bf16
    activation_checkpointing: bool = False
    compile: bool = False
    eval_interval: int = 100  # 0 disables validation
    eval_batches: int = 10
    max_bad_steps: int = 5  # consecutive NaN/Inf steps before the run stops


@dataclass
class CheckpointConfig:
    interval: int = 100  # steps between checkpoints; 0 saves only at the end
    keep_last: int = 3
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this
    resume: bool = True  # resume from the latest complete checkpoint in run_dir; false refuses a run_dir that has one
    verify: bool = True  # check the sha256 manifest on load
    # a checkpoint (ours, or a Meta release) whose weights start a run with none of its own:
    # step 0, a fresh optimizer; once the run has saved, it resumes from its own checkpoints
    init_from: str = ""


@dataclass
class LogConfig:
    interval: int = 10
    tensorboard: bool = True
    cpu_peak_tflops: Optional[float] = None  # MFU denominator on CPU; None: measured at start


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def resolve_config_path(name: str) -> Path:
    """A path, or the bare name of a bundled config (`tiny` -> configs/tiny.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if bundled.is_file():
        return bundled
    choices = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file '{name}' not found; give a path or one of: {choices}")


def load_config(name: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Config from a YAML file (or defaults), then `section.key=value` overrides, validated."""
    raw: dict[str, Any] = {}
    if name:
        path = resolve_config_path(name)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        except (OSError, UnicodeDecodeError) as err:  # a directory, no permission, a binary file
            raise ConfigError(f"{path}: cannot be read as a YAML text file ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    cfg = from_dict(raw)
    for item in overrides or []:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def from_dict(raw: dict[str, Any]) -> Config:
    cfg = Config()
    for section, values in raw.items():
        target = _section(cfg, section)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"section '{section}' must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            _set(target, f"{section}.{key}", key, value)
    return cfg


def apply_override(cfg: Config, item: str) -> None:
    """Apply one `section.key=value`; the value is parsed as YAML, then coerced by type,
    except for a text setting, which takes the text as typed (YAML would turn the run
    directory 010 into 8, and 1.10 into 1.1)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.steps=100)")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"override key '{dotted}' must be section.key (e.g. optim.lr=1e-4)")
    target = _section(cfg, parts[0])
    if typing.get_type_hints(type(target)).get(parts[1]) is str:
        _set(target, dotted, parts[1], text.strip())
        return
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    _set(target, dotted, parts[1], value)


def _section(cfg: Config, name: str) -> Any:
    names = [f.name for f in dataclasses.fields(cfg)]
    if name not in names:
        raise ConfigError(f"unknown config section '{name}'; valid sections: {', '.join(names)}")
    return getattr(cfg, name)


def _set(target: Any, dotted: str, key: str, value: Any) -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    if key not in fields:
        section = dotted.split(".")[0]
        raise ConfigError(
            f"unknown key '{dotted}'; valid keys in '{section}': {', '.join(fields)}"
        )
    hints = typing.get_type_hints(type(target))
    setattr(target, key, coerce(value, hints[key], dotted))


def coerce(value: Any, kind: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return coerce(value, args[0], where)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "on", "1"):
                return True
            if text in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str) and "e" in value.lower():  # YAML leaves 1e3 as text
                number = float(value)
                if not number.is_integer():  # int() would truncate 1.25e1 to 12 without a word
                    raise ConfigError(f"'{where}' must be a whole number, got {value}")
                return int(number)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        name = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"'{where}' must be {name}, got {value!r}") from None
    return value


# --------------------------------------------------------------------------- validation


MAX_TIMEOUT_MINUTES = 525_600


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Reject impossible combinations with a message that names both values."""
    m, p = cfg.model, cfg.parallel
    positive = {
        "model.dim": m.dim, "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
        "model.vocab_size": m.vocab_size, "model.multiple_of": m.multiple_of,
        "model.max_seq_len": m.max_seq_len, "parallel.mp": p.mp,
        "data.seq_len": cfg.data.seq_len, "data.micro_batch_size": cfg.data.micro_batch_size,
        "train.grad_accum_steps": cfg.train.grad_accum_steps, "train.steps": cfg.train.steps,
        "log.interval": cfg.log.interval,  # train.py logs when step % log.interval == 0
        "train.max_bad_steps": cfg.train.max_bad_steps,
        "model.norm_eps": m.norm_eps,  # params.json needs one, and RMSNorm divides by it when x is 0
        "parallel.timeout_minutes": p.timeout_minutes,
    }
    for key, value in positive.items():
        if not value > 0:  # written this way round so that NaN fails too
            raise ConfigError(f"{key} must be positive, got {value}")
    if not p.timeout_minutes <= MAX_TIMEOUT_MINUTES:  # timedelta and the backends take no more
        raise ConfigError(f"parallel.timeout_minutes must be at most {MAX_TIMEOUT_MINUTES} (a year), "
                          f"got {p.timeout_minutes}")
    for key, text in {"train.run_dir": cfg.train.run_dir, "data.dir": cfg.data.dir}.items():
        if not text.strip():  # an empty run_dir would save checkpoints into the working directory
            raise ConfigError(f"{key} must not be empty; give a directory")
    peak = cfg.log.cpu_peak_tflops
    if peak is not None and not (peak > 0 and math.isfinite(peak)):
        raise ConfigError(f"log.cpu_peak_tflops must be a positive number of TFLOP/s, got {peak}; "
                          f"leave it unset (null) to measure the peak at start")
    if cfg.train.eval_interval > 0 and cfg.train.eval_batches <= 0:
        raise ConfigError(f"train.eval_batches must be positive, got {cfg.train.eval_batches}; "
                          f"set train.eval_interval=0 to turn validation off")
    o = cfg.optim
    non_negative = {"optim.lr": o.lr, "optim.min_lr": o.min_lr, "optim.eps": o.eps,
                    "optim.warmup_steps": o.warmup_steps, "optim.weight_decay": o.weight_decay,
                    "optim.grad_clip": o.grad_clip, "train.eval_interval": cfg.train.eval_interval,
                    "checkpoint.interval": cfg.checkpoint.interval, "checkpoint.keep_last": cfg.checkpoint.keep_last,
                    "checkpoint.keep_every": cfg.checkpoint.keep_every}
    for key, value in non_negative.items():
        if not value >= 0:  # written this way round so that NaN fails too
            raise ConfigError(f"{key} must be >= 0, got {value}")
    for key, value in {"optim.beta1": o.beta1, "optim.beta2": o.beta2}.items():
        if not 0 <= value < 1:  # else AdamW raises a traceback in every rank, after the model is built
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    n_kv_heads = m.n_kv_heads or m.n_heads
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(
            f"head dim model.dim/model.n_heads={m.dim // m.n_heads} must be even for rotary embeddings"
        )
    if m.n_heads % n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={n_kv_heads}")
    for name, size in m.mp_split_sizes().items():
        if size % p.mp:
            what = f"FFN width {size}" if name == "ffn_hidden_dim" else f"model.{name}={size}"
            raise ConfigError(f"{what} is not divisible by parallel.mp={p.mp}")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if p.backend not in ("auto", "nccl", "gloo"):
        raise ConfigError(f"parallel.backend={p.backend!r} must be auto, nccl or gloo")
    if cfg.train.dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.dtype={cfg.train.dtype!r} must be auto, fp32 or bf16")
    if cfg.train.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device={cfg.train.device!r} must be auto, cpu or cuda")
    # NCCL moves CUDA tensors only, and the ranks train where their backend's tensors live
    if (cfg.train.device, p.backend) in (("cuda", "gloo"), ("cpu", "nccl")):
        raise ConfigError(f"train.device={cfg.train.device} does not go with parallel.backend={p.backend}: "
                          f"use nccl for cuda and gloo for cpu, or parallel.backend=auto")
    if m.use_scaled_rope and m.rope_theta is None:  # Meta's Llama 3.1 code would assume theta 500000
        raise ConfigError("model.use_scaled_rope=true needs a model.rope_theta (Llama 3.1's is 500000.0)")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr={cfg.optim.min_lr} is above optim.lr={cfg.optim.lr}")
    if world_size is not None:
        if world_size % p.mp:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.mp={p.mp}; "
                f"launch a multiple of {p.mp} processes or change parallel.mp"
            )
        if p.dp not in (-1, world_size // p.mp):
            raise ConfigError(
                f"parallel.dp={p.dp} x parallel.mp={p.mp} does not equal the world size {world_size}; "
                f"set parallel.dp=-1 to derive it"
            )
