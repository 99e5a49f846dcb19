"""fused: optimizers as Triton kernels that read the learning rate from a device tensor.

>>> from fused import FusedAdamW
>>> opt = FusedAdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
"""

from .adamw import FusedAdamW, fused_adamw
from .lamb import FusedLAMB
from .sgd import FusedLARS, FusedSGD

__all__ = ["FusedAdamW", "fused_adamw", "FusedSGD", "FusedLARS", "FusedLAMB"]
