"""The prepared benchmark scripts run end to end (on the CPU, with tiny settings)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HER2ST, requires_her2st

REPO = Path(__file__).resolve().parents[1]


def _run_benchmark(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``benchmarks/<script>`` with ``args``; fail with its stderr when it fails."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_gpu_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "gpu.csv"
    done = _run_benchmark("gpu.py", "--cpu-smoke", "--out", str(out))
    rows = list(csv.DictReader(out.open()))
    parts = {row["part"] for row in rows}
    assert parts == {"embedding", "training step", "end-to-end training", "ranking loss"}
    methods = [row["method"] for row in rows]
    assert any("bare forward" in m for m in methods)
    assert any("pipeline" in m for m in methods)
    assert {"full", "contrastive only", "regression"} <= set(methods)
    for row in rows:
        assert float(row["items_per_s"]) > 0
        assert float(row["peak_mb"]) > 0
    contrastive = next(row for row in rows if row["method"] == "contrastive only")
    assert float(contrastive["ratio"]) == 1.0
    # model.train() against the bare step of the same module, defaults and without workers
    end_to_end = [row for row in rows if row["part"] == "end-to-end training"]
    assert [float(row["ratio"]) > 0 for row in end_to_end] == [True] * 8
    assert any("model.train(), defaults" in row["method"] for row in end_to_end)
    ranking = [row for row in rows if row["part"] == "ranking loss"]
    assert all(float(row["ratio"]) > 0 for row in ranking)  # over the recipe's step
    assert "ratio" in done.stdout  # the printed table and its legend


def test_gpu_benchmark_names_the_wheels_a_gpu_machine_needs():
    done = _run_benchmark("gpu.py", "--print-wheels", "download")
    pinned = dict(item.split("==") for item in done.stdout.split())
    assert {"anndata", "scanpy", "scvi-tools", "kornia"} <= set(pinned)
    assert all(version[0].isdigit() for version in pinned.values())


@pytest.mark.slow
def test_cohort_benchmark_smoke(tmp_path):
    """One process and two under torchrun (gloo), on a tiny cohort: same files, a speed each."""
    out = tmp_path / "cohort.csv"
    done = _run_benchmark("cohort.py", "--smoke", "--out", str(out))
    rows = list(csv.DictReader(out.open()))
    assert [(row["processes"], row["threads"]) for row in rows] == [("1", "1"), ("2", "1")]
    assert len({row["tiles"] for row in rows}) == 1
    assert all(row["same_files"] == "True" for row in rows)
    assert all(float(row["tiles_per_s"]) > 0 for row in rows)
    assert float(rows[0]["ratio"]) == 1.0
    assert "| 2 x 1 |" in done.stdout


@pytest.mark.slow
@requires_her2st
def test_her2st_benchmark_end_to_end(tmp_path):
    out = tmp_path / "her2st.csv"
    methods = ["rankbygene", "regression", "frozen_encoder", "encoder_and_statistics"]
    done = _run_benchmark(
        "her2st.py",
        *("--data", str(HER2ST), "--sections", "C2", "C3", "--seeds", "0"),
        *("--epochs", "2", "--views", "2", "--methods", *methods, "--out", str(out)),
        timeout=900,
    )
    rows = list(csv.DictReader(out.open()))
    assert {(row["method"], row["held_out"]) for row in rows} == {
        (method, section) for method in methods for section in ("C2", "C3")
    }
    for row in rows:
        assert -1.0 < float(row["pearson_panel"]) < 1.0
        assert float(row["alpha"]) > 0
    assert float(next(r for r in rows if r["method"] == "rankbygene")["train_seconds"]) > 0
    assert "panel differences" in done.stdout
    assert "encoder features" in done.stdout
