"""A synthetic cohort of whole-slide images with slide-level labels and survival.

Each slide is a synthetic H&E section (:func:`rankbygene.datasets.synthetic`) written as a
pyramidal TIFF; its label and survival time depend on the fraction of the slide covered by one
region type, so that slide-level models built on tile features can be checked end to end.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from rankbygene._logging import logger
from rankbygene.datasets._synthetic import synthetic
from rankbygene.datasets._tissue_render import REGION_TYPES
from rankbygene.io import write_pyramidal_tiff

__all__ = ["synthetic_cohort"]

#: Median survival (months) of a slide with the cohort's mean region fraction.
_MEDIAN_SURVIVAL = 24.0


def synthetic_cohort(
    path: str | Path,
    n_slides: int = 40,
    region: str = "tumor",
    n_spots: int = 150,
    n_regions: int = 4,
    log_hazard_ratio: float = 1.0,
    censoring: float = 0.3,
    stain_variation: float = 0.0,
    mpp: float = 1.0,
    compression: str | None = "zlib",
    seed: int = 0,
) -> pd.DataFrame:
    """Write a cohort of synthetic whole-slide images whose outcome follows their composition.

    Slide ``i`` is one synthetic H&E section (``synthetic(n_slides=1, ...)``, its own seed), its
    ``"hires"`` image written as a tiled pyramidal TIFF (levels as pages, halving down to 512
    px; resolution tags in pixels per centimetre, so readers find ``mpp``). Its outcome depends
    on ``f``, the fraction of the section covered by ``region`` (mean of the spots'
    ``obsm["region_fractions"]``), through ``z``, ``f`` standardised over the cohort:

    - ``label``: 1 when ``f`` is above the cohort's median, else 0 (balanced classes);
    - survival: an exponential time with hazard ``h0 * exp(log_hazard_ratio * z)`` (median 24
      months at ``z = 0``), censored by an independent exponential time that censors about
      ``censoring`` of the slides; ``time`` is the smaller of the two (months), ``event`` is 1
      when death was observed.

    Parameters
    ----------
    path
        Folder the slides and ``cohort.csv`` are written to (created if needed).
    n_slides
        Number of slides.
    region
        Region type whose fraction drives the outcome (one of ``"tumor"``, ``"stroma"``,
        ``"immune"``, ``"adipose"``, ``"necrosis"`` among the first ``n_regions``).
    n_spots
        Size of each section, in Visium-like spots (about 100 um apart; ``150`` gives about
        1400 x 1400 px).
    n_regions
        Region types drawn on the sections (see :func:`~rankbygene.datasets.synthetic`).
    log_hazard_ratio
        Log hazard ratio per standard deviation of the region fraction.
    censoring
        Approximate share of censored slides, in [0, 1).
    stain_variation
        Slide-to-slide staining differences on top of the renderer's own (as in a multi-centre
        cohort): each slide's optical densities are mixed by ``1 + N(0, stain_variation)`` and
        scaled by ``lognormal(0, stain_variation)``; 0 leaves the images as rendered.
    mpp
        Microns per pixel written in the files (the renderer draws about 1 um per pixel).
    compression
        TIFF compression of the tiles (``"zlib"``, lossless; ``"jpeg"``; ``None``).
    seed
        Random seed; the cohort is a deterministic function of all the arguments.

    Returns
    -------
    DataFrame indexed by ``slide_id`` with ``path`` (the TIFF), ``label``, ``time``, ``event``,
    ``<region>_fraction``, ``mpp``, ``width`` and ``height``; also written to
    ``path/cohort.csv``.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> cohort = rbg.datasets.synthetic_cohort("cohort/", n_slides=40)  # doctest: +SKIP
    >>> cohort[["label", "time", "event"]].head()  # doctest: +SKIP
    >>> tiles = rbg.pp.tile_slide(cohort["path"].iloc[0], tile_size_um=64)  # doctest: +SKIP
    """
    regions = REGION_TYPES[:n_regions] if 1 <= n_regions <= len(REGION_TYPES) else ()
    if region not in regions:
        raise ValueError(
            f"region must be one of the first n_regions={n_regions} region types {regions}; "
            f"got {region!r}."
        )
    if n_slides < 4:
        raise ValueError(f"n_slides must be at least 4; got {n_slides}.")
    if not 0.0 <= censoring < 1.0:
        raise ValueError(f"censoring must be in [0, 1); got {censoring}.")
    if not (math.isfinite(stain_variation) and stain_variation >= 0):
        raise ValueError(f"stain_variation must be non-negative; got {stain_variation}.")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be positive; got {mpp}.")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stain_rng = np.random.default_rng([seed, 1])  # its own stream: stains leave layouts alone
    column = regions.index(region)
    records = []
    for i in range(n_slides):
        slide_id = f"slide_{i:03d}"
        adata = synthetic(
            n_slides=1,
            n_spots=n_spots,
            n_genes=n_regions + 1,
            n_regions=n_regions,
            seed=int(rng.integers(2**31)),
        )
        image = adata.uns["spatial"]["slide_0"]["images"]["hires"]
        if stain_variation > 0:
            image = _restain(image, stain_variation, stain_rng)
        fraction = float(np.asarray(adata.obsm["region_fractions"])[:, column].mean())
        file = folder / f"{slide_id}.tif"
        write_pyramidal_tiff(file, image, mpp=mpp, compression=compression)
        records.append(
            {
                "slide_id": slide_id,
                "path": str(file),
                f"{region}_fraction": fraction,
                "width": image.shape[1],
                "height": image.shape[0],
            }
        )
    cohort = pd.DataFrame.from_records(records).set_index("slide_id")
    fraction = cohort[f"{region}_fraction"].to_numpy()
    z = (fraction - fraction.mean()) / (fraction.std() + 1e-12)
    cohort["label"] = (fraction > np.median(fraction)).astype(np.int64)
    hazard = math.log(2) / _MEDIAN_SURVIVAL * np.exp(log_hazard_ratio * z)
    death = rng.exponential(1.0 / hazard)
    if censoring > 0:
        censor_rate = math.log(2) / _MEDIAN_SURVIVAL * censoring / (1.0 - censoring)
        censor = rng.exponential(1.0 / censor_rate, n_slides)
    else:
        censor = np.full(n_slides, np.inf)
    cohort["time"] = np.maximum(np.round(np.minimum(death, censor), 1), 0.1)
    cohort["event"] = (death <= censor).astype(np.int64)
    cohort["mpp"] = float(mpp)
    cohort = cohort[
        ["path", "label", "time", "event", f"{region}_fraction", "mpp", "width", "height"]
    ]
    table = folder / "cohort.csv"
    cohort.to_csv(table)
    logger.info(
        f"wrote {n_slides} synthetic slides and {table}: "
        f"{int(cohort['label'].sum())} with label 1, {int(cohort['event'].sum())} events"
    )
    return cohort


def _restain(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """The slide as stained elsewhere: a random linear map of its optical densities.

    Optical density ``-log(I / 255)`` is mixed by ``1 + N(0, strength)`` per channel pair and
    scaled by a lognormal stain amount, so hue and intensity change while glass stays white.
    """
    mixing = np.eye(3) + rng.normal(0.0, strength, (3, 3))
    mixing *= rng.lognormal(0.0, strength)
    density = -np.log(np.maximum(image.astype(np.float32), 1.0) / 255.0)
    density = density @ mixing.astype(np.float32).T
    return np.clip(255.0 * np.exp(-np.maximum(density, 0.0)), 0, 255).astype(np.uint8)
