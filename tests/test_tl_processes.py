"""Embedding a cohort in several processes: job-array shards and torch.distributed ranks."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import rankbygene as rbg
from rankbygene.io import write_pyramidal_tiff
from rankbygene.tl._processes import balance, resolve_shard

# ------------------------------------------------------------------------------ sharing out


def test_balance_evens_out_the_parts_largest_first():
    sizes = [10, 70, 20, 40, 30, 50, 60, 10]
    parts = balance(sizes, 3)
    assert sorted(i for part in parts for i in part) == list(range(len(sizes)))
    assert [sum(sizes[i] for i in part) for part in parts] == [100, 100, 90]
    for part in parts:
        assert [sizes[i] for i in part] == sorted((sizes[i] for i in part), reverse=True)
    assert balance(sizes, 3) == parts  # the same in every process that computes it
    # ties go to the item first in the cohort, and to the lower part
    assert balance([5, 5, 5], 2) == [[0, 2], [1]]
    assert balance([3, 1], 4) == [[0], [1], [], []]
    assert balance([], 2) == [[], []]


def test_resolve_shard_from_arguments():
    assert resolve_shard(None) == (0, 1)
    assert resolve_shard((2, 3)) == (2, 3)
    assert resolve_shard([0, 1]) == (0, 1)
    for bad in [(3, 3), (-1, 2), (0, 0), (1,), "slurm", 3]:
        with pytest.raises(ValueError, match="shard"):
            resolve_shard(bad)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        # sbatch --array=1-10
        (
            {
                "SLURM_ARRAY_TASK_ID": "5",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_COUNT": "10",
            },
            (4, 10),
        ),
        # sbatch --array=1-9:2 (tasks 1, 3, 5, 7, 9)
        (
            {
                "SLURM_ARRAY_TASK_ID": "7",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_COUNT": "5",
                "SLURM_ARRAY_TASK_STEP": "2",
            },
            (3, 5),
        ),
        # qsub -t 1-9:2 (Grid Engine)
        (
            {
                "SGE_TASK_ID": "3",
                "SGE_TASK_FIRST": "1",
                "SGE_TASK_LAST": "9",
                "SGE_TASK_STEPSIZE": "2",
            },
            (1, 5),
        ),
    ],
)
def test_resolve_shard_from_a_job_array(environ, expected):
    assert resolve_shard("array", environ) == expected


def test_resolve_shard_outside_or_in_odd_job_arrays():
    with pytest.raises(ValueError, match=r"SLURM_ARRAY_TASK_ID or SGE_TASK_ID.*shard=\(index"):
        resolve_shard("array", {"SGE_TASK_ID": "undefined"})
    # sbatch --array=0,4,9: ids are not a range, so the task cannot know its place
    listed = {
        "SLURM_ARRAY_TASK_ID": "9",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_COUNT": "3",
    }
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID=9 is not one of 3 tasks"):
        resolve_shard("array", listed)
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_COUNT"):
        resolve_shard("array", {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0"})


# ------------------------------------------------------------------------------ job arrays


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Five small slides of different sizes (file sizes 1:2:... apart)."""
    folder = tmp_path_factory.mktemp("cohort")
    paths = {}
    for seed, n_spots in enumerate([12, 30, 20, 16, 24]):
        section = rbg.datasets.synthetic(n_slides=1, n_spots=n_spots, n_genes=6, seed=seed)
        image = section.uns["spatial"]["slide_0"]["images"]["hires"]
        paths[f"s{seed}"] = write_pyramidal_tiff(folder / f"s{seed}.tif", image, mpp=1.0)
    return pd.Series(paths)


def _read_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_array_tasks_write_the_files_of_one_process(
    tmp_path, tiny_model, cohort, monkeypatch, caplog
):
    one = tmp_path / "one"
    reference = rbg.tl.embed_slides(tiny_model, cohort, one, tile_size_um=64, progress=False)
    assert (reference["status"] == "embedded").all()

    out = tmp_path / "array"
    out.mkdir()
    # temporary files of every slide, as tasks that are writing them leave them: each task
    # removes those of its own slides (left by a killed run of it), never another task's
    partials = {s: out / f".{s}.k2x_9qab.partial.h5ad" for s in cohort.index}
    for partial in partials.values():
        partial.touch()
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")  # sbatch --array=10-11
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    tables = []
    for task_id in ("10", "11"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task_id)
        tables.append(
            rbg.tl.embed_slides(
                tiny_model, cohort, out, tile_size_um=64, progress=False, shard="array"
            )
        )
        if task_id == "10":
            mine = set(tables[0].index)
            assert {s for s, p in partials.items() if p.exists()} == set(cohort.index) - mine
            with caplog.at_level(logging.WARNING, logger="rankbygene"):
                features = rbg.tl.slide_features(out)  # task 11 is still to run
            assert set(features.index) == mine
            unfinished = len(cohort) - len(mine)
            assert f"{unfinished} slides in {out} have no finished file" in caplog.text
    shares = [set(table.index) for table in tables]
    assert shares[0].isdisjoint(shares[1])
    assert shares[0] | shares[1] == set(cohort.index)
    assert (pd.concat(tables)["status"] == "embedded").all()
    # the largest file (s1) alone against the next ones: file sizes come out even
    sizes = {s: os.path.getsize(p) for s, p in cohort.items()}
    assert abs(sum(sizes[s] for s in shares[0]) - sum(sizes[s] for s in shares[1])) <= max(
        sizes.values()
    )
    assert _read_bytes(out) == _read_bytes(one)  # the same files, byte for byte

    # the same shares from the pairs, and nothing left to do
    again = rbg.tl.embed_slides(tiny_model, cohort, out, 64, progress=False, shard=(1, 2))
    assert set(again.index) == shares[1]
    assert (again["status"] == "skipped").all()
    whole = rbg.tl.embed_slides(tiny_model, cohort, out, tile_size_um=64, progress=False)
    assert (whole["status"] == "skipped").all()
    pd.testing.assert_frame_equal(rbg.tl.slide_features(out), rbg.tl.slide_features(one))

    # more tasks than slides: a task without slides writes nothing
    empty = rbg.tl.embed_slides(tiny_model, cohort, tmp_path / "none", 64, shard=(7, 8))
    assert empty.empty
    assert list(empty.columns) == ["path", "output", "n_tiles", "status", "error"]
    assert not any((tmp_path / "none").iterdir())


# ------------------------------------------------------------------------------ torchrun

#: One process of ``torchrun``: embeds the cohort; rank ``KILL_RANK`` (if set) is killed while
#: it writes its second slide, as a failed node would be. Then, in the same processes, a second
#: run, and a run with other settings, which must fail in every process. Rank 0 writes the
#: tables the runs return, each process the error it got.
TORCHRUN_WORKER = """
import os, signal, sys
import pandas as pd
from anndata import AnnData
import rankbygene as rbg

model_dir, cohort_csv, out, table = sys.argv[1:]
rbg.settings.verbosity = "info"  # each slide written is logged
model = rbg.RankByGene.load(model_dir)
if os.environ["RANK"] == os.environ.get("KILL_RANK"):
    write, written = AnnData.write_h5ad, []

    def killed_mid_write(self, filename, *args, **kwargs):
        written.append(filename)
        write(self, filename, *args, **kwargs)
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    AnnData.write_h5ad = killed_mid_write
cohort = pd.read_csv(cohort_csv, index_col="slide_id")
for run in ("first", "again"):
    done = rbg.tl.embed_slides(model, cohort["path"], out, tile_size_um=64, progress=False)
    if os.environ["RANK"] == "0":
        done.to_csv(f"{table}.{run}.csv")
try:
    rbg.tl.embed_slides(model, cohort["path"], out, tile_size_um=96, progress=False)
except ValueError as error:
    with open(f"{table}.error{os.environ['RANK']}.txt", "w") as handle:
        handle.write(str(error))
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX")
def test_torchrun_processes_write_the_files_of_one_process(tmp_path, tiny_model, caplog):
    """Two CPU processes under torchrun (gloo): a killed process's slides are embedded by the
    next run, nothing twice, and the files equal those of one process byte for byte."""
    cohort = rbg.datasets.synthetic_cohort(tmp_path / "slides", n_slides=6, n_spots=30)
    tiny_model.save(tmp_path / "model")
    one = tmp_path / "one"
    rbg.tl.embed_slides(tiny_model, cohort["path"], one, tile_size_um=64, progress=False)
    worker = tmp_path / "worker.py"
    worker.write_text(TORCHRUN_WORKER)
    out, table = tmp_path / "features", tmp_path / "table"

    def torchrun(**environ):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", "2", str(worker), str(tmp_path / "model")]
        command += [str(tmp_path / "slides" / "cohort.csv"), str(out), str(table)]
        return subprocess.run(
            command, env={**os.environ, **environ}, capture_output=True, text=True, timeout=600
        )

    def returned(run):
        return pd.read_csv(f"{table}.{run}.csv", index_col="slide_id")

    # a process killed mid-slide: torchrun stops the other, whatever it was doing
    failed = torchrun(KILL_RANK="1")
    assert failed.returncode != 0, failed.stderr[-3000:]
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("slide_*.h5ad")}
    left = [p.name for p in out.glob(".*.partial.h5ad")]
    assert 1 <= len(finished) < len(cohort)  # the killed process had finished one slide
    assert left  # the slide it was writing
    with caplog.at_level(logging.WARNING, logger="rankbygene"):
        assert len(rbg.tl.slide_features(out)) == len(finished)
    assert "have no finished file, only a temporary one" in caplog.text

    # the next run embeds what no process finished, and only that
    resumed = torchrun()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = returned("first")
    skipped = {f"{s}.h5ad" for s in done.index[done["status"] == "skipped"]}
    assert skipped == set(finished)
    assert (done["status"][done["status"] != "skipped"] == "embedded").all()
    logged = resumed.stderr + resumed.stdout
    written = re.findall(r"wrote \S+ \d+ tiles of slide '(\w+)'", logged)
    assert sorted(written) == sorted(done.index[done["status"] == "embedded"])  # each once
    assert {p: (out / p).stat().st_mtime_ns for p in finished} == finished  # not rewritten
    assert _read_bytes(out) == _read_bytes(one)  # no temporary file left; files byte-equal

    # a second run embeds nothing; other settings fail in every process before any work
    done = returned("again")
    assert (done["status"] == "skipped").all()
    for rank in (0, 1):
        error = (tmp_path / f"table.error{rank}.txt").read_text()
        assert f"6 slides in {out} were embedded with other settings" in error
    assert {p: (out / p).stat().st_mtime_ns for p in finished} == finished
    assert done["n_tiles"].tolist() == [
        rbg.tl.slide_features(one, method="attention")[s].shape[0] for s in done.index
    ]
    # slide features, MIL bags and survival read the folder as they read one process's
    pd.testing.assert_frame_equal(rbg.tl.slide_features(out), rbg.tl.slide_features(one))
    features = rbg.tl.slide_features(out)
    survival = rbg.tl.fit_survival(features, cohort["time"], cohort["event"], cv=2, refit=False)
    assert np.isfinite(survival.summary.loc["c_index", "mean"])
