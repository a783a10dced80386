import os

import pytest
import torch

# Tests use tiny tensors: one thread is faster and keeps side-by-side runs from thrashing 2 cores.
torch.set_num_threads(int(os.environ.get("DMDCOPY_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
