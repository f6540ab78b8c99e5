"""The model is the same function at every model-parallel size.

MP=2 and MP=4 run in real gloo ranks; their logits and every parameter's gradient
(gathered on its shard dimension) must equal an MP=1 model built from the same seed.
"""

import pytest
import torch
import torch.nn.functional as F

from llama_dist.distributed import init_distributed, seed_everything
from llama_dist.meta_format import shard_dim
from llama_dist.model import ModelArgs, Transformer
from multiproc import run_ranks

SEED = 1234
# GQA (8 query heads, 4 kv heads), every size divisible by 4
LLAMA2 = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=96, multiple_of=16, max_seq_len=32)
LLAMA3 = dict(LLAMA2, rope_theta=500000.0)  # embedding split on the vocabulary


def _batch():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, LLAMA2["vocab_size"], (3, 12), generator=g)
    targets = torch.randint(0, LLAMA2["vocab_size"], (3, 12), generator=g)
    return tokens, targets


def _logits_and_grads(mp: int, params: dict):
    info = init_distributed(mp=mp, backend="gloo", device="cpu")
    seed_everything(SEED)
    model = Transformer(ModelArgs(**params))
    tokens, targets = _batch()
    logits = model(tokens)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    return info.mp_rank, logits.detach(), grads, weights


def _both_layouts(mp: int):
    return [_logits_and_grads(mp, params) for params in (LLAMA2, LLAMA3)]


def _gather(per_rank: list[dict], args: ModelArgs) -> dict:
    full = {}
    for name in per_rank[0]:
        dim = shard_dim(name, args)
        parts = [r[name] for r in per_rank]
        if dim is None:
            for part in parts[1:]:
                assert torch.equal(part, parts[0]), f"replicated {name} differs across mp ranks"
            full[name] = parts[0]
        else:
            full[name] = torch.cat(parts, dim=dim)
    return full


@pytest.fixture(scope="module")
def reference():
    results = _both_layouts(1)
    from llama_dist.distributed import shutdown

    shutdown()
    return results


@pytest.mark.parametrize("mp", [2, 4])
def test_logits_and_grads_match_mp1(mp, reference):
    ranks = run_ranks(_both_layouts, mp, mp)
    for layout, params in enumerate((LLAMA2, LLAMA3)):
        args = ModelArgs(**params)
        _, ref_logits, ref_grads, ref_weights = reference[layout]
        per_rank = sorted((r[layout] for r in ranks), key=lambda r: r[0])
        assert [r[0] for r in per_rank] == list(range(mp))
        for _, logits, _, _ in per_rank:
            torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
        weights = _gather([r[3] for r in per_rank], args)
        grads = _gather([r[2] for r in per_rank], args)
        assert weights.keys() == ref_weights.keys()
        for name in ref_weights:
            # the same seed gives bitwise the same full weights at every mp size
            assert torch.equal(weights[name], ref_weights[name]), name
            assert grads[name].shape == ref_grads[name].shape, name
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-5, msg=name)
        # the shards really are split, not replicated copies
        wq = per_rank[0][3]["layers.0.attention.wq.weight"]
        assert wq.shape[0] == args.n_heads * args.head_dim // mp
