"""The command line and the demo behind it, on a small setting."""

from __future__ import annotations

import json

from multipole import MultipoleConfig
from multipole.cli import main
from multipole.demo import DemoSettings, format_table, run_demo


def test_info_prints_versions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "fused kernels" in out


def test_demo_compares_every_method_at_equal_bytes():
    settings = DemoSettings(
        context=1500,
        steps=40,
        num_kv_heads=2,
        num_q_heads=8,
        head_dim=32,
        read_fraction=0.3,
        device="cpu",
        config=MultipoleConfig(interval=32, block_size=256, sink_tokens=4),
    )
    report = run_demo(settings, progress=False)
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"dense", "multipole", "centroid_only", "quest", "oracle_topk", "window"}
    assert rows["dense"]["rel_error_max"] == 0 and rows["dense"]["read_fraction"] == 1
    for name, row in rows.items():
        if name != "dense":
            assert 0.2 < row["read_fraction"] <= 0.31, (name, row)
    assert rows["multipole"]["rel_error_mean"] < rows["window"]["rel_error_mean"]
    assert report["online_updates"] >= 1
    assert "multipole" in format_table(report)


def test_demo_command_writes_json(tmp_path, capsys):
    path = tmp_path / "demo.json"
    args = ["demo", "--context", "900", "--steps", "4", "--kv-heads", "1", "--q-heads", "2"]
    args += ["--head-dim", "16", "--interval", "32", "--block-size", "256", "--quiet"]
    args += ["--read-fraction", "0.4", "--json", str(path)]
    assert main(args) == 0
    assert "rel. error" in capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["settings"]["context"] == 900 and len(report["results"]) == 6
