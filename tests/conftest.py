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



@pytest.fixture(params=["kernel", "torch-path"])
def cpu_path(request, monkeypatch):
    """Run a CPU test twice: through the Triton kernel in the interpreter, and through the CPU
    torch path that CPU params take outside the interpreter (torch's fused CPU op where its math
    and state dtype are ours, the reference elsewhere). ``fused`` picks the path per call from
    ``TRITON_INTERPRET``, so switching it off here is enough."""
    if request.param == "kernel":
        if not INTERPRET:
            pytest.skip("on the CPU the kernel runs only under TRITON_INTERPRET=1")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    return request.param


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
