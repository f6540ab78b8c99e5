"""`llama-dist export-hf CKPT OUT`: a checkpoint as a transformers LlamaForCausalLM directory.

The weights are merged from any number of shards one tensor at a time
(`sharded_source.iter_merged_tensors`), renamed to transformers' keys, and the rows of wq
and wk reordered from Meta's rotary layout to transformers'. They are written as
safetensors, in pieces of at most `max_shard_bytes` with an index when the model is
bigger than that, next to config.json and the sentencepiece tokenizer (Llama 3's
tiktoken one is left out with a warning; its bos/eos ids still go in). Everything
goes into a temporary sibling of OUT, renamed into place at the end.

    llama-dist export-hf runs/tiny/checkpoints/step-001000 hf/tiny
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('hf/tiny')"
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Optional, Union

import torch

from llama_dist.checkpoint_files import CONFIG_FILE, PARAMS_FILE, TOKENIZER_FILE
from llama_dist.distributed import get_logger
from llama_dist.errors import UserError
from llama_dist.files import staged_directory
from llama_dist.meta_format import read_params
from llama_dist.model_args import ModelArgs
from llama_dist.reshard import parse_dtype, read_config_yaml
from llama_dist.reshard_cli import DTYPE_NAMES
from llama_dist.sharded_source import PathLike, inspect_model, iter_merged_tensors
from llama_dist.tokenizer import tiktoken_base_size

MAX_SHARD_BYTES = 2 << 30  # one safetensors file is held in memory while it is written
# the released contexts where params.json says nothing (as transformers' configs of the releases do)
LLAMA3_THETA, LLAMA3_CONTEXT, LLAMA31_CONTEXT = 500000.0, 8192, 131072
# transformers' name and parameters for Llama 3.1's stretched rotary (model.stretch_slow_frequencies)
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")

log = get_logger("llama_dist.export_hf")


def hf_name(key: str) -> str:
    """Meta's parameter name -> transformers' LlamaForCausalLM name."""
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    layer, name = LAYER_KEY.match(key).groups()
    return f"model.layers.{layer}.{LAYER_NAMES[name]}.weight"


def to_hf_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows of wq or wk for transformers' rotary layout.

    Meta rotates interleaved pairs (q0,q1), (q2,q3), ...; transformers rotates
    halves, pairing q_i with q_{i + head_dim/2}. Putting each head's even rows first
    and its odd rows second turns one into the other; attention scores, summed over
    all of a head's dimensions, do not see the order.
    """
    rows, dim = weight.shape
    head_dim = rows // heads
    return weight.view(heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def _load_tokenizer(ckpt: Path):
    """The sentencepiece model beside the shards, or None (also for Llama 3's tiktoken file, which
    export_hf checks first); warns where transformers will differ."""
    path = ckpt / TOKENIZER_FILE
    if not path.is_file():
        return None
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as err:
        raise UserError(f"{path} is not a sentencepiece model ({err})") from None
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        spec = proto.normalizer_spec
    except Exception:  # noqa: BLE001 - the check is advisory; protobuf may be missing
        return sp
    # transformers' LlamaTokenizer applies no normalisation, as Meta's tokenizer was trained
    if spec.name != "identity" or spec.remove_extra_whitespaces:
        log.warning(f"export-hf: {path} normalises text ({spec.name}, remove_extra_whitespaces="
                    f"{spec.remove_extra_whitespaces}); transformers' LlamaTokenizer will not, so their ids can differ")
    return sp


def _special_ids(sp, tiktoken_size: Optional[int] = None) -> dict[str, Optional[int]]:
    """bos/eos/unk ids from the tokenizer; Meta's 1/2/0 when there is none. Llama 3 puts its special
    tokens after the BPE ranks, <|begin_of_text|> first and <|end_of_text|> second, and has no unk."""
    if tiktoken_size is not None:
        return {"bos": tiktoken_size, "eos": tiktoken_size + 1, "unk": None}
    if sp is None:
        return {"bos": 1, "eos": 2, "unk": 0}
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    return {name: (i if i >= 0 else None) for name, i in ids.items()}  # -1: the model has none


def _configured_seq_len(ckpt: Path) -> Optional[int]:
    """config.yaml's model.max_seq_len, if the run saved one."""
    path = ckpt / CONFIG_FILE
    if not path.is_file():
        return None
    model = read_config_yaml(path).get("model") or {}
    if not isinstance(model, dict):
        raise UserError(f"{path} has a model section that is not a mapping of keys; fix or remove it")
    seq_len = model.get("max_seq_len")
    return seq_len if isinstance(seq_len, int) and seq_len > 0 else None


def _max_positions(ckpt: Path, args: ModelArgs) -> int:
    """The context the model was trained for: config.yaml's, else its release's (Meta's params.json
    has none): 131072 for Llama 3.1's stretched rotary, 8192 for Llama 3's theta, else ModelArgs'.

    transformers wants a stretched rotary's max_position_embeddings above its original context.
    """
    seq_len = _configured_seq_len(ckpt)
    if seq_len is None:
        if args.use_scaled_rope:
            seq_len = LLAMA31_CONTEXT
        else:
            seq_len = LLAMA3_CONTEXT if args.rope_theta == LLAMA3_THETA else args.max_seq_len
    original = LLAMA31_ROPE["original_max_position_embeddings"]
    if args.use_scaled_rope and seq_len <= original:
        log.info(f"export-hf: {CONFIG_FILE}'s max_seq_len {seq_len} is not above the stretched rotary's original "
                 f"context {original}, as transformers requires; writing Llama 3.1's {LLAMA31_CONTEXT}")
        seq_len = LLAMA31_CONTEXT
    return seq_len


def _check_transformers_shape(ckpt: Path, args: ModelArgs) -> None:
    """Meta's heads may span less than dim (n_heads * (dim // n_heads)); transformers refuses to load
    a config whose head count does not divide hidden_size, so the export would be unusable."""
    if args.dim % args.n_heads:
        raise UserError(f"{ckpt / PARAMS_FILE} has dim={args.dim}, which n_heads={args.n_heads} does not divide; "
                        f"transformers' Llama needs hidden_size divisible by the head count, so export-hf "
                        f"cannot write this model")


def hf_config(args: ModelArgs, vocab_size: int, dtype: torch.dtype, max_positions: int,
              special: dict) -> dict:
    """config.json; norm_eps and rope_theta spelled out, since transformers' defaults differ."""
    dtype_name = str(dtype).removeprefix("torch.")
    rope_scaling = LLAMA31_ROPE if args.use_scaled_rope else {"rope_type": "default"}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "num_hidden_layers": args.n_layers,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.theta,  # transformers < 5 reads this key
        "rope_parameters": {"rope_theta": args.theta, **rope_scaling},  # and >= 5 this one
        **({"rope_scaling": rope_scaling} if args.use_scaled_rope else {}),  # < 5: Llama 3.1's
        "vocab_size": vocab_size,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "bos_token_id": special["bos"],
        "eos_token_id": special["eos"],
    }


def _tokenizer_config(sp, special: dict, max_positions: int) -> dict:
    piece = lambda name: sp.id_to_piece(special[name]) if special[name] is not None else None  # noqa: E731
    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": piece("bos"),
        "eos_token": piece("eos"),
        "unk_token": piece("unk"),
        "pad_token": None,
        "add_bos_token": True,  # as Meta's generation encodes prompts: bos, no eos
        "add_eos_token": False,
        "model_max_length": max_positions,
        "clean_up_tokenization_spaces": False,
        "legacy": True,  # transformers 4's slow tokenizer then calls sentencepiece as it is
    }


def _write_weights(out: Path, args: ModelArgs, tensors, dtype: Optional[torch.dtype],
                   max_shard_bytes: int) -> tuple[int, torch.dtype]:
    """Meta-named tensors -> transformers-named safetensors files; (vocabulary size, dtype)."""
    from safetensors.torch import save_file

    piece: dict[str, torch.Tensor] = {}  # only the file being filled is held in memory
    names: list[list[str]] = [[]]  # the transformers names in each file
    piece_bytes = total_bytes = vocab_size = 0
    written = torch.float32
    for key, tensor in tensors:
        if key.endswith("attention.wq.weight"):
            tensor = to_hf_rotary(tensor, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            tensor = to_hf_rotary(tensor, args.kv_heads)
        elif key == "output.weight":
            vocab_size = tensor.shape[0]
        # a fresh contiguous tensor each: safetensors refuses views that share storage
        tensor = tensor.to(dtype or tensor.dtype, copy=True).contiguous()
        written, nbytes = tensor.dtype, tensor.numel() * tensor.element_size()
        if piece and piece_bytes + nbytes > max_shard_bytes:
            save_file(piece, out / f"part-{len(names) - 1}", metadata={"format": "pt"})
            piece, piece_bytes = {}, 0
            names.append([])
        piece[hf_name(key)] = tensor
        names[-1].append(hf_name(key))
        piece_bytes += nbytes
        total_bytes += nbytes
    save_file(piece, out / f"part-{len(names) - 1}", metadata={"format": "pt"})
    del piece

    if len(names) == 1:
        (out / "part-0").rename(out / "model.safetensors")
        return vocab_size, written
    weight_map = {}
    for index, piece_names in enumerate(names):
        file_name = f"model-{index + 1:05d}-of-{len(names):05d}.safetensors"
        (out / f"part-{index}").rename(out / file_name)
        weight_map |= {name: file_name for name in piece_names}
    index_json = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    return vocab_size, written


def export_hf(ckpt_dir: PathLike, out_dir: PathLike, dtype: Union[str, torch.dtype, None] = None,
              force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write `ckpt_dir` (any model-parallel size) to `out_dir` as a LlamaForCausalLM directory."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        raise UserError("export-hf needs the safetensors package: pip install safetensors") from None
    cast = parse_dtype(dtype)
    dtype = getattr(torch, cast.name) if cast is not None else None
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise UserError(f"checkpoint directory {ckpt} does not exist")
    args = read_params(ckpt)
    _check_transformers_shape(ckpt, args)
    max_positions = _max_positions(ckpt, args)
    tokenizer = ckpt / TOKENIZER_FILE
    tiktoken_size = tiktoken_base_size(tokenizer) if tokenizer.is_file() else None
    if tiktoken_size is not None:
        log.warning(f"export-hf: {tokenizer} is Llama 3's tiktoken BPE, which this export does not convert: "
                    f"the weights and config go out without a tokenizer; take tokenizer.json from the "
                    f"release's transformers copy (bos {tiktoken_size}, eos {tiktoken_size + 1} set here)")
    sp = _load_tokenizer(ckpt) if tiktoken_size is None else None
    special = _special_ids(sp, tiktoken_size)

    weights = inspect_model(ckpt).weights  # the shards' headers only
    needed = sum(math.prod(weights.full_shape(key)) * (cast or weights.dtypes[key]).itemsize for key in weights.shapes)
    with staged_directory(out_dir, force, source=ckpt, room=(needed, "the export")) as tmp:
        vocab_size, written = _write_weights(tmp, args, iter_merged_tensors(ckpt), dtype, max_shard_bytes)
        config = hf_config(args, vocab_size, written, max_positions, special)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": special["bos"], "eos_token_id": special["eos"]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if sp is not None:
            if sp.get_piece_size() != vocab_size:
                log.warning(f"export-hf: the tokenizer has {sp.get_piece_size()} pieces but the model's "
                            f"vocabulary is {vocab_size}")
            (tmp / TOKENIZER_FILE).write_bytes((ckpt / TOKENIZER_FILE).read_bytes())
            tokenizer_config = _tokenizer_config(sp, special, max_positions)
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llama-dist export-hf",
                                     description="Write a transformers LlamaForCausalLM directory.")
    parser.add_argument("ckpt", help="checkpoint directory (any model-parallel size)")
    parser.add_argument("out", help="new directory (must not exist or be empty, unless --force)")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), help="cast the weights (default: as saved)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT once the new one is complete")
    args = parser.parse_args(argv)
    export_hf(args.ckpt, args.out, dtype=args.dtype, force=args.force)
    print(f"exported {args.ckpt} -> {args.out} (load with LlamaForCausalLM.from_pretrained('{args.out}'))")
    return 0
