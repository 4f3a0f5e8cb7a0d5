import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a hub
os.environ.setdefault("TORCH_HOME", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "torch_home"))

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: OpenMP spinning with 2 threads on a busy 2-core machine is 50-100x slower.
torch.set_num_threads(1)


@pytest.fixture
def repo_root():
    from mergevq.config import REPO_ROOT

    return REPO_ROOT
