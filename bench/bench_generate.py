"""Generation speed: new tokens per second with the KV cache, and without it for comparison.

Random weights in the shapes of configs/tiny.yaml and configs/small.yaml, greedy
decoding that never stops early (no eos), prompts of --prompt-len random tokens.
Time includes the prompt's prefill; tokens/s counts new tokens of all rows.

    python bench/bench_generate.py                       # tiny and small, batch 1 and 8, CPU
    python bench/bench_generate.py --configs small --device cuda
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from llama_dist.config import load_config
from llama_dist.distributed import init_distributed, seed_everything, shutdown
from llama_dist.generation import Llama, for_inference
from llama_dist.model import Transformer, count_parameters


class _NoEos:
    """Just what `generate` reads from a tokenizer: an eos id no token has, so rows never stop."""

    eos_id = -1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _model(config: str, batch: int, max_seq_len: int, device: torch.device) -> Transformer:
    args = load_config(config).model
    args.max_seq_len, args.max_batch_size = max_seq_len, batch
    seed_everything(0)
    return for_inference(Transformer(args), device)


def _cached(llama: Llama, prompts: list[list[int]], gen_len: int) -> float:
    _sync(llama.device)
    start = time.perf_counter()
    tokens, _ = llama.generate(prompts, gen_len, temperature=0.0)
    _sync(llama.device)
    assert all(len(row) == gen_len for row in tokens)
    return time.perf_counter() - start


@torch.no_grad()
def _recompute(model: Transformer, prompts: list[list[int]], gen_len: int) -> float:
    """The same greedy decoding with the whole sequence re-run every step (no cache)."""
    model.clear_caches()
    device = next(model.parameters()).device
    seq = torch.tensor(prompts, device=device)
    _sync(device)
    start = time.perf_counter()
    for _ in range(gen_len):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; on a busy machine 1 avoids OpenMP threads waiting on each other")
    parser.add_argument("--no-recompute", action="store_true", help="skip the cache-free comparison")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    info = init_distributed(mp=1, device=args.device)
    device = info.device if info.device.type == "cuda" else torch.device("cpu")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}, torch threads {torch.get_num_threads()} of {os.cpu_count()} cores "
          f"(load average {load:.1f}), prompt {args.prompt_len} tokens, "
          f"{args.gen_len} new tokens per row, greedy")
    print(f"{'config':<8}{'params':>9}{'batch':>7}{'cached tok/s':>14}{'ms/step':>9}{'recompute tok/s':>17}")
    for config in args.configs:
        for batch in args.batch_sizes:
            model = _model(config, batch, args.prompt_len + args.gen_len, device)
            llama = Llama(model, _NoEos())
            g = torch.Generator().manual_seed(1)
            prompts = torch.randint(3, model.args.vocab_size, (batch, args.prompt_len), generator=g).tolist()
            _cached(llama, prompts, 4)  # warm-up: allocator, kernels
            seconds = _cached(llama, prompts, args.gen_len)
            new_tokens = batch * args.gen_len
            recompute = "-"
            if not args.no_recompute:
                recompute = f"{new_tokens / _recompute(model, prompts, args.gen_len):.1f}"
            params = count_parameters(model.args) / 1e6
            print(f"{config:<8}{params:>8.1f}M{batch:>7}{new_tokens / seconds:>14.1f}"
                  f"{1000 * seconds / args.gen_len:>9.1f}{recompute:>17}")
            del llama, model
    shutdown()


if __name__ == "__main__":
    main()
