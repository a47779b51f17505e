"""The kernel benchmark's CPU parts: the memory check, skipped configurations, the plot."""

from __future__ import annotations

import json

import pytest
import torch

from multipole.bench import kernels

GiB = 2**30


def test_memory_estimate_of_the_largest_configurations():
    """512K tokens: keys and values of 32 GiB at batch 16, 128 GiB at batch 64."""
    assert kernels.kv_bytes(524288, 16) == 32 * GiB
    assert kernels.kv_bytes(524288, 64) == 128 * GiB
    assert kernels.needed_bytes(524288, 16) == 81 * GiB  # 2.5 x KV + 1 GiB
    assert kernels.needed_bytes(524288, 64) == 321 * GiB


def test_fits_keeps_headroom():
    h100, h200 = 78 * GiB, 139 * GiB  # free memory, about
    assert kernels.fits(32768, 1, h100) and kernels.fits(131072, 16, h100)
    assert kernels.fits(524288, 4, h100)
    assert not kernels.fits(524288, 16, h100) and not kernels.fits(131072, 64, h100)
    assert kernels.fits(524288, 16, h200) and not kernels.fits(524288, 64, h200)
    needed = kernels.needed_bytes(32768, 64)
    assert not kernels.fits(32768, 64, needed)  # no room for the 10% headroom
    assert kernels.fits(32768, 64, int(needed / 0.9) + 1)


def test_a_configuration_that_does_not_fit_is_skipped_unrun(monkeypatch):
    monkeypatch.setattr(kernels, "free_memory", lambda: 8 * GiB)
    monkeypatch.setattr(kernels, "bench_step", lambda *a: pytest.fail("ran, should skip"))
    (row,) = kernels.run_config(524288, 16, 0.05, None)
    assert row["method"] == "skipped" and (row["context"], row["batch"]) == (524288, 16)
    assert row["budget"] == 0.05 and "81.0 GiB" in row["reason"]


def test_out_of_memory_skips_the_configuration(monkeypatch):
    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB.")

    monkeypatch.setattr(kernels, "free_memory", lambda: 1000 * GiB)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(kernels, "bench_step", oom)
    (row,) = kernels.run_config(131072, 64, 128, None)
    assert row["method"] == "skipped" and "Tried to allocate 32.00 GiB" in row["reason"]


def synthetic_report() -> dict:
    rows = []
    for context in (32768, 131072):
        for batch in (1, 4, 16):
            for budget in (128, 0.05):
                if context == 131072 and batch == 16:
                    rows.append(kernels.skipped(context, batch, budget, "needs ~21 GiB"))
                    continue
                dense = 0.05 * batch * context / 32768
                rows.append(dict(method="sdpa_dense", ms=dense, speedup_vs_sdpa=1.0))
                for method, ms in (("multipole", 0.04), ("centroid_only", 0.03)):
                    ms *= batch**0.5
                    rows.append(dict(method=method, ms=ms, speedup_vs_sdpa=dense / ms))
                for row in rows[-3:]:
                    row.update(context=context, batch=batch, budget=budget, bytes=10**6)
    meta = dict(gpu="NVIDIA H100 80GB HBM3", utc="2026-11-23T16:12:44+00:00")
    return json.loads(json.dumps(dict(meta=meta, rows=rows)))  # as read from a report


def test_plot_writes_a_png_from_a_report_with_skipped_rows(tmp_path):
    path = tmp_path / "kernels.png"
    kernels.plot(synthetic_report(), str(path))
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_table_rows_of_skipped_and_timed_configurations():
    rows = synthetic_report()["rows"]
    lines = [kernels.format_row(r) for r in rows]
    assert sum("needs ~21 GiB" in line for line in lines) == 2
    assert all(line.split()[3] == "skipped" for line in lines if "needs" in line)
    assert "    1.00" in lines[0]  # sdpa_dense: speed-up 1


@pytest.mark.parametrize(
    "updates, profile_at, message",
    [
        (4, None, "updates: expected 5"),
        (64, None, "updates: expected 5 .* to 63"),
        (13, 0, "profile_at: expected 1..12 or -12..-1"),
        (13, 13, "profile_at: expected"),
        (13, -13, "got -13"),
    ],
)
def test_update_times_checks_its_arguments_before_using_the_gpu(updates, profile_at, message):
    with pytest.raises(ValueError, match=message):
        kernels.update_times(graphed=True, updates=updates, profile_at=profile_at)
