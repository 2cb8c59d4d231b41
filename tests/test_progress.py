"""Quiet by default: progress bars on stderr only for long work, once where output is stored."""

from __future__ import annotations

import logging

import pytest
import scvi

import rankbygene as rbg
from rankbygene import _progress
from rankbygene._progress import FinalLineTqdm, progress_bar


def test_short_work_shows_no_bar(capsys):
    assert sum(progress_bar(range(100), desc="quick")) == 4950
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""


def test_long_work_on_a_stored_stream_is_one_line_on_stderr(capsys):
    # capsys' stderr is no terminal, as a file, a pipe or a notebook without ipywidgets
    bar = progress_bar(total=50, desc="long", delay=0)
    assert isinstance(bar, FinalLineTqdm)
    for _ in range(50):
        bar.update()
        bar.set_postfix(loss=1.0)
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("long") == 1  # one frame, the final state
    assert "50/50" in captured.err
    assert captured.err.count("\r") <= 1


def test_notebook_without_ipywidgets_gets_plain_bars(monkeypatch):
    # tqdm.auto's widget would print "IProgress not found" and fall back to redrawn text
    monkeypatch.setattr(_progress, "_in_jupyter", lambda: True)
    monkeypatch.setattr(_progress.importlib.util, "find_spec", lambda name: None)
    assert isinstance(progress_bar(range(2)), FinalLineTqdm)


def test_terminal_gets_a_live_bar_on_stderr(monkeypatch):
    class Terminal:
        def isatty(self):
            return True

        def write(self, text):
            pass

        def flush(self):
            pass

    monkeypatch.setattr(_progress.sys, "stderr", Terminal())
    bar = progress_bar(range(2))
    assert type(bar) is _progress.std_tqdm  # redrawn as work goes, not FinalLineTqdm


def _small():
    adata = rbg.datasets.synthetic(n_slides=2, n_spots=40, n_genes=10, seed=2)
    return adata


def test_setup_and_load_keep_scvi_info_lines_below_the_verbosity(tmp_path, capsys, caplog):
    adata = _small()
    rbg.RankByGene.setup_anndata(adata, layer="counts")
    model = rbg.RankByGene(adata, image_encoder="resnet18", input_size=32, n_latent=8)
    model.save(tmp_path / "model")
    rbg.RankByGene.load(tmp_path / "model", adata=adata)
    model.get_gene_representation(_small())  # a new AnnData set up from the registry
    captured = capsys.readouterr()
    for line in ("Generating sequential column names", "already downloaded"):
        assert line not in captured.out + captured.err
    assert scvi.settings.verbosity == logging.INFO  # scvi-tools' own setting is left alone
    rbg.settings.verbosity = "info"
    try:
        with caplog.at_level(logging.INFO, logger="scvi"):
            rbg.RankByGene.setup_anndata(_small(), layer="counts")
        assert "Generating sequential column names" in caplog.text
    finally:
        rbg.settings.verbosity = "warning"


def test_training_bar_goes_to_stderr_once(capsys):
    adata = _small()
    rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
    model = rbg.RankByGene(adata, image_encoder="resnet18", input_size=32, n_latent=8)
    model.train(max_epochs=2, batch_size=32)
    captured = capsys.readouterr()
    assert "Epoch" not in captured.out
    assert "%|" not in captured.out
    assert captured.err.count("Epoch ") <= 1
    assert len(model.history["train_loss"]) == 2  # the bar's callback left training alone


def test_lightning_bar_is_still_there_on_request():
    adata = _small()
    rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
    model = rbg.RankByGene(adata, image_encoder="resnet18", input_size=32, n_latent=8)
    model.train(max_epochs=1, batch_size=32, simple_progress_bar=False)
    from rankbygene.model._runner import EpochProgressBar

    bar = model.trainer.progress_bar_callback  # Lightning's own (rich or tqdm), as in scvi-tools
    assert bar is not None
    assert not isinstance(bar, EpochProgressBar)


@pytest.mark.parametrize("enable", [True, False])
def test_progress_bar_follows_enable_progress_bar(enable):
    from rankbygene.model._runner import EpochProgressBar, RankByGeneTrainRunner

    adata = _small()
    rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
    model = rbg.RankByGene(adata, image_encoder="resnet18", input_size=32, n_latent=8)
    assert model._train_runner_cls is RankByGeneTrainRunner
    model.train(max_epochs=1, batch_size=32, enable_progress_bar=enable)
    bars = [c for c in model.trainer.callbacks if isinstance(c, EpochProgressBar)]
    assert len(bars) == (1 if enable else 0)
