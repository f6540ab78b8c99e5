"""meta_format's checks of a Meta checkpoint directory: shard order past 100 shards,
params.json's types and sizes, legacy (non-zip) shards and keys that are not strings.
Every expected mistake is a one-line UserError; the checkpoints come from reshard_helpers.py."""

import json
import zipfile

import pytest
import torch

from reshard_helpers import LLAMA2, assert_same, model_weights, split, write_checkpoint

from llama_dist.config import CONFIG_DIR, load_config
from llama_dist.errors import UserError
from llama_dist.meta_format import load_shard, read_params, shard_file, shard_paths


def one_line_error(match: str, call, *args, **kwargs) -> str:
    """call(*args, **kwargs) raises a UserError matching `match`, in a single line."""
    with pytest.raises(UserError, match=match) as err:
        call(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message, f"the error spans several lines: {message!r}"
    return message


@pytest.fixture()
def ckpt(tmp_path):
    """An mp=2 release directory of the reshard tests' small model."""
    return write_checkpoint(tmp_path / "ckpt", LLAMA2, model_weights(LLAMA2), 2)


def write_raw_params(ckpt_dir, params) -> None:
    (ckpt_dir / "params.json").write_text(json.dumps(params))


# --------------------------------------------------------------------------- shard order


def test_shard_paths_orders_past_100_shards_by_number(tmp_path):
    """101 shards, the most the project itself writes past two digits: .100 sorts after .99,
    not before .11 as a sort by name would put it. shard_paths reads only the names."""
    for rank in range(101):
        (tmp_path / shard_file(rank)).write_bytes(b"")
    assert shard_file(100) == "consolidated.100.pth"
    assert [p.name for p in shard_paths(tmp_path)] == [shard_file(rank) for rank in range(101)]


def test_shard_paths_past_100_still_refuses_a_missing_or_stray_file(tmp_path):
    for rank in range(101):
        (tmp_path / shard_file(rank)).write_bytes(b"")
    (tmp_path / "consolidated.57.pth").unlink()
    one_line_error(r"expected consolidated\.00\.pth \.\. consolidated\.99\.pth with none missing", shard_paths,
                   tmp_path)
    (tmp_path / "consolidated.57.pth").write_bytes(b"")
    (tmp_path / "extra.pth").write_bytes(b"")
    one_line_error(r"extra\.pth; expected consolidated\.00\.pth \.\. consolidated\.101\.pth", shard_paths, tmp_path)


# --------------------------------------------------------------------------- params.json

RELEASES = {  # META_FORMAT.md's table, as Meta ships the files
    "llama2-7b": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                  "vocab_size": -1},
    "llama2-13b": {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05,
                   "vocab_size": -1},
    "llama2-70b": {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                   "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1},
    "llama3-8b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                  "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0},
    "llama3.1-8b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                    "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0,
                    "use_scaled_rope": True},
}


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_read_params_accepts_metas_released_params(tmp_path, name):
    write_raw_params(tmp_path, RELEASES[name])
    args = read_params(tmp_path, max_seq_len=64, max_batch_size=2)
    assert args.params_json() == RELEASES[name] and args.max_seq_len == 64


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_read_params_accepts_what_the_bundled_configs_write(tmp_path, name):
    model = load_config(name).model
    write_raw_params(tmp_path, model.params_json())
    assert read_params(tmp_path).params_json() == model.params_json()


def test_read_params_accepts_the_test_checkpoints(ckpt):
    assert read_params(ckpt).params_json() == LLAMA2.params_json()


BAD_PARAMS = {  # a change to LLAMA2's params.json (dim 64, n_heads 8, n_kv_heads 4) -> the message
    "dim_string": ({"dim": "64"}, r'dim="64"; it must be a positive integer'),
    "dim_float": ({"dim": 64.0}, r"dim=64\.0; it must be a positive integer"),
    "n_heads_zero": ({"n_heads": 0}, r"n_heads=0; it must be a positive integer"),
    "n_layers_bool": ({"n_layers": True}, r"n_layers=true; it must be a positive integer"),
    "multiple_of_negative": ({"multiple_of": -16}, r"multiple_of=-16; it must be a positive integer"),
    "n_kv_heads_zero": ({"n_kv_heads": 0}, r"n_kv_heads=0; it must be a positive integer \(or absent"),
    "vocab_size_zero": ({"vocab_size": 0}, r"vocab_size=0; it must be a positive integer, or -1"),
    "vocab_size_string": ({"vocab_size": "96"}, r'vocab_size="96"; it must be a positive integer, or -1'),
    "norm_eps_negative": ({"norm_eps": -1e-5}, r"norm_eps=-1e-05; it must be a positive number$"),
    "norm_eps_null": ({"norm_eps": None}, r"norm_eps=null; it must be a positive number$"),
    "rope_theta_string": ({"rope_theta": "500000"}, r'rope_theta="500000"; it must be a positive number \(or'),
    "scaled_rope_string": ({"use_scaled_rope": "yes"}, r'use_scaled_rope="yes"; it must be true or false'),
    "scaled_rope_without_theta": ({"use_scaled_rope": True, "rope_theta": None},
                                  r"has use_scaled_rope but no rope_theta"),
    "ffn_dim_multiplier_zero": ({"ffn_dim_multiplier": 0}, r"ffn_dim_multiplier=0; it must be a positive number"),
    "odd_head_width": ({"dim": 72}, r"dim=72 and n_heads=8, a head width dim // n_heads of 9; .* even width"),
    "no_head_width": ({"dim": 6}, r"dim=6 and n_heads=8, a head width dim // n_heads of 0; .* even width"),
    "kv_heads_do_not_divide_heads": ({"n_kv_heads": 3}, r"n_heads=8, which n_kv_heads=3 does not divide"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_read_params_refuses_wrong_types_and_sizes(ckpt, case):
    """Each would otherwise pass here and fail later (a TypeError in the FFN width, a
    ZeroDivisionError in head_dim, a shape error in the model) with a traceback."""
    changes, match = BAD_PARAMS[case]
    write_raw_params(ckpt, {**LLAMA2.params_json(), **changes})
    message = one_line_error(match, read_params, ckpt)
    assert message.startswith(f"{ckpt / 'params.json'} has ")


def test_read_params_accepts_heads_that_leave_part_of_dim(ckpt):
    """dim 66 with 8 heads: Meta's model (and ours) uses 8 heads of width 8, as test_reshard's
    dim check writes it, so dim need not be a multiple of n_heads."""
    write_raw_params(ckpt, {**LLAMA2.params_json(), "dim": 66})
    assert read_params(ckpt).head_dim == 8


def test_read_params_refuses_json_that_is_not_an_object(ckpt):
    write_raw_params(ckpt, [64, 2, 8])
    one_line_error(r"params\.json holds list, not an object of Meta's ModelArgs keys", read_params, ckpt)


# --------------------------------------------------------------------------- shards


def test_load_shard_reads_a_legacy_non_zip_shard(ckpt):
    """torch.save(..., _use_new_zipfile_serialization=False) cannot be memory-mapped, but Meta's
    plain torch.load reads it: so does load_shard, into memory."""
    shard = split(model_weights(LLAMA2), 2, False)[1]
    path = ckpt / shard_file(1)
    torch.save(shard, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    assert_same(load_shard(path), shard)
    assert_same(load_shard(path, mmap=False), shard)
    assert_same(load_shard(ckpt / shard_file(0)), split(model_weights(LLAMA2), 2, False)[0])  # zip: memory-mapped


def test_load_shard_refuses_a_key_that_is_not_a_string(tmp_path):
    path = tmp_path / shard_file(0)
    torch.save({1: torch.zeros(2)}, path)
    one_line_error(r"consolidated\.00\.pth is not a Meta-format state dict: unexpected key 1$", load_shard, path)
    torch.save({"tok_embeddings.weight": torch.zeros(2), ("norm", "weight"): torch.zeros(2)}, path)
    one_line_error(r"unexpected key \('norm', 'weight'\)$", load_shard, path)


def test_load_shard_names_an_unknown_string_key_as_before(tmp_path):
    path = tmp_path / shard_file(0)
    torch.save({"layers.0.attention.wq.bias": torch.zeros(2)}, path)
    one_line_error(r"unexpected key 'layers\.0\.attention\.wq\.bias'$", load_shard, path)
