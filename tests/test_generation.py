"""Llama.build and generation against independent references.

The reference for every decoding test is a model forward over the whole
sequence without a KV cache, recomputed at each step; MP=2 runs in real gloo
ranks on the MP=1 checkpoint resharded by llama_dist.reshard and must give
MP=1's greedy tokens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_dist import meta_format
from llama_dist.cli import main as cli_main
from llama_dist.distributed import current, init_distributed, seed_everything, shutdown
from llama_dist.errors import UserError
from llama_dist.generation import Llama, load_model, sample_top_p
from llama_dist.model import ModelArgs, Transformer
from llama_dist.reshard import reshard
from multiproc import run_ranks

SEED = 0
SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)
MAX_SEQ_LEN = 48
PROMPTS = ["the quick brown fox", "a", "jumps over the lazy dog and then"]
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------- fixtures and helpers


def train_tiny_tokenizer(out_dir: Path) -> Path:
    """A sentencepiece BPE model like the project's (byte fallback, no pad) on a tiny corpus."""
    import sentencepiece as spm

    words = ("the quick brown fox jumps over lazy dog and then runs away from home to find "
             "a river where fish swim under bridges made of old stone").split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(200)]
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    prefix = out_dir / "tok"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), model_type="bpe", vocab_size=320,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def vocab_size(tokenizer_path: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()


def tiny_args(vocab: int) -> ModelArgs:
    return ModelArgs(**SHAPE, vocab_size=vocab, max_seq_len=MAX_SEQ_LEN, max_batch_size=4)


def write_checkpoint(ckpt_dir: Path, args: ModelArgs, tokenizer_path: Path) -> None:
    """An MP=1 checkpoint of the model built from SEED (other sizes come from llama_dist.reshard)."""
    init_distributed(mp=1, backend="gloo", device="cpu")
    seed_everything(SEED)
    model = Transformer(args)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    meta_format.save_shard(model.state_dict(), ckpt_dir / meta_format.shard_file(0))
    meta_format.write_params(ckpt_dir, args)
    shutil.copy(tokenizer_path, ckpt_dir / meta_format.TOKENIZER_FILE)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def ckpt1(tmp_path_factory, tokenizer_path) -> Path:
    ckpt = tmp_path_factory.mktemp("ckpt-mp1")
    saved = dict(os.environ)
    write_checkpoint(ckpt, tiny_args(vocab_size(tokenizer_path)), tokenizer_path)
    shutdown()
    os.environ.clear()
    os.environ.update(saved)
    return ckpt


def reference_greedy(model: Transformer, prompt: list[int], max_gen_len: int, eos_id: int) -> list[int]:
    """Greedy decoding without a cache: the full sequence is recomputed for every token."""
    seq = list(prompt)
    for _ in range(max_gen_len):
        if len(seq) >= MAX_SEQ_LEN:
            break
        with torch.no_grad():
            logits = model(torch.tensor([seq]))
        token = int(logits[0, -1].argmax())
        if token == eos_id:
            break
        seq.append(token)
    return seq[len(prompt):]


def full_logprobs(model: Transformer, seq: list[int]) -> list[float]:
    """log p(seq[i] | seq[:i]) from one forward over the whole sequence; 0.0 for the first."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq]))[0].double(), dim=-1)
    return [0.0] + [float(logp[i - 1, seq[i]]) for i in range(1, len(seq))]


# --------------------------------------------------------------------------- sampling


def test_sample_top_p_keeps_the_nucleus_only():
    torch.manual_seed(0)
    probs = torch.tensor([[0.2, 0.5, 0.3, 0.0]]).repeat(4000, 1)
    draws = sample_top_p(probs, 0.7)  # 0.5 + 0.3 reach 0.7: token 0 (0.2) is outside the nucleus
    counts = torch.bincount(draws, minlength=4).double() / len(draws)
    assert counts[0] == 0 and counts[3] == 0
    assert abs(counts[1] - 0.5 / 0.8) < 0.03 and abs(counts[2] - 0.3 / 0.8) < 0.03
    assert torch.equal(sample_top_p(probs[:5], 0.0), torch.ones(5, dtype=torch.long))  # p=0 is greedy
    everything = torch.bincount(sample_top_p(probs, 1.0), minlength=4).double() / len(draws)
    assert abs(everything[0] - 0.2) < 0.03


# --------------------------------------------------------------------------- build errors


def test_build_refuses_a_checkpoint_of_another_mp_size(tmp_path, ckpt1, tokenizer_path):
    two = tmp_path / "two"
    two.mkdir()
    for name in ("consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"):
        src = ckpt1 / ("consolidated.00.pth" if name.endswith(".pth") else name)
        shutil.copy(src, two / name)
    with pytest.raises(UserError) as err:
        Llama.build(two, None, 32, 1)
    message = str(err.value)
    assert "Loading a checkpoint for MP=2 but world size is 1" in message
    assert f"llama-dist reshard {two} NEW_DIR --mp 1" in message
    assert "torchrun --nproc_per_node 2" in message
    assert "\n" not in message


def test_build_errors_are_one_line(tmp_path, ckpt1, tokenizer_path):
    def one_line_error(match: str, *build_args) -> str:
        """Llama.build(*build_args) raises a UserError matching `match`, in a single line."""
        with pytest.raises(UserError, match=match) as err:
            Llama.build(*build_args)
        message = str(err.value)
        assert "\n" not in message, f"the error spans several lines: {message!r}"
        return message

    one_line_error("does not exist", tmp_path / "missing", tokenizer_path, 32, 1)

    def copy_with_params(name: str, **changes: int):
        """ckpt1's shards under params.json whose fields are increased by `changes`."""
        copy = tmp_path / name
        shutil.copytree(ckpt1, copy)
        args = meta_format.read_params(ckpt1)
        for field, increase in changes.items():
            setattr(args, field, getattr(args, field) + increase)
        meta_format.write_params(copy, args)
        return copy

    wrong_vocab = copy_with_params("vocab", vocab_size=2)
    one_line_error(r"has \d+ tokens but .* vocab_size", wrong_vocab, None, 32, 1)
    one_line_error("tokenizer .* not found", ckpt1, tmp_path / "nope.model", 32, 1)
    deeper = copy_with_params("deeper", n_layers=1)
    one_line_error(r"consolidated.00.pth does not match params.json at mp=1: .*layers\.2\.", deeper, None, 32, 1)


def test_prompt_and_batch_limits(ckpt1):
    llama = Llama.build(ckpt1, None, 16, 2, device="cpu")
    with pytest.raises(UserError, match="does not fit max_seq_len=16"):
        llama.generate([[1] * 17], 4)
    with pytest.raises(UserError, match="max_batch_size is 2"):
        llama.generate([[1, 5]] * 3, 4)
    with pytest.raises(UserError, match="empty prompt"):
        llama.generate([[]], 4)


BAD_SAMPLING = [  # (temperature, top_p, message): each once made NaN probabilities or a silent other setting
    (1.0, -0.5, r"top_p must be between 0 and 1 .*, got -0.5$"),
    (1.0, 1.5, r"top_p must be between 0 and 1 .*, got 1.5$"),
    (1.0, float("nan"), r"top_p must be between 0 and 1 .*, got nan$"),
    (-1.0, 0.9, r"temperature must be a finite number of at least 0 \(0 is greedy\), got -1.0$"),
    (float("inf"), 0.9, r"temperature must be .*, got inf$"),
    (float("nan"), 0.9, r"temperature must be .*, got nan$"),
]


def test_sampling_settings_are_checked(ckpt1):
    llama = Llama.build(ckpt1, None, 16, 1, device="cpu")
    prompt = [llama.tokenizer.encode(PROMPTS[0], bos=True, eos=False)]
    for temperature, top_p, message in BAD_SAMPLING:
        with pytest.raises(UserError, match=message):
            llama.generate(prompt, 4, temperature, top_p)
        with pytest.raises(UserError, match=message):
            llama.text_completion(PROMPTS[:1], temperature, top_p, max_gen_len=4)
    # the ends of the range: top_p 0 keeps the most likely token alone, which is greedy
    assert llama.generate(prompt, 6, 1.0, 0.0) == llama.generate(prompt, 6, 0.0)
    llama.generate(prompt, 6, 1.0, 1.0)  # and 1 samples from every token


def test_cli_generate_bad_top_p_is_one_line(ckpt1, capsys):
    assert cli_main(["generate", str(ckpt1), "--prompt", PROMPTS[0], "--top-p", "-0.5", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "top_p must be between 0 and 1" in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- decoding


def test_greedy_and_kv_cache_equal_full_recompute(ckpt1):
    """Batched prompts of different lengths: the tokens are the argmax of a cache-free forward
    recomputed each step, and the cached logprobs equal one full forward's (atol 1e-5)."""
    llama = Llama.build(ckpt1, None, MAX_SEQ_LEN, 4, device="cpu")
    reference = load_model(ckpt1, MAX_SEQ_LEN, 4, device="cpu")  # no KV cache
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3, "the test needs prompts of different lengths"
    max_gen_len = 12
    tokens, logprobs = llama.generate(prompts, max_gen_len, temperature=0.0, logprobs=True, echo=True)
    for prompt, row, row_logprobs in zip(prompts, tokens, logprobs):
        assert row[: len(prompt)] == prompt  # echo
        assert row[len(prompt):] == reference_greedy(reference, prompt, max_gen_len, llama.tokenizer.eos_id)
        assert len(row_logprobs) == len(row)
        torch.testing.assert_close(torch.tensor(row_logprobs, dtype=torch.float64),
                                   torch.tensor(full_logprobs(reference, row), dtype=torch.float64), rtol=0, atol=1e-5)

    plain, plain_logprobs = llama.generate(prompts, max_gen_len, temperature=0.0, logprobs=True)
    for prompt, row, echoed, lp, echoed_lp in zip(prompts, plain, tokens, plain_logprobs, logprobs):
        assert row == echoed[len(prompt):]  # without echo: only the new tokens
        assert lp == echoed_lp[len(prompt):]

    # max_gen_len 0 with echo scores the prompts alone (same lengths: nothing is decoded at all)
    for batch in ([prompts[2], prompts[2]], prompts):
        scored, scored_logprobs = llama.generate(batch, 0, temperature=0.0, logprobs=True, echo=True)
        assert scored == batch
        for prompt, lp in zip(batch, scored_logprobs):
            torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64),
                                       torch.tensor(full_logprobs(reference, prompt), dtype=torch.float64),
                                       rtol=0, atol=1e-5)


def test_text_completion_is_deterministic_for_a_seed(ckpt1):
    def sample(seed: int) -> list[dict]:
        llama = Llama.build(ckpt1, None, MAX_SEQ_LEN, 4, seed=seed, device="cpu")
        return llama.text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=16, logprobs=True)

    first, again, other = sample(3), sample(3), sample(4)
    assert first == again
    assert [r["generation"] for r in first] != [r["generation"] for r in other]
    for result in first:
        assert set(result) == {"generation", "tokens", "logprobs"}
        assert len(result["tokens"]) == len(result["logprobs"]) and all(lp <= 0 for lp in result["logprobs"])


class _EosAt:
    """The tiny model, except that row r is forced to emit eos at absolute position eos_pos[r]."""

    def __init__(self, model: Transformer, eos_id: int, eos_pos: list[int]) -> None:
        self.model, self.args, self.eos_id, self.eos_pos = model, model.args, eos_id, eos_pos
        self.calls = 0

    def parameters(self):
        return self.model.parameters()

    def setup_caches(self, *sizes) -> None:
        self.model.setup_caches(*sizes)

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        self.calls += 1
        logits = self.model(tokens, start_pos).clone()
        next_pos = start_pos + tokens.shape[1]  # the position the last logits predict
        for row, pos in enumerate(self.eos_pos):
            if next_pos == pos:
                logits[row, -1, self.eos_id] = 1e4
        return logits


def test_generation_stops_at_eos_per_row(ckpt1):
    llama = Llama.build(ckpt1, None, MAX_SEQ_LEN, 4, device="cpu")
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS[:2]]
    free, _ = llama.generate(prompts, 10, temperature=0.0)
    eos_id = llama.tokenizer.eos_id
    assert all(eos_id not in row for row in free)

    forced = _EosAt(llama.model, eos_id, [len(prompts[0]) + 3, 10**6])  # row 0 stops after 3 tokens
    stopped, logprobs = Llama(forced, llama.tokenizer).generate(prompts, 10, temperature=0.0, logprobs=True)
    assert stopped[0] == free[0][:3]
    assert stopped[1] == free[1]
    assert [len(lp) for lp in logprobs] == [3, len(free[1])]

    both = _EosAt(llama.model, eos_id, [len(prompts[0]) + 2, len(prompts[1]) + 4])
    stopped, _ = Llama(both, llama.tokenizer).generate(prompts, 10, temperature=0.0)
    assert stopped == [free[0][:2], free[1][:4]]
    # decoding ends once every row has its eos, not after max_gen_len steps
    last = max(len(prompts[0]) + 2, len(prompts[1]) + 4)
    assert both.calls == last - min(map(len, prompts)) + 1


# --------------------------------------------------------------------------- model parallel


def _mp2_rank(ckpt_dir: str):
    llama = Llama.build(ckpt_dir, None, MAX_SEQ_LEN, 4, device="cpu")
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    tokens, logprobs = llama.generate(prompts, 12, temperature=0.0, logprobs=True)
    sampled, _ = llama.generate(prompts, 12, temperature=1.0, top_p=0.9)
    return current().mp_rank, tokens, logprobs, sampled


@pytest.fixture(scope="module")
def mp2(tmp_path_factory, ckpt1):
    """ckpt1 resharded to MP=2 by the real tool, and what each of 2 gloo ranks decodes from it."""
    ckpt = tmp_path_factory.mktemp("ckpt-mp2") / "mp2"
    reshard(ckpt1, ckpt, mp=2)
    results = run_ranks(_mp2_rank, 2, str(ckpt))
    return ckpt, results


def test_greedy_identical_at_mp1_and_mp2(ckpt1, mp2):
    ckpt2, ranks = mp2
    assert sorted(p.name for p in ckpt2.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    # really split: the shards of a model-parallel weight are halves of mp=1's
    full = meta_format.load_shard(ckpt1 / "consolidated.00.pth")["tok_embeddings.weight"]
    halves = [meta_format.load_shard(ckpt2 / f"consolidated.0{r}.pth")["tok_embeddings.weight"] for r in (0, 1)]
    assert all(h.numel() * 2 == full.numel() for h in halves)
    llama = Llama.build(ckpt1, None, MAX_SEQ_LEN, 4, device="cpu")
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    tokens, logprobs = llama.generate(prompts, 12, temperature=0.0, logprobs=True)
    assert [r[0] for r in ranks] == [0, 1]
    for _, mp_tokens, mp_logprobs, _ in ranks:
        assert mp_tokens == tokens
        for a, b in zip(mp_logprobs, logprobs):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)
    assert ranks[0][3] == ranks[1][3], "sampled tokens differ between model-parallel ranks"


# --------------------------------------------------------------------------- command line


def test_cli_generate_prints_the_greedy_completion(ckpt1, capsys):
    assert cli_main(["generate", str(ckpt1), "--prompt", PROMPTS[0], "--temperature", "0",
                     "--max-gen-len", "8", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    llama = Llama.build(ckpt1, None, MAX_SEQ_LEN, 1, device="cpu")
    expected = llama.text_completion(PROMPTS[:1], temperature=0.0, max_gen_len=8, echo=True)[0]["generation"]
    assert out.splitlines()[0] == expected
    assert "tokens/s" in err


def test_cli_generate_relaunches_an_mp2_checkpoint(ckpt1, mp2):
    """Not under torchrun: the command starts 2 ranks itself and prints MP=1's text once."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    argv = ["--prompt", PROMPTS[2], "--temperature", "0", "--max-gen-len", "8", "--device", "cpu"]
    run = subprocess.run([sys.executable, "-m", "llama_dist.cli", "generate", str(mp2[0]), *argv],
                         env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert "starting 2 ranks" in run.stderr and "mp 2" in run.stderr
    llama = Llama.build(ckpt1, None, MAX_SEQ_LEN, 1, device="cpu")
    expected = llama.text_completion(PROMPTS[2:], temperature=0.0, max_gen_len=8, echo=True)[0]["generation"]
    assert run.stdout.splitlines()[0] == expected
    assert run.stdout.count(expected) == 1  # printed by rank 0 only


def test_cli_generate_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert cli_main(["generate", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--max-gen-len", "-1"], "--max-gen-len must be 0 or more, got -1"),  # was blamed on max_seq_len=2
    (["--max-seq-len", "0"], "--max-seq-len must be 1 or more, got 0"),
])
def test_cli_generate_bad_lengths_are_one_line(ckpt1, capsys, flags, message):
    assert cli_main(["generate", str(ckpt1), "--prompt", PROMPTS[0], *flags, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
