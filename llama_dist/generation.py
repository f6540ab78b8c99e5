"""Text generation from a Meta-format checkpoint: `Llama.build`, `text_completion`, `generate`.

Follows Meta's llama `generation.py`, so code written against it runs here: the
same build arguments, the same "MP == number of shards" rule and message, the
same batched decoding (prompts padded, decoding starts at the shortest prompt's
end, a row keeps its own prompt tokens until they run out). Differences: the
shard is loaded strictly, a mismatch is a one-line error that says how to fix
it, and every model-parallel rank takes the token chosen on mp rank 0, so ranks
cannot drift apart even if their logits differ in the last bit.

    llama-dist generate CKPT --prompt "Once upon a time" --temperature 0
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Optional, TypedDict

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fairscale.nn.model_parallel.initialize as fs_init

from llama_dist import meta_format
from llama_dist.distributed import current, init_distributed, mp_group, seed_everything, shutdown
from llama_dist.errors import UserError
from llama_dist.launcher import relaunch, under_torchrun
from llama_dist.model import ModelArgs, Transformer
from llama_dist.tokenizer import Tokenizer


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]  # each token decoded on its own (with logprobs=True)
    logprobs: list[float]


# --------------------------------------------------------------------------- loading


def mismatch_message(ckpt_dir: str | os.PathLike, n_shards: int, mp: int) -> str:
    return (
        f"Loading a checkpoint for MP={n_shards} but world size is {mp}: reshard it with "
        f"`llama-dist reshard {ckpt_dir} NEW_DIR --mp {mp}`, or launch {n_shards} processes "
        f"(e.g. `torchrun --nproc_per_node {n_shards} ...`; `llama-dist generate` and "
        f"`llama-dist eval` start them themselves)"
    )


def _model_parallel_size(requested: Optional[int]) -> int:
    """Meta's rule: an explicit size, else the world size torchrun gives, else 1."""
    if fs_init.model_parallel_is_initialized():
        return fs_init.get_model_parallel_world_size()
    if requested:
        return requested
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _inference_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32  # CPU work is fp32, whatever precision the file holds
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(
    ckpt_dir: str | os.PathLike,
    max_seq_len: int,
    max_batch_size: int,
    model_parallel_size: Optional[int] = None,
    seed: int = 1,
    device: str = "auto",
    vocab_size: Optional[int] = None,
) -> Transformer:
    """Start distributed (if needed) and load this rank's shard into an eval-mode model.

    `vocab_size` fills in params.json's `vocab_size: -1` (Llama 2 releases take it
    from the tokenizer). No KV cache is allocated: `Llama` does that.
    """
    paths = meta_format.shard_paths(ckpt_dir)
    mp = _model_parallel_size(model_parallel_size)
    if mp != len(paths):  # checked before any process group exists, so nothing hangs
        raise UserError(mismatch_message(ckpt_dir, len(paths), mp))
    args = meta_format.read_params(ckpt_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    if args.vocab_size == -1:
        if vocab_size is None:
            raise UserError(f"{Path(ckpt_dir) / meta_format.PARAMS_FILE} has vocab_size -1; "
                            f"put the tokenizer.model it was trained with beside it")
        args.vocab_size = vocab_size
    _check_divisible(args, mp)

    info = init_distributed(mp=mp, device=device)
    seed_everything(seed)  # the same on every rank: sampling must agree across mp ranks
    state = meta_format.load_shard(paths[info.mp_rank])
    state.pop("rope.freqs", None)  # Llama 1 files carry it; every loader ignores it
    model = Transformer(args, init_weights=False)  # every weight comes from the strict load below
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise UserError(f"{paths[info.mp_rank]} does not match {meta_format.PARAMS_FILE} "
                        f"at mp={mp}: {detail}") from None
    return for_inference(model, info.device)


def for_inference(model: Transformer, device: torch.device) -> Transformer:
    """On `device` in its inference precision (bf16/fp16 on CUDA, fp32 on CPU), eval mode, no grads."""
    rope = model.rope  # the rotary table stays fp32 when the weights go to half precision
    model.to(device=device, dtype=_inference_dtype(device))
    model.rope = rope.to(device)
    return model.eval().requires_grad_(False)


def _check_divisible(args: ModelArgs, mp: int) -> None:
    for name, size in args.mp_split_sizes().items():
        if size % mp:
            raise UserError(f"params.json has {name}={size}, which {mp} model-parallel ranks cannot split")


# --------------------------------------------------------------------------- sampling


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of most likely tokens holding mass p.

    probs (B, V) -> token ids (B,). The most likely token is always kept, so p=0
    is greedy.
    """
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
    sorted_probs = sorted_probs.masked_fill(mass_before > p, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(sorted_probs, num_samples=1)  # (B, 1) index into the sorted order
    return order.gather(-1, choice).squeeze(-1)


def check_sampling(temperature: float, top_p: float) -> None:
    """temperature >= 0 (0 is greedy) and top_p in [0, 1] (0 keeps the most likely token alone, so it
    is greedy too): outside them the probabilities turn to 0 or NaN, and torch.multinomial fails mid-decode."""
    if not 0 <= temperature < float("inf"):
        raise UserError(f"temperature must be a finite number of at least 0 (0 is greedy), got {temperature}")
    if not 0 <= top_p <= 1:
        raise UserError(f"top_p must be between 0 and 1 (0 keeps only the most likely token), got {top_p}")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position: logits (B, T, V), targets (B, T) -> (B, T)."""
    return -F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")


# --------------------------------------------------------------------------- Llama


class Llama:
    """A loaded model and its tokenizer, with a KV cache sized by build's arguments."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.args: ModelArgs = model.args
        self.device = next(model.parameters()).device
        model.setup_caches(self.args.max_batch_size, self.args.max_seq_len)

    @staticmethod
    def build(
        ckpt_dir: str | os.PathLike,
        tokenizer_path: Optional[str | os.PathLike] = None,
        max_seq_len: int = 512,
        max_batch_size: int = 4,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: str = "auto",
    ) -> "Llama":
        """Meta's entry point: one process per shard, each loading `checkpoints[mp_rank]`."""
        meta_format.shard_paths(ckpt_dir)  # a missing directory is reported before the tokenizer
        tokenizer_path = Path(tokenizer_path or Path(ckpt_dir) / meta_format.TOKENIZER_FILE)
        if not tokenizer_path.is_file():
            raise UserError(f"tokenizer {tokenizer_path} not found; pass --tokenizer PATH (tokenizer_path=...)")
        tokenizer = Tokenizer(str(tokenizer_path))
        params = meta_format.read_params(ckpt_dir)
        if params.vocab_size not in (-1, tokenizer.n_words):
            raise UserError(
                f"{tokenizer_path} has {tokenizer.n_words} tokens but {ckpt_dir}/params.json has "
                f"vocab_size {params.vocab_size}; use the tokenizer the model was trained with"
            )
        model = load_model(ckpt_dir, max_seq_len, max_batch_size, model_parallel_size, seed, device,
                           vocab_size=tokenizer.n_words)
        return Llama(model, tokenizer)

    @torch.no_grad()
    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Continue each prompt by up to max_gen_len tokens, stopping a row at its first eos.

        Returns the new tokens per prompt (prompt included with echo) and, with
        logprobs, log p(token) for each returned token (0.0 for a prompt's first).
        """
        check_sampling(temperature, top_p)
        bsz, lengths = len(prompt_tokens), [len(t) for t in prompt_tokens]
        self._check_batch(bsz, lengths)
        if max_gen_len < 0:
            raise UserError(f"max_gen_len must be at least 0, got {max_gen_len}")
        min_len, max_len = min(lengths), max(lengths)
        total_len = min(self.args.max_seq_len, max_len + max_gen_len)
        eos_id = self.tokenizer.eos_id

        # the pad value is never read: every position is a prompt token or generated before it is fed
        tokens = torch.zeros((bsz, total_len), dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompt_tokens):
            tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=self.device)
        positions = torch.arange(total_len, device=self.device)
        is_prompt = positions[None, :] < torch.tensor(lengths, device=self.device)[:, None]  # (B, total)
        scores = torch.zeros((bsz, total_len), device=self.device) if logprobs else None
        eos_reached = torch.zeros(bsz, dtype=torch.bool, device=self.device)

        if min_len == total_len and logprobs and total_len > 1:  # nothing to generate: score the prompts
            scores[:, 1:] = token_logprobs(self.model(tokens, 0)[:, :-1], tokens[:, 1:])
        prev_pos = 0
        for cur_pos in range(min_len, total_len):
            logits = self.model(tokens[:, prev_pos:cur_pos], prev_pos)  # (B, cur - prev, V)
            next_token = self._choose(logits[:, -1], temperature, top_p)
            # rows whose prompt is longer keep their own token here
            next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                scores[:, prev_pos + 1 : cur_pos + 1] = token_logprobs(logits, tokens[:, prev_pos + 1 : cur_pos + 1])
            eos_reached |= ~is_prompt[:, cur_pos] & (next_token == eos_id)
            prev_pos = cur_pos
            if bool(eos_reached.all()):
                break

        out_tokens, out_logprobs = [], []
        for row, row_tokens in enumerate(tokens.tolist()):
            start = 0 if echo else lengths[row]
            end = min(lengths[row] + max_gen_len, total_len)
            generated = row_tokens[lengths[row] : end]
            if eos_id in generated:  # cut at the first generated eos; an eos in an echoed prompt stays
                end = lengths[row] + generated.index(eos_id)
            out_tokens.append(row_tokens[start:end])
            if logprobs:
                out_logprobs.append(scores[row, start:end].tolist())
        return out_tokens, (out_logprobs if logprobs else None)

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> list[CompletionPrediction]:
        if max_gen_len is None:
            max_gen_len = self.args.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(text, bos=True, eos=False) for text in prompts]
        tokens, scores = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        if not logprobs:
            return [{"generation": self.tokenizer.decode(t)} for t in tokens]
        return [
            {"generation": self.tokenizer.decode(t), "tokens": [self.tokenizer.decode([x]) for x in t],
             "logprobs": lp}
            for t, lp in zip(tokens, scores)
        ]

    def _check_batch(self, bsz: int, lengths: list[int]) -> None:
        if bsz == 0:
            raise UserError("no prompts to complete")
        if bsz > self.args.max_batch_size:
            raise UserError(f"{bsz} prompts but max_batch_size is {self.args.max_batch_size}; "
                            f"build with a larger max_batch_size or pass fewer prompts")
        if min(lengths) == 0:
            raise UserError("an empty prompt; encode it with bos=True so that it has at least one token")
        if max(lengths) > self.args.max_seq_len:
            raise UserError(f"a prompt of {max(lengths)} tokens does not fit max_seq_len={self.args.max_seq_len}; "
                            f"shorten it or build with a larger max_seq_len")

    def _choose(self, logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        """The next token per row (B,) from last-position logits (B, V), the same on every mp rank."""
        if temperature > 0:
            next_token = sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p)
        else:
            next_token = torch.argmax(logits, dim=-1)
        if dist.is_initialized() and fs_init.get_model_parallel_world_size() > 1:
            dist.broadcast(next_token, src=fs_init.get_model_parallel_src_rank(), group=mp_group())
        return next_token


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-dist generate",
        description="Complete prompts with a checkpoint; an MP=N checkpoint starts N ranks with torchrun.",
    )
    parser.add_argument("ckpt", help="checkpoint directory: consolidated.NN.pth + params.json (+ tokenizer.model)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=0.9,
                        help="sample from the most likely tokens holding this mass, 0 to 1 (0 is greedy)")
    parser.add_argument("--max-gen-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tokenizer", default=None, help="default: CKPT/tokenizer.model")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="KV-cache length; default: the longest prompt plus --max-gen-len")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser


def cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    check_sampling(args.temperature, args.top_p)  # before N ranks load the model
    if args.max_gen_len < 0:
        raise UserError(f"--max-gen-len must be 0 or more, got {args.max_gen_len}")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise UserError(f"--max-seq-len must be 1 or more, got {args.max_seq_len}; leave it out for the "
                        f"longest prompt plus --max-gen-len")
    n_shards = len(meta_format.shard_paths(args.ckpt))
    if n_shards > 1 and not under_torchrun():
        print(f"{args.ckpt} has {n_shards} model-parallel shards: starting {n_shards} ranks", file=sys.stderr)
        return relaunch("llama_dist.generation", argv, n_shards)
    started_here = not dist.is_initialized()
    try:
        return _generate(args)
    finally:
        if started_here:
            shutdown()


def _generate(args: argparse.Namespace) -> int:
    tokenizer_path = Path(args.tokenizer or Path(args.ckpt) / meta_format.TOKENIZER_FILE)
    if not tokenizer_path.is_file():
        raise UserError(f"tokenizer {tokenizer_path} not found; pass --tokenizer PATH")
    prompt_tokens = [Tokenizer(str(tokenizer_path)).encode(p, bos=True, eos=False) for p in args.prompt]
    max_seq_len = args.max_seq_len or max(len(t) for t in prompt_tokens) + args.max_gen_len
    with contextlib.redirect_stdout(sys.stderr):  # fairscale's set-up chatter; stdout is for completions
        llama = Llama.build(args.ckpt, tokenizer_path, max_seq_len, len(prompt_tokens), seed=args.seed,
                            device=args.device)
    start = time.perf_counter()
    tokens, _ = llama.generate(prompt_tokens, args.max_gen_len, args.temperature, args.top_p, echo=True)
    if llama.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    info = current()
    if info.is_rank0:
        for row in tokens:
            print(llama.tokenizer.decode(row))
            print("-" * 40)
        new_tokens = sum(len(row) - len(p) for row, p in zip(tokens, prompt_tokens))
        print(f"{new_tokens} new tokens in {seconds:.2f} s: {new_tokens / seconds:.1f} tokens/s "
              f"(batch {len(tokens)}, mp {info.mp_size}, {llama.device.type})", file=sys.stderr)
    return 0


def main() -> int:
    """`python -m llama_dist.generation ...`: what torchrun runs on each rank."""
    from llama_dist.cli import main as cli_main

    return cli_main(["generate", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
