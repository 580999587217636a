import os
import random

# Without a GPU, Triton kernels can only run in Triton's interpreter. It has to be chosen before anything imports
# triton (test_cuda.py and torch.compile both can, during collection), so it is set here, first.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a whole test file, then the previous count back. For files of small ops (intra-op
    threads only add synchronisation) or large models whose multi-threaded OpenMP workers, spinning, fight other
    processes for a shared machine's cores. Not autouse: a file opts in with
    pytestmark = pytest.mark.usefixtures("one_thread")."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
