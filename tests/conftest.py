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
