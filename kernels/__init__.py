"""Fused kernels for the VL-CABS head, the pixel maps and CARZero's fusion-decoder cross-attention
(Triton on CUDA, plain torch elsewhere).

Each op has a public function that dispatches, and a ``*_ref`` twin in plain torch that is the
CPU path and the baseline for tests and benchmarks. Triton is optional (``pip install triton``).
"""

from radflash.kernels._dispatch import BACKENDS, kernel_backend, set_kernel_backend
from radflash.kernels.attention import cross_attention, cross_attention_ref
from radflash.kernels.maps import MapResult, upsample_maps, upsample_maps_ref
from radflash.kernels.vlcabs_head import vlcabs, vlcabs_ref

__all__ = [
    "BACKENDS",
    "MapResult",
    "cross_attention",
    "cross_attention_ref",
    "kernel_backend",
    "set_kernel_backend",
    "upsample_maps",
    "upsample_maps_ref",
    "vlcabs",
    "vlcabs_ref",
]
