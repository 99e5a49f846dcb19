"""The Triton kernels: :mod:`.common` (tables, block maps, state formats, norms: what every
algorithm shares) and one module per algorithm."""
