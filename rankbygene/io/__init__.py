"""Readers: spatial transcriptomics slides into AnnData (scanpy/squidpy layout), images lazily."""

from rankbygene.io._image import (
    ArrayImage,
    ImageReader,
    OpenSlideImage,
    PILImage,
    TiffImage,
    open_image,
)

__all__ = ["ArrayImage", "ImageReader", "OpenSlideImage", "PILImage", "TiffImage", "open_image"]
