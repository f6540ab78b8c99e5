import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _destroy_process_group():
    """No test leaks a process group (or fairscale's groups) into the next one."""
    yield
    from llama_dist.distributed import shutdown

    shutdown()


VOCAB = 512  # the shared test corpus's tokenizer size


@pytest.fixture(scope="module")
def committed_run(data_dir, tmp_path_factory):
    """A real run with a committed step-2 checkpoint at mp=1; tests resume copies of it."""
    from llama_dist.checkpoint import latest_checkpoint
    from llama_dist.train import train
    from test_train import tiny_config

    run = tmp_path_factory.mktemp("committed") / "run"
    assert train(tiny_config(data_dir, run, "train.steps=2", "checkpoint.interval=2")) == 0
    assert latest_checkpoint(run).name == "step-000002"
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A real prepared corpus: 1.5 MB of the standard library, a 512-token BPE tokenizer."""
    from llama_dist.prepare import prepare
    from llama_dist.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("data")
    tokenizer = train_tokenizer(["stdlib"], VOCAB, str(root / "tok"), max_bytes=1_500_000)
    prepare(["stdlib"], str(tokenizer), str(root / "stdlib"), workers=2, val_fraction=0.05, max_bytes=1_500_000)
    return root / "stdlib"


@pytest.fixture()
def training_ckpt(tmp_path):
    """An mp=1 training checkpoint of the reshard tests' small model: (dir, weights, optimizer state)."""
    from reshard_helpers import LLAMA2, model_weights, optimizer_state, write_checkpoint

    weights = model_weights(LLAMA2)
    optimizer = optimizer_state(weights)
    return write_checkpoint(tmp_path / "mp1", LLAMA2, weights, 1, optimizer), weights, optimizer
