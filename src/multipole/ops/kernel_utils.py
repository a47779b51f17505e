"""Helpers shared by the Triton kernels, and the one switch that says whether they can run."""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the [gpu] extra is not installed
    triton = None
try:  # grid dependency control (Triton >= 3.3)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_wait = gdc_launch_dependents = None


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


def dependent_launch_supported(device: torch.device) -> bool:
    """Kernels on ``device`` can be launched before the previous one of their stream has
    finished (programmatic dependent launch: CUDA on Hopper or newer; not ROCm, not the
    interpreter), so that a chain of short kernels overlaps each launch with the previous
    kernel's tail."""
    if gdc_wait is None or device.type != "cuda" or torch.version.hip or interpreting():
        return False
    index = torch.cuda.current_device() if device.index is None else device.index
    return _compute_capability(index)[0] >= 9


@functools.cache
def _compute_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


if triton is not None:

    @triton.jit
    def wait_for_previous(PDL: tl.constexpr):
        """With ``PDL`` (a kernel launched with ``launch_pdl=True``): wait until the previous
        kernel of the stream has finished and its writes are visible, then let the next one
        start launching. Every program must call it before reading what earlier kernels
        wrote; since each waits for its predecessor, a chain waits for all of them."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def dot(a, b, NATIVE: tl.constexpr):
        """``a @ b`` with fp32 accumulation (see :func:`native_dot`)."""
        if NATIVE:
            return tl.dot(a, b)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")

    @triton.jit
    def load_rows(
        PTR, row0, num_rows, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        """Rows ``row0 .. row0 + num_rows`` of a row-major ``[*, HEAD_DIM]`` tensor as a
        zero-padded ``[BLOCK_R, BLOCK_D]`` tile (e.g. the query group of one KV head)."""
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        return tl.load(
            PTR + (row0 + offs_r[:, None]) * HEAD_DIM + offs_d[None, :],
            mask=(offs_r < num_rows)[:, None] & (offs_d < HEAD_DIM)[None, :],
            other=0.0,
        )

    @triton.jit
    def store_partial(
        M_PART,
        L_PART,
        ACC_PART,
        part,
        group,
        m,
        den,
        acc,
        HEAD_DIM: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        WITH_ACC: tl.constexpr,
    ):
        """Write one split's softmax state: max ``m``, sum ``den`` and (if ``WITH_ACC``) the
        accumulator ``acc``."""
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        mask_g = offs_g < group
        tl.store(M_PART + part * group + offs_g, m, mask=mask_g)
        tl.store(L_PART + part * group + offs_g, den, mask=mask_g)
        if WITH_ACC:
            tl.store(
                ACC_PART + (part * group + offs_g[:, None]) * HEAD_DIM + offs_d[None, :],
                acc,
                mask=mask_g[:, None] & (offs_d < HEAD_DIM)[None, :],
            )

    @triton.jit
    def softmax_update(m, den, x, weight):
        """One tile of an online softmax over logits ``x [G, N]`` with per-column weights
        (1, or cluster sizes): returns the new max and sum, the tile's weights ``p`` and the
        rescale factor ``alpha`` for the running accumulator."""
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = weight * tl.exp(x - m_safe[:, None])
        return m_new, den * alpha + tl.sum(p, axis=1), p, alpha
