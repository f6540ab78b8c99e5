"""Meta's params.json as a dataclass, apart from the model so that the checkpoint tools
(reshard, which never imports torch) can read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelArgs:
    """The fields of Meta's params.json, plus the two sizes Meta's Llama.build passes.

    rope_theta=None is the Llama 2 family (theta 10000, embedding split on dim);
    a rope_theta is the Llama 3 family (embedding split on the vocabulary), as in
    Meta's two code bases, which tell the families apart by that key. Llama 3.1 and
    later add use_scaled_rope, which params.json carries only where it is true (Meta's
    Llama 2 and 3 loaders do not know the key).
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256  # the FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: Optional[float] = None
    use_scaled_rope: bool = False  # Llama 3.1+: the slow rotary frequencies stretched for long contexts
    max_batch_size: int = 32
    max_seq_len: int = 2048

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def theta(self) -> float:
        return 10000.0 if self.rope_theta is None else self.rope_theta

    @property
    def vocab_parallel_embedding(self) -> bool:
        return self.rope_theta is not None

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def mp_split_sizes(self, vocab_size: Optional[int] = None) -> dict[str, int]:
        """Every size a model-parallel degree must divide: fairscale splits each one across ranks."""
        sizes = {"n_heads": self.n_heads, "n_kv_heads": self.kv_heads}
        if not self.vocab_parallel_embedding:  # Llama 2's ParallelEmbedding splits the model dimension
            sizes["dim"] = self.dim
        sizes["ffn_hidden_dim"] = self.ffn_hidden_dim
        sizes["vocab_size"] = vocab_size or self.vocab_size  # the output layer (and Llama 3's embedding)
        return sizes

    def params_json(self) -> dict:
        """The params.json that Meta's loader for this family accepts (no unknown keys)."""
        keys = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope"]
        return {k: v for k in keys if (v := getattr(self, k)) is not None and v is not False}
