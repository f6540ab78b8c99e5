"""Throughput, MFU against the real device's peak, memory, and the rank-0 TensorBoard writer."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch

# Dense peak TFLOP/s per GPU from the vendors' datasheets (no sparsity), as
# (bf16/fp16 tensor core, fp32 without TF32). Matched by substring of the device
# name, most specific first. MFU against the wrong row is how others report 104%.
GPU_PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("GH200", 989.0, 67.0),  # before H200, which its name contains
    ("H200 NVL", 835.0, 60.0),
    ("H200", 989.0, 67.0),  # SXM
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),  # SXM
    ("H800 PCIe", 756.0, 51.0),
    ("H800", 989.0, 67.0),  # SXM
    ("B200", 2250.0, 80.0),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("A6000", 154.8, 38.7),  # RTX A6000
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("A10G", 70.0, 31.2),
    ("A10", 125.0, 31.2),
    ("RTX 4090", 165.2, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("V100", 125.0, 15.7),  # fp16
    ("T4", 65.0, 8.1),  # fp16
]


def gpu_peak_flops(name: str, dtype: torch.dtype) -> Optional[float]:
    for key, half, single in GPU_PEAK_TFLOPS:
        if key in name:
            return (half if dtype in (torch.bfloat16, torch.float16) else single) * 1e12
    return None


def measure_cpu_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 matmul FLOP/s at this process's thread count: the CPU's practical peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm up the kernels and caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def device_peak_flops(device: torch.device, dtype: torch.dtype, cpu_peak_tflops: Optional[float]) -> tuple[float, str]:
    """The per-device peak for MFU and where it came from (for the log)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, dtype)
        if peak is not None:
            return peak, f"{name} datasheet"
        return float("nan"), f"{name} (unknown GPU: MFU not reported)"
    if cpu_peak_tflops:
        return cpu_peak_tflops * 1e12, "log.cpu_peak_tflops"
    return measure_cpu_peak_flops(), f"fp32 matmul measured at {torch.get_num_threads()} threads"


def memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: the CUDA allocator's, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class TensorBoard:
    """Scalars on rank 0 only; every other rank holds a no-op, so callers never check ranks.

    Events after the step the run starts from are purged from view, so a run that
    crashed after its last checkpoint (or before its first) shows each step once.
    """

    def __init__(self, log_dir: Path, enabled: bool, resume_step: int = 0):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value == value:  # skip NaN (an unknown peak, a skipped step's loss)
                self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
