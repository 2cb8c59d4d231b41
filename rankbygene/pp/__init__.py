"""Preprocessing: gene panel, normalisation and spatial smoothing of expression."""

from __future__ import annotations

from rankbygene.pp._genes import select_genes
from rankbygene.pp._normalize import normalize
from rankbygene.pp._smooth import smooth_expression
from rankbygene.pp._tile import tile_slide

__all__ = ["normalize", "select_genes", "smooth_expression", "tile_slide"]
