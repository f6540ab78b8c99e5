"""bench/bench_train.py's kernel floor: the matmuls it times must be the model's own, or
the bound it prints on the ours/HF ratio would be about another model."""

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch

from llama_dist.config import load_config
from llama_dist.distributed import init_distributed
from llama_dist.model import ModelArgs, Transformer

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_train.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kv_heads", [2, 4])  # tiny's grouped-query attention, and one kv head per head
def test_floor_times_every_weight_matmul_of_the_model(kv_heads):
    args = load_config("tiny").model
    args = ModelArgs(**{**vars(args), "n_kv_heads": kv_heads})
    init_distributed(mp=1, backend="gloo", device="cpu")
    model = Transformer(args)
    # every 2-D weight but the embedding table (a lookup), as (in, out)
    weights = Counter((p.shape[1], p.shape[0]) for name, p in model.named_parameters()
                      if p.ndim == 2 and not name.startswith("tok_embeddings"))
    bench = load_bench()
    timed = Counter()
    for k, n, count in bench.step_matmuls(args):
        timed[(k, n)] += count
    assert timed == weights and len(weights) == (5 if kv_heads == 2 else 4)


def test_floor_runs_a_steps_worth_of_kernels():
    bench = load_bench()
    args = load_config("tiny").model
    floor = bench.KernelFloor(args, batch=2, seq_len=16)
    calls = Counter()
    for count, kernels in floor.gemms:
        for kernel in kernels:
            calls[tuple(kernel().shape)] += count
    # a weight matmul's forward, input gradient and weight gradient, in the step's shapes
    assert calls[(32, args.vocab_size)] == 1 and calls[(args.vocab_size, args.dim)] == 1
    assert calls[(32, args.ffn_hidden_dim)] == 2 * args.n_layers + args.n_layers  # w1, w3 out; w2's input grad
    attention_calls = []
    floor.attention = lambda: attention_calls.append(1)
    wall, cpu = floor.run([None, None])  # two steps' worth
    assert wall > 0 and cpu > 0 and len(attention_calls) == 2 * args.n_layers
    del floor.attention  # the real one: causal attention over every query head, forward and backward
    floor.attention()
    assert floor.qkv[0].shape == (2, args.n_heads, 16, args.head_dim)
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in floor.qkv)
