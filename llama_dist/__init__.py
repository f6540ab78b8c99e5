"""llama_dist: distributed pretraining of LLaMA-style models with Meta-format checkpoints."""

__version__ = "0.1.0"
