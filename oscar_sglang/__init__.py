"""OSCAR rotated 2-4-bit KV cache (keys 3 bits and values 2 by default) for stock SGLang.

Subpackages:
- ``oscar_sglang.kernels``: reference codec and Triton kernels (torch + triton only).
- ``oscar_sglang.calib``: offline calibration and the rotations file (no sglang import).
- the integration modules of this package (the only place that imports sglang).

Importing this package imports nothing heavy.
"""

__version__ = "0.1.0"
