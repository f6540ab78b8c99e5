"""Export to transformers: LlamaForCausalLM's logits equal ours in fp32 (1e-4) for GQA
models of both families, from mp=1 and resharded mp=2 checkpoints, in one safetensors
file or several; the tokenizer encodes as sentencepiece does; the rotary permutation
is what makes the logits agree. Needs the test extras: pip install transformers safetensors."""

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from llama_dist import export_hf as export_module  # noqa: E402
from llama_dist.distributed import init_distributed, seed_everything  # noqa: E402
from llama_dist.errors import UserError  # noqa: E402
from llama_dist.export_hf import export_hf  # noqa: E402
from llama_dist.meta_format import write_params  # noqa: E402
from llama_dist.model import ModelArgs, Transformer, count_parameters  # noqa: E402
from llama_dist.reshard import reshard  # noqa: E402

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, héllo wörld!",
          "def double(x):\n    return x * 2  # 1234", "Ünïcode: 漢字 and ✓ marks."]
TEXTS = ["Hello world", "The  quick\nbrown fox", "x = 12345; y  =  x\n\n  z", "héllo ✓ 漢字 🙂"]


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> Path:
    """A sentencepiece BPE trained as Meta's was: no normalisation, byte fallback, bos 1, eos 2."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("sp")
    (root / "corpus.txt").write_text("\n".join(CORPUS * 40))
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=320, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    return root / "sp.model"


def make_checkpoint(path: Path, args: ModelArgs, tokenizer: Path, attention_gain: float = 1.0
                    ) -> tuple[Path, Transformer]:
    """attention_gain scales wq and wk: sharper attention than a random init's near-uniform one."""
    init_distributed(mp=1, backend="gloo", device="cpu")
    seed_everything(0)
    model = Transformer(args).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.mul_(attention_gain)
            layer.attention.wk.weight.mul_(attention_gain)
    path.mkdir()
    torch.save(model.state_dict(), path / "consolidated.00.pth")
    write_params(path, args)
    (path / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return path, model


def hf_logits(out: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(tokens).logits


def gqa_args(vocab_size: int, rope_theta=None) -> ModelArgs:
    return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=16,
                     norm_eps=1e-5, rope_theta=rope_theta, max_seq_len=64)


@pytest.mark.parametrize("rope_theta, mp, max_shard_bytes", [
    (None, 1, export_module.MAX_SHARD_BYTES),  # Llama 2 layout, one model.safetensors
    (500000.0, 2, 40_000),  # Llama 3 layout from a resharded mp=2 checkpoint, several files + index
])
def test_transformers_logits_equal_ours(tmp_path, tokenizer_model, rope_theta, mp, max_shard_bytes):
    args = gqa_args(320, rope_theta)
    ckpt, model = make_checkpoint(tmp_path / "ckpt", args, tokenizer_model)
    if mp > 1:
        reshard(ckpt, tmp_path / "mp2", mp)
        ckpt = tmp_path / "mp2"
    export_hf(ckpt, tmp_path / "hf", max_shard_bytes=max_shard_bytes)
    out = tmp_path / "hf"

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 176, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (4, 2, 320)
    assert config["rms_norm_eps"] == 1e-5 and config["tie_word_embeddings"] is False
    assert config["rope_theta"] == (rope_theta or 10000.0)
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (1, 2, "float32")
    several = max_shard_bytes < 100_000
    assert (out / "model.safetensors.index.json").exists() == several
    assert (out / "model.safetensors").exists() == (not several)

    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
    torch.testing.assert_close(hf_logits(out, tokens), ours, atol=1e-4, rtol=0)


def test_llama31_stretched_rotary_exports_as_transformers_llama3_rope(tmp_path, tokenizer_model):
    """use_scaled_rope (Llama 3.1) becomes transformers' "llama3" rope type, with the same logits.
    Over these 64 positions the stretch moves our logits well past the tolerance, so the
    parity would fail were either side to leave it out."""
    args = dataclasses.replace(gqa_args(320, 500000.0), use_scaled_rope=True)
    ckpt, model = make_checkpoint(tmp_path / "ckpt", args, tokenizer_model, attention_gain=8.0)
    assert json.loads((ckpt / "params.json").read_text())["use_scaled_rope"] is True
    export_hf(ckpt, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    plain = Transformer(dataclasses.replace(args, use_scaled_rope=False)).eval()
    plain.load_state_dict(model.state_dict())
    tokens = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, unstretched = model(tokens), plain(tokens)
    assert (ours - unstretched).abs().max() > 1e-3  # ten times the tolerance
    torch.testing.assert_close(hf_logits(tmp_path / "hf", tokens), ours, atol=1e-4, rtol=0)


def test_without_the_rotary_permutation_the_logits_differ(tmp_path, tokenizer_model, monkeypatch):
    """The parity test can fail: Meta's wq/wk rows as they are give other logits in transformers."""
    ckpt, model = make_checkpoint(tmp_path / "ckpt", gqa_args(320), tokenizer_model)
    monkeypatch.setattr(export_module, "to_hf_rotary", lambda weight, heads: weight)
    export_hf(ckpt, tmp_path / "hf")
    tokens = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf_logits(tmp_path / "hf", tokens) - model(tokens)).abs().max() > 1e-3


def test_tokenizer_encodes_as_sentencepiece(tmp_path, tokenizer_model):
    import sentencepiece as spm

    ckpt, _ = make_checkpoint(tmp_path / "ckpt", gqa_args(320), tokenizer_model)
    export_hf(ckpt, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    for text in TEXTS:
        assert hf_tokenizer(text)["input_ids"] == [sp.bos_id()] + sp.encode(text), text
    assert hf_tokenizer.decode(hf_tokenizer(TEXTS[2])["input_ids"], skip_special_tokens=True) == TEXTS[2]


def test_bf16_export_and_refusals(tmp_path, tokenizer_model, monkeypatch):
    ckpt, model = make_checkpoint(tmp_path / "ckpt", dataclasses.replace(gqa_args(320), n_kv_heads=None),
                                  tokenizer_model)
    export_hf(ckpt, tmp_path / "hf", dtype="bf16")
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert torch.equal(weights["lm_head.weight"], model.output.weight.detach().to(torch.bfloat16))
    with pytest.raises(UserError, match="is not empty; .*--force"):
        export_hf(ckpt, tmp_path / "hf")
    shards = sorted((p.name, p.read_bytes()) for p in ckpt.iterdir())
    for out in (ckpt, tmp_path):  # --force would replace the checkpoint being read
        with pytest.raises(UserError, match="overlaps the source"):
            export_hf(ckpt, out, force=True)
    assert sorted((p.name, p.read_bytes()) for p in ckpt.iterdir()) == shards
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"^export-hf needs the safetensors package: pip install safetensors$"):
        export_hf(ckpt, tmp_path / "again")


@pytest.mark.parametrize("rope_theta, scaled, configured, expected", [
    (None, False, None, 2048),  # Llama 2: ModelArgs' max_seq_len, as before
    (500000.0, False, None, 8192),  # Llama 3's release
    (500000.0, True, None, 131072),  # Llama 3.1's release, as transformers' configs of it say
    (500000.0, False, 64, 64),  # a run's config.yaml says what it trained for
    (500000.0, True, 16384, 16384),
    (500000.0, True, 4096, 131072),  # transformers wants more than the stretch's original 8192
])
def test_max_positions_follow_the_release_without_config_yaml(tmp_path, tokenizer_model, rope_theta, scaled,
                                                              configured, expected):
    args = dataclasses.replace(gqa_args(320, rope_theta), use_scaled_rope=scaled)
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", args, tokenizer_model)
    if configured:
        (ckpt / "config.yaml").write_text(f"model:\n  max_seq_len: {configured}\n")
    export_hf(ckpt, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["max_position_embeddings"] == expected
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["model_max_length"] == expected
    if scaled:
        assert config["rope_scaling"]["original_max_position_embeddings"] == 8192 < expected
        assert transformers.LlamaConfig.from_pretrained(tmp_path / "hf").max_position_embeddings == expected


@pytest.mark.parametrize("text, match", [
    ("model:\n\tmax_seq_len: 64\n", r"config.yaml is not valid YAML \(found character '\\t' that cannot start "
                                    r"any token, line 2\); fix or remove it$"),
    ("model: [64]\n", r"config.yaml has a model section that is not a mapping of keys; fix or remove it$"),
    ("- model\n", r"config.yaml is not a config of sections; fix or remove it$"),
], ids=["tab", "model_list", "top_list"])
def test_a_malformed_config_yaml_is_one_line(tmp_path, tokenizer_model, text, match):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", gqa_args(320), tokenizer_model)
    (ckpt / "config.yaml").write_text(text)
    with pytest.raises(UserError, match=match) as err:
        export_hf(ckpt, tmp_path / "hf")
    assert "\n" not in str(err.value) and not (tmp_path / "hf").exists()


def test_a_head_count_that_does_not_divide_dim_is_refused(tmp_path, tokenizer_model):
    """Meta's format allows 8 heads of 8 in a 66-wide model; transformers' LlamaConfig does not."""
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", dataclasses.replace(gqa_args(320), dim=66, n_heads=8),
                              tokenizer_model)
    with pytest.raises(UserError, match=r"params.json has dim=66, which n_heads=8 does not divide; transformers' "
                                        r"Llama needs hidden_size divisible by the head count") as err:
        export_hf(ckpt, tmp_path / "hf")
    assert "\n" not in str(err.value) and not (tmp_path / "hf").exists()


def test_llama3s_tiktoken_tokenizer_is_left_out_not_refused(tmp_path, tokenizer_model, monkeypatch):
    import base64

    import llama_dist.export_hf as export_module

    warned: list[str] = []
    monkeypatch.setattr(export_module.log, "warning", warned.append)

    ranks = 300  # the BPE ranks; Llama 3's special tokens follow them, so the vocabulary is larger
    ckpt, model = make_checkpoint(tmp_path / "ckpt", gqa_args(320, 500000.0), tokenizer_model)
    lines = [f"{base64.b64encode(bytes([i % 256, i // 256])).decode()} {i}" for i in range(ranks)]
    (ckpt / "tokenizer.model").write_text("\n".join(lines) + "\n")
    export_hf(ckpt, tmp_path / "hf")
    out = tmp_path / "hf"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (ranks, ranks + 1)
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": ranks,
                                                                        "eos_token_id": ranks + 1}
    assert len(warned) == 1 and "Llama 3's tiktoken BPE" in warned[0]
    tokens = torch.tensor([[ranks, 5, 17, 42]])
    assert torch.allclose(hf_logits(out, tokens), model(tokens), atol=1e-5)
    # a file that only starts like one is not taken for tiktoken's: it is refused as before
    (ckpt / "tokenizer.model").write_text("\n".join(lines[:3]) + "\nnot a rank line\n")
    with pytest.raises(UserError, match="is not a sentencepiece model"):
        export_hf(ckpt, tmp_path / "again")


def test_a_full_disk_is_one_line_from_the_command_and_leaves_no_half_export(tmp_path, tokenizer_model, monkeypatch,
                                                                           capsys):
    import errno

    import llama_dist.export_hf as export_module
    from llama_dist.cli import main as cli_main

    ckpt, _ = make_checkpoint(tmp_path / "ckpt", gqa_args(320), tokenizer_model)

    def full(tmp, *args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))

    monkeypatch.setattr(export_module, "_write_weights", full)
    assert cli_main(["export-hf", str(ckpt), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"llama-dist export-hf: error: No space left on device writing \S+/model\.safetensors; "
                        r"free some space \(df -h\) and run it again", err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the staging directory went too


@pytest.mark.parametrize("dtype, itemsize", [(None, 4), ("bf16", 2)])
def test_a_disk_without_room_for_the_export_is_refused_before_it_writes(tmp_path, tokenizer_model, monkeypatch,
                                                                       dtype, itemsize):
    from llama_dist import files

    args = gqa_args(320)
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", args, tokenizer_model)
    needed = itemsize * count_parameters(args)  # every weight, the embedding and output included
    monkeypatch.setattr(files, "free_bytes", lambda path: needed - 1)
    with pytest.raises(UserError, match=rf"^the disk holding {re.escape(str(tmp_path / 'hf'))} has "
                                        rf"{(needed - 1) / 1e6:.1f} MB free and the export takes "
                                        rf"{needed / 1e6:.1f} MB; free space there or choose another destination$"):
        export_hf(ckpt, tmp_path / "hf", dtype=dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    monkeypatch.setattr(files, "free_bytes", lambda path: needed)  # exactly enough
    export_hf(ckpt, tmp_path / "hf", dtype=dtype)
    written = sum(p.stat().st_size for p in (tmp_path / "hf").glob("*.safetensors"))
    assert needed < written < needed + 64 * 1024  # the tensors, and a header of names and offsets
