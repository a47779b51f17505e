"""Shared fixtures: fresh random inputs every run, reproducible from the printed seed."""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

SESSION_SEED = int(os.environ.get("MULTIPOLE_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config) -> str:
    return f"multipole test seed: MULTIPOLE_TEST_SEED={SESSION_SEED}"


def pytest_terminal_summary(terminalreporter) -> None:
    # -q hides the header: repeat the seed at the end so a failure can be replayed
    terminalreporter.write_line(f"multipole test seed: MULTIPOLE_TEST_SEED={SESSION_SEED}")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:  # (a test that asks for the fixture by name inside marks itself)
        if "kernel_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kernels)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the session seed and the test id."""
    seed = (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def kernel_device() -> torch.device:
    """Where the Triton kernels run: CUDA, else the CPU under ``TRITON_INTERPRET=1``."""
    pytest.importorskip("triton")
    from multipole.ops.kernel_utils import interpreting

    if torch.cuda.is_available():
        return torch.device("cuda")
    if not interpreting():
        pytest.skip("needs a CUDA device or TRITON_INTERPRET=1")
    return torch.device("cpu")
