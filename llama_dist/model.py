"""LLaMA 2/3 in Meta's parameter names, with fairscale tensor-parallel layers.

Reads top to bottom like the paper: RMSNorm, rotary embeddings, attention with
grouped-query heads and a KV cache, the SwiGLU feed-forward, the block, the
model. The only distributed things here are fairscale's layers and the local
head count; process groups live in `llama_dist.distributed`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import fairscale.nn.model_parallel.initialize as fs_init
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)

from llama_dist.model_args import ModelArgs  # Meta keeps it atop model.py; apart, the checkpoint tools need no torch

INIT_STD = 0.02


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 even under bf16 autocast, then return to the input's type
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def stretch_slow_frequencies(freqs: torch.Tensor) -> torch.Tensor:
    """Llama 3.1's long-context rotary: pairs that turn more slowly than once in 8192 tokens
    turn 8x slower still, those faster than 4 turns in 8192 are kept, and in between the two
    blend linearly (Meta's constants: factor 8, frequency factors 1 and 4, context 8192).
    Meta's code applies them wherever params.json says use_scaled_rope; Llama 3.2's 1B and 3B
    were released with factor 32 in their transformers configs, which this does not model."""
    factor, low, high, context = 8.0, 1.0, 4.0, 8192
    turns = context / (2 * math.pi / freqs)  # turns in the original context
    blend = ((turns - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - blend) * freqs / factor + blend * freqs


def precompute_rope(head_dim: int, end: int, theta: float, scaled: bool = False) -> torch.Tensor:
    """cos and sin of each position times each pair's frequency: (end, head_dim/2, 2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if scaled:
        freqs = stretch_slow_frequencies(freqs)
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)  # (end, hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0,x1),(x2,x3)... as Meta's complex multiply does.

    x: (B, T, heads, hd); rope: (T, hd/2, 2). Written in real arithmetic so that
    torch.compile can fuse it; the numbers equal Meta's view_as_complex version.
    """
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, h, hd/2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos = rope[None, :, None, :, 0]  # (1, T, 1, hd/2)
    sin = rope[None, :, None, :, 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


def decoding_attention(q: torch.Tensor):
    """Attention backends for decoding, where the key length grows by one every step.

    On CUDA, torch may pick cuDNN's attention, which builds a plan for each new shape: on
    an H200 (torch 2.11) a decoding step of the 110M model took 62.6 ms with it and 13.5 ms
    without. Flash and memory-efficient attention take any length as it comes.
    """
    if not q.is_cuda or not hasattr(torch.nn, "attention"):  # torch.nn.attention: torch 2.3 on
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, T, kv_heads, hd) -> (B, T, kv_heads * n_rep, hd): query head h reads kv head h // n_rep."""
    if n_rep == 1:
        return x
    b, t, kv, hd = x.shape
    return x[:, :, :, None, :].expand(b, t, kv, n_rep, hd).reshape(b, t, kv * n_rep, hd)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, init_in: Callable, init_out: Callable):
        super().__init__()
        mp = fs_init.get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = args.kv_heads // mp
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.head_dim
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, bias=False,
                                       gather_output=False, init_method=init_in)
        self.wk = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim, bias=False,
                                       gather_output=False, init_method=init_in)
        self.wv = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim, bias=False,
                                       gather_output=False, init_method=init_in)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, bias=False,
                                    input_is_parallel=True, init_method=init_out)
        self.cache_k: Optional[torch.Tensor] = None
        self.cache_v: Optional[torch.Tensor] = None

    def setup_cache(self, max_batch_size: int, max_seq_len: int, like: torch.Tensor) -> None:
        shape = (max_batch_size, max_seq_len, self.n_local_kv_heads, self.head_dim)
        self.cache_k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.cache_v = torch.zeros(shape, dtype=like.dtype, device=like.device)

    def forward(self, x: torch.Tensor, start_pos: int, rope: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)

        if self.cache_k is not None:
            # decoding: keep this step's keys and values, attend over everything so far
            end = start_pos + seqlen
            self.cache_k[:bsz, start_pos:end] = k.detach().to(self.cache_k.dtype)
            self.cache_v[:bsz, start_pos:end] = v.detach().to(self.cache_v.dtype)
            k = self.cache_k[:bsz, :end].to(q.dtype)
            v = self.cache_v[:bsz, :end].to(q.dtype)
        elif start_pos:
            raise RuntimeError("start_pos > 0 needs a KV cache: call Transformer.setup_caches first")

        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        if start_pos == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seqlen > 1)
        else:
            mask = None  # one new token sees every key so far
            if seqlen > 1:  # query i sits at position start_pos + i and sees keys 0..start_pos + i
                keys = torch.arange(start_pos + seqlen, device=x.device)
                queries = torch.arange(start_pos, start_pos + seqlen, device=x.device)
                mask = keys[None, :] <= queries[:, None]  # (T, start_pos + T)
            with decoding_attention(q):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)  # (B, T, local_heads * hd)
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, init_in: Callable, init_out: Callable):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False,
                                       init_method=init_in)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True,
                                    init_method=init_out)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False,
                                       init_method=init_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, init_in: Callable, init_out: Callable):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, init_in, init_out)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, init_in, init_out)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: int, rope: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, rope)
        return h + self.feed_forward(self.ffn_norm(h))


def _leave_uninitialised(weight: torch.Tensor) -> torch.Tensor:
    return weight


def init_normal(weight: torch.Tensor, std: float = INIT_STD) -> torch.Tensor:
    # nn.init works under no_grad, so it is safe on fairscale's mp=1 Parameter too
    return nn.init.normal_(weight, mean=0.0, std=std)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, init_weights: bool = True):
        """init_weights=False skips drawing random weights, for a model a checkpoint will fill."""
        super().__init__()
        self.args = args
        self.vocab_size = args.vocab_size
        self.n_layers = args.n_layers
        self.activation_checkpointing = False
        # GPT-2's scaling: the projections into the residual stream shrink with depth
        out_std = INIT_STD / math.sqrt(2 * args.n_layers)
        init_out = (lambda w: init_normal(w, out_std)) if init_weights else _leave_uninitialised
        init_in = init_normal if init_weights else _leave_uninitialised

        embedding = VocabParallelEmbedding if args.vocab_parallel_embedding else ParallelEmbedding
        self.tok_embeddings = embedding(args.vocab_size, args.dim, init_method=init_in)
        self.layers = nn.ModuleList(TransformerBlock(i, args, init_in, init_out) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = ColumnParallelLinear(args.dim, args.vocab_size, bias=False, init_method=init_in)
        # positions up to 2 * max_seq_len, as Meta precomputes; not saved in checkpoints
        rope = precompute_rope(args.head_dim, args.max_seq_len * 2, args.theta, args.use_scaled_rope)
        self.register_buffer("rope", rope, persistent=False)

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: Optional[torch.dtype] = None) -> None:
        """Allocate the KV caches for decoding; training never calls this."""
        like = torch.empty(0, dtype=dtype or self.output.weight.dtype, device=self.output.weight.device)
        for layer in self.layers:
            layer.attention.setup_cache(max_batch_size, max_seq_len, like)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab) in fp32."""
        _, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        rope = self.rope[start_pos : start_pos + seqlen]
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                h = checkpoint(layer, h, start_pos, rope, use_reentrant=False)
            else:
                h = layer(h, start_pos, rope)
        h = self.norm(h)
        return self.output(h).float()


# --------------------------------------------------------------------------- counting


def count_parameters(args: ModelArgs, include_embedding: bool = True) -> int:
    """Parameters of the full (unsharded) model, from its shape alone."""
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.kv_heads)
    ffn = 3 * args.dim * args.ffn_hidden_dim
    per_layer = attn + ffn + 2 * args.dim
    total = args.n_layers * per_layer + args.dim + args.vocab_size * args.dim  # + norm + output
    if include_embedding:
        total += args.vocab_size * args.dim
    return total


def flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Training FLOPs per token, 6N + 12*L*H*Q*T as nanoGPT and torchtitan count them.

    N leaves out the embedding table (a lookup, not a matmul); the attention term
    counts the score and value matmuls over the whole sequence.
    """
    n = count_parameters(args, include_embedding=False)
    return 6 * n + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
