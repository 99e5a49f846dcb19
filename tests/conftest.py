"""Test configuration.

Without a CUDA device the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), so every
kernel is exercised on CPU tensors in CI. The variable must be set before ``triton.jit`` decorates
the kernels, i.e. before ``fused`` is imported, which is why it is set here at collection time.
With a GPU the kernels compile for the device and the ``cuda``-marked tests run.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=pytest.mark.cuda, id="cuda")]
# where the Triton kernel itself runs: CUDA, and the CPU only in the interpreter (on a machine
# with a GPU, CPU params take the torch path, so kernel launch counts are meaningless there)
KERNEL_DEVICES = [
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(
        not INTERPRET, reason="on the CPU the kernel runs only under TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.cuda, id="cuda"),
]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
