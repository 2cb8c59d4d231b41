"""The ``rankbygene`` command: the demo runs end to end and writes what it promises."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

from rankbygene.__main__ import main


def test_demo_writes_outputs(tmp_path):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "--epochs",
            "2",
            "--n-spots",
            "120",
            "--input-size",
            "32",
            "--batch-size",
            "32",
            "--no-progress",
        ]
    )
    assert code == 0
    for name in ("slide.png", "patches.png", "loss.png", "adata.h5ad", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out_library"] == "slide_2"
    # the packaged ImageNet encoder is part of the test extra, so the demo takes it
    assert (summary["image_encoder"], summary["pretrained"]) == ("tf_efficientnet_lite0", "package")
    assert np.isfinite(summary["heldout_pearson_trained"])
    assert np.isfinite(summary["heldout_pearson_untrained"])
    adata = ad.read_h5ad(out / "adata.h5ad")
    assert adata.obsm["X_rankbygene"].shape == (adata.n_obs, 128)
    assert adata.obsm["X_rankbygene_gene"].shape == (adata.n_obs, 128)
    assert not any(key.startswith("_scvi") for key in adata.uns)


def test_command_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "rankbygene", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0
    assert "--her2st" in result.stdout


def test_unknown_command_fails():
    with pytest.raises(SystemExit):
        main(["nonsense"])
