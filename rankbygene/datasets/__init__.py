"""Data sets: real spatial transcriptomics sections (downloaded on demand) and synthetic tissue."""

from rankbygene.datasets._cohort import synthetic_cohort
from rankbygene.datasets._her2st import (
    HER2ST_BASE_URL,
    HER2ST_GENES_URL,
    HER2ST_SECTIONS,
    her2st,
    her2st_genes,
)
from rankbygene.datasets._synthetic import synthetic
from rankbygene.datasets._visium_hd import synthetic_visium_hd

__all__ = [
    "HER2ST_BASE_URL",
    "HER2ST_GENES_URL",
    "HER2ST_SECTIONS",
    "her2st",
    "her2st_genes",
    "synthetic",
    "synthetic_cohort",
    "synthetic_visium_hd",
]
