"""The rank-0 logger, apart from `distributed` so that tools that never import torch
(reshard) log the same way."""

from __future__ import annotations

import logging
import os
import sys


class _RankFilter(logging.Filter):
    """Rank 0 logs everything; other ranks only warnings and errors, tagged with their rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        dist = sys.modules.get("torch.distributed")  # a process group exists only if torch is loaded
        if dist is not None and dist.is_available() and dist.is_initialized():
            rank = dist.get_rank()
        else:
            rank = int(os.environ.get("RANK", "0"))
        record.rank_tag = "" if rank == 0 else f"[rank {rank}] "
        return rank == 0 or record.levelno >= logging.WARNING


def get_logger(name: str = "llama_dist") -> logging.Logger:
    """The rank-0 logger: one helper instead of `if rank == 0` everywhere."""
    root = logging.getLogger("llama_dist")
    if not getattr(root, "_llama_dist_configured", False):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(rank_tag)s%(message)s"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
        root._llama_dist_configured = True  # type: ignore[attr-defined]
    return logging.getLogger(name) if name.startswith("llama_dist") else root.getChild(name)
