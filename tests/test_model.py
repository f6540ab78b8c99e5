"""Single-process properties of the model: KV-cache decoding, init, shapes, counting."""

import json

import pytest
import torch
import torch.nn.functional as F

from llama_dist.config import load_config
from llama_dist.distributed import init_distributed, seed_everything
from llama_dist.model import ModelArgs, Transformer, apply_rope, count_parameters, flops_per_token

ARGS = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=80, multiple_of=16, max_seq_len=32)


@pytest.fixture
def model():
    init_distributed(mp=1, backend="gloo", device="cpu")
    seed_everything(0)
    return Transformer(ModelArgs(**ARGS)).eval()


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward(model):
    tokens = torch.randint(0, 80, (2, 14), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    model.setup_caches(max_batch_size=2, max_seq_len=32)
    # a prompt of 5 tokens at once, then one token at a time
    steps = [model(tokens[:, :5], start_pos=0)]
    steps += [model(tokens[:, t : t + 1], start_pos=t) for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    # a chunk of several tokens at start_pos > 0 needs the offset causal mask
    chunked = torch.cat([model(tokens[:, :6], 0), model(tokens[:, 6:11], 6), model(tokens[:, 11:], 11)], dim=1)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-5)


def test_decoding_without_cache_is_an_error(model):
    with pytest.raises(RuntimeError, match="setup_caches"):
        model(torch.zeros(1, 1, dtype=torch.long), start_pos=3)


def test_rope_matches_metas_complex_multiplication():
    # Meta rotates interleaved pairs as complex numbers: x * e^{i theta pos}
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8)
    head_dim, theta = 8, 10000.0
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(5).float(), freqs)
    cis = torch.polar(torch.ones_like(angles), angles)
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, 5, 3, 4, 2)) * cis[None, :, None, :]).flatten(-2)
    from llama_dist.model import precompute_rope

    torch.testing.assert_close(apply_rope(x, precompute_rope(head_dim, 5, theta)), expected)


def test_initialisation_is_real_and_seeded(model):
    weights = dict(model.named_parameters())
    wq = weights["layers.0.attention.wq.weight"]
    assert 0.015 < wq.std().item() < 0.025  # normal(0, 0.02), not uninitialised memory
    wo = weights["layers.0.attention.wo.weight"]
    assert wo.std().item() < wq.std().item()  # residual projections scaled by depth
    assert torch.equal(weights["norm.weight"], torch.ones(64))
    seed_everything(0)
    again = Transformer(ModelArgs(**ARGS))
    assert all(torch.equal(p, weights[n]) for n, p in again.named_parameters())


def test_meta_names_and_no_biases(model):
    names = set(model.state_dict())
    assert "tok_embeddings.weight" in names and "output.weight" in names and "norm.weight" in names
    for i in range(2):
        for key in ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                    "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm"):
            assert f"layers.{i}.{key}.weight" in names
    assert not any(n.endswith("bias") for n in names)
    assert len(names) == 3 + 2 * 9  # nothing else (no rope buffer, no cache) in a checkpoint


def test_count_matches_built_model(model):
    built = sum(p.numel() for p in model.parameters())
    assert count_parameters(ModelArgs(**ARGS)) == built
    args = ModelArgs(**ARGS)
    non_embedding = built - args.vocab_size * args.dim
    assert flops_per_token(args, 16) == 6 * non_embedding + 12 * 2 * 8 * 8 * 16


@pytest.mark.parametrize(
    "name, params, ffn",
    [("llama2-7b", 6_738_415_616, 11008), ("llama2-13b", 13_015_864_320, 13824),
     ("llama2-70b", 68_976_648_192, 28672), ("llama3-8b", 8_030_261_248, 14336),
     ("llama-1b", 1_100_048_384, 5632)],  # TinyLlama 1.1B's shape
)
def test_published_shapes(name, params, ffn):
    args = load_config(name).model
    assert args.ffn_hidden_dim == ffn
    assert count_parameters(args) == params


def test_model_args_accept_metas_params_json():
    params = json.loads('{"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, '
                        '"norm_eps": 1e-05, "vocab_size": -1}')
    args = ModelArgs(**params)
    assert args.theta == 10000.0 and not args.vocab_parallel_embedding
    assert ModelArgs(**args.params_json()) == args
    assert "rope_theta" not in args.params_json()  # Llama 2's ModelArgs has no such key
    llama3 = load_config("llama3-8b").model
    assert llama3.params_json()["rope_theta"] == 500000.0 and llama3.vocab_parallel_embedding
    assert "use_scaled_rope" not in llama3.params_json()  # nor Llama 3's: only 3.1's files carry it
    assert ModelArgs(norm_eps=0.0).params_json()["norm_eps"] == 0.0  # a zero is a value, unlike False
    llama31 = ModelArgs(**llama3.params_json(), use_scaled_rope=True)
    assert llama31.params_json()["use_scaled_rope"] is True and ModelArgs(**llama31.params_json()) == llama31


def test_llama31_rope_stretches_only_the_slow_frequencies():
    """Against Meta's rule written out one frequency at a time: wavelengths under 8192/4 tokens
    kept, over 8192 divided by 8, a linear blend between; Llama 3.1 8B's head width and theta."""
    import math

    from llama_dist.model import precompute_rope, stretch_slow_frequencies

    head_dim, theta = 128, 500000.0
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    expected = []
    for freq in freqs.tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < 8192 / 4:
            expected.append(freq)
        elif wavelength > 8192 / 1:
            expected.append(freq / 8)
        else:
            blend = (8192 / wavelength - 1) / (4 - 1)
            expected.append((1 - blend) * freq / 8 + blend * freq)
    stretched = stretch_slow_frequencies(freqs)
    torch.testing.assert_close(stretched, torch.tensor(expected), rtol=1e-6, atol=0)
    kept, divided = (stretched == freqs).sum().item(), torch.isclose(stretched, freqs / 8).sum().item()
    assert kept > 0 and divided > 0 and kept + divided < len(freqs)  # all three kinds occur
    angles = torch.outer(torch.arange(4).float(), stretched)
    rope = precompute_rope(head_dim, 4, theta, scaled=True)
    torch.testing.assert_close(rope, torch.stack([angles.cos(), angles.sin()], dim=-1))


def test_activation_checkpointing_keeps_the_gradients(model, monkeypatch):
    """Checkpointing recomputes each block in the backward pass (so its forward runs twice)
    and gives the same gradients; equal gradients alone would pass if the flag did nothing."""
    from llama_dist.model import TransformerBlock

    model.train()
    tokens = torch.randint(0, 80, (2, 12), generator=torch.Generator().manual_seed(3))
    calls = []
    block_forward = TransformerBlock.forward

    def counting_forward(self, *args, **kwargs):
        calls.append(self.layer_id)
        return block_forward(self, *args, **kwargs)

    monkeypatch.setattr(TransformerBlock, "forward", counting_forward)

    def grads():
        model.zero_grad()
        calls.clear()
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    layers = list(range(model.n_layers))
    plain = grads()
    assert sorted(calls) == layers  # once per block
    model.activation_checkpointing = True
    checkpointed = grads()
    assert sorted(calls) == sorted(layers * 2)  # the forward pass, and the recompute in backward
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6, msg=name)
