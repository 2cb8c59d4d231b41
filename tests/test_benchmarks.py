"""The prepared benchmark scripts run end to end (on the CPU, with tiny settings)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "gpu.csv"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--cpu-smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    parts = {row["part"] for row in rows}
    assert parts == {"embedding", "training step", "ranking loss"}
    methods = [row["method"] for row in rows]
    assert any("bare forward" in m for m in methods)
    assert any("pipeline" in m for m in methods)
    assert {"full", "contrastive only", "regression"} <= set(methods)
    for row in rows:
        assert float(row["items_per_s"]) > 0
        assert float(row["peak_mb"]) > 0
    contrastive = next(row for row in rows if row["method"] == "contrastive only")
    assert float(contrastive["ratio"]) == 1.0
    assert "ratio" in done.stdout  # the printed table and its legend
