"""MFU has a right numerator (model FLOPs, checked by torch's own FLOP counter) and a right
denominator (the actual device's peak: no 104% or 152% from the wrong table row)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from llama_dist.distributed import init_distributed
from llama_dist.metrics import TensorBoard, gpu_peak_flops, measure_cpu_peak_flops
from llama_dist.model import ModelArgs, Transformer, flops_per_token


def test_flops_per_token_matches_torchs_flop_counter():
    init_distributed(mp=1, backend="gloo", device="cpu")
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16, max_seq_len=32)
    model = Transformer(args)
    batch, seq_len = 2, 16
    tokens = torch.randint(0, 96, (batch, seq_len))
    # the math backend spells attention as matmuls, so the counter sees them
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    norm_params = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    # the 6N count includes the norm weights, which do no matmul: take them out to compare
    expected = (flops_per_token(args, seq_len) - 6 * norm_params) * batch * seq_len
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.0),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),  # not the SXM figure
    ("NVIDIA H200", torch.bfloat16, 989.0),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),  # dense, not the 624 "with sparsity"
    ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5),  # fp32 training is not measured against bf16 peaks
    ("NVIDIA A10G", torch.bfloat16, 70.0),
    ("NVIDIA L40S", torch.bfloat16, 362.0),
])
def test_gpu_peaks_pick_the_right_row(name, dtype, tflops):
    assert gpu_peak_flops(name, dtype) == tflops * 1e12


def test_unknown_gpu_has_no_peak():
    assert gpu_peak_flops("Some Future GPU", torch.bfloat16) is None


def test_measured_cpu_peak_bounds_a_real_matmul():
    peak = measure_cpu_peak_flops(size=256, repeats=3)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    import time

    start = time.perf_counter()
    for _ in range(3):
        torch.mm(a, b)
    achieved = 3 * 2 * 256**3 / (time.perf_counter() - start)
    assert peak > 0 and achieved <= peak * 1.5  # a peak that a plain matmul does not beat


def test_a_fresh_start_in_a_used_run_dir_logs_each_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # a run that crashed before its first checkpoint, then restarted from step 0 in the same dir
    for _ in range(2):
        board = TensorBoard(tmp_path, enabled=True, resume_step=0)
        for step in (1, 2, 3):
            board.scalars(step, {"loss/train": float(step)})
        board.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2, 3]
