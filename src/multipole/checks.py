"""Input validation: the one place where error messages about user tensors are written.

Every message names the argument, what was expected and what was received, e.g.
``q: expected shape [B, num_q_heads, head_dim] = [4, 32, 128], got [4, 32, 64]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dims(names: Sequence[str], sizes: Sequence[int | None]) -> str:
    shown = ", ".join(names)
    if sizes and all(s is not None for s in sizes):
        return f"[{shown}] = [{', '.join(str(s) for s in sizes)}]"
    return f"[{shown}]"


def check_tensor(name: str, value: object, dims: Sequence[str]) -> torch.Tensor:
    """Check that ``value`` is a floating tensor with ``len(dims)`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name}: expected a torch.Tensor {_dims(dims, [])}, got {type(value).__name__}"
        )
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected dtype float16, bfloat16, float32 or float64, got {value.dtype}"
        )
    if value.dim() != len(dims):
        raise ValueError(
            f"{name}: expected {len(dims)} dims {_dims(dims, [])}, got shape {list(value.shape)}"
        )
    return value


def check_shape(
    name: str, value: torch.Tensor, dims: Sequence[str], expected: Sequence[int | None]
) -> None:
    """Check every dimension whose expected size is not None."""
    ok = all(e is None or e == s for e, s in zip(expected, value.shape, strict=True))
    if not ok:
        full = [s if e is None else e for e, s in zip(expected, value.shape, strict=True)]
        raise ValueError(f"{name}: expected shape {_dims(dims, full)}, got {list(value.shape)}")


def check_like(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Check that ``value`` has the dtype and device of ``ref``."""
    if value.device != ref.device:
        raise ValueError(
            f"{name}: expected device {ref.device} (as {ref_name}), got {value.device}"
        )
    if value.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (as {ref_name}), got {value.dtype}")


def check_finite(name: str, value: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
    """Reject NaN and inf (this syncs with the device: call it only when validating).

    With ``lengths [B]``, only the first ``lengths[b]`` entries of dim 2 of ``value [B, H, N, D]``
    are checked: padding may hold anything.
    """
    if lengths is not None:
        valid = torch.arange(value.shape[2], device=value.device) < lengths.unsqueeze(1)
        value = value.transpose(1, 2)[valid]
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")


def check_lengths(
    name: str, lengths: object, batch: int, max_len: int, device: torch.device, *, min_len: int = 1
) -> torch.Tensor:
    """Check a ``[B]`` integer tensor (or sequence) of valid lengths in [min_len, max_len]."""
    if lengths is None:
        return torch.full((batch,), max_len, dtype=torch.int64, device=device)
    if not isinstance(lengths, torch.Tensor):
        try:
            lengths = torch.as_tensor(lengths, device=device)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{name}: expected an integer tensor [B] = [{batch}], got {type(lengths).__name__}"
            ) from None
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"{name}: expected an integer tensor [B] = [{batch}], got {lengths.dtype}")
    if list(lengths.shape) != [batch]:
        raise ValueError(f"{name}: expected shape [B] = [{batch}], got {list(lengths.shape)}")
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < min_len or hi > max_len:
        raise ValueError(
            f"{name}: expected values in [{min_len}, {max_len}], got min {lo}, max {hi}"
        )
    return lengths.to(device=device, dtype=torch.int64)


def check_heads(q_name: str, num_q_heads: int, num_kv_heads: int) -> int:
    """Return the GQA group size, checking that query heads divide into KV heads."""
    if num_kv_heads < 1 or num_q_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"{q_name}: expected num_q_heads to be a multiple of num_kv_heads={num_kv_heads}, "
            f"got num_q_heads={num_q_heads}"
        )
    return num_q_heads // num_kv_heads


def should_validate(flag: bool | None, tensor: torch.Tensor) -> bool:
    """Resolve ``validate=None`` to: check CPU tensors, skip device tensors (a check syncs)."""
    return tensor.device.type == "cpu" if flag is None else flag


def check_row_index(name: str, index: torch.Tensor | Sequence[int], batch: int) -> list[int]:
    """``index`` as a host list of ``batch`` row numbers in ``[0, batch)``, or a clear error."""
    if isinstance(index, torch.Tensor):
        if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError(
                f"{name}: expected a 1-D integer tensor of {batch} rows, got "
                f"{index.dtype} of shape {list(index.shape)}"
            )
        index = index.tolist()
    rows = list(index)
    if len(rows) != batch or not all(
        isinstance(r, int) and not isinstance(r, bool) and 0 <= r < batch for r in rows
    ):
        raise ValueError(f"{name}: expected {batch} row numbers in [0, {batch}), got {rows}")
    return rows
