"""Helpers shared by the Triton kernels, and the one switch that says whether they can run."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the [gpu] extra is not installed
    triton = None


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    return triton is not None


def kernels_available(device: torch.device) -> bool:
    """Triton is importable and can run on ``device`` (CUDA, or any device when interpreting)."""
    return triton is not None and (device.type == "cuda" or interpreting())


def native_dot(dtype: torch.dtype) -> bool:
    """Use the tensor cores' own precision: for fp16/bf16 on a GPU (exact products, fp32
    accumulation); fp32 inputs and the interpreter (whose bf16 dot is wrong) use fp32 IEEE."""
    return dtype in (torch.float16, torch.bfloat16) and not interpreting()


if triton is not None:

    @triton.jit
    def dot(a, b, NATIVE: tl.constexpr):
        """``a @ b`` with fp32 accumulation (see :func:`native_dot`)."""
        if NATIVE:
            return tl.dot(a, b)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
