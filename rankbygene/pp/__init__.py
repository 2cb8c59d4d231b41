"""Preprocessing: gene panel, normalisation, spatial smoothing, square bins and slide tiles."""

from __future__ import annotations

from rankbygene.pp._bins import aggregate_bins
from rankbygene.pp._genes import select_genes
from rankbygene.pp._normalize import normalize
from rankbygene.pp._smooth import smooth_expression
from rankbygene.pp._tile import tile_slide

__all__ = ["aggregate_bins", "normalize", "select_genes", "smooth_expression", "tile_slide"]
