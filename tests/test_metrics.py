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
    ("NVIDIA H200 NVL", torch.bfloat16, 835.0),  # its name holds "H200" too
    ("NVIDIA GH200 480GB", torch.bfloat16, 989.0),  # and this one "H200"
    ("NVIDIA H800 PCIe", torch.bfloat16, 756.0),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),  # dense, not the 624 "with sparsity"
    ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5),  # fp32 training is not measured against bf16 peaks
    ("NVIDIA A10G", torch.bfloat16, 70.0),
    ("NVIDIA L40S", torch.bfloat16, 362.0),
])
def test_gpu_peaks_pick_the_right_row(name, dtype, tflops):
    assert gpu_peak_flops(name, dtype) == tflops * 1e12


def test_unknown_gpu_has_no_peak():
    assert gpu_peak_flops("Some Future GPU", torch.bfloat16) is None


def test_measured_cpu_peak_is_the_fastest_of_its_matmuls(monkeypatch):
    """2 n^3 FLOPs over the best time: the clock is scripted, since a timed comparison of two
    real measurements fails whenever another process takes the core during one of them."""
    from llama_dist import metrics

    ticks = iter([0.0, 3.0, 10.0, 10.5, 20.0, 22.0])  # (start, end) of three matmuls: 3 s, 0.5 s, 2 s
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(ticks))
    assert measure_cpu_peak_flops(size=64, repeats=3) == 2 * 64**3 / 0.5


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
