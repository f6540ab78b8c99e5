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
