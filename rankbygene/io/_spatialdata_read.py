"""SpatialData in: a table, its circles and their H&E image as the package's AnnData layout.

A SpatialData object keeps each element in its own (intrinsic) coordinates and maps them to shared
coordinate systems by transformations; the package wants spot centres in the pixels of the
full-resolution image. :func:`from_spatialdata` composes the two transformations (circles to a
shared coordinate system, and back into the image's pixels) and hands the image element's dask
array to the patch reader, so that pixels are read only where patches are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData
from PIL import Image

from rankbygene._image import as_rgb_uint8, is_lazy_array
from rankbygene._layout import spatial_entry
from rankbygene._layout._keys import (
    FULLRES_IMAGE_KEY,
    HIRES_IMAGE_KEY,
    LIBRARY_ID_KEY,
    METADATA_SPATIALDATA_IMAGE,
    METADATA_SPATIALDATA_SHAPES,
    METADATA_SPATIALDATA_TABLE,
    SCALEFACTOR_BIN_SIZE_UM,
    SCALEFACTOR_MPP,
    SPATIAL_KEY,
    SPATIALDATA_ATTRS_KEY,
)
from rankbygene._logging import logger
from rankbygene.io._spatialdata_elements import import_spatialdata, named_table, table_annotation

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["from_spatialdata", "library_ids"]

# Space Ranger and spatialdata-io name Visium HD bins by their side: square_008um, ...
_BIN_NAME = re.compile(r"square_(\d+)um")
_BIN_SUFFIX = re.compile(r"_?square_\d+um$")
# A quadrilateral whose perimeter^2 / area is within this of 16 is a square (16 is its minimum).
_SQUARE_TOLERANCE = 0.01


def from_spatialdata(
    sdata: SpatialData,
    table_key: str = "table",
    image_key: str | Mapping[str, str] | None = None,
    shapes_key: str | Sequence[str] | None = None,
    library_key: str = LIBRARY_ID_KEY,
    hires_size: int = 2000,
    bin_size_um: float | Mapping[str, float] | None = None,
) -> AnnData:
    """Read a SpatialData table, its circles and their image into the package's AnnData layout.

    Each circles element that the table annotates becomes one library, named after the section:
    the element's name without spatialdata-io's bin suffix (``"run1_square_008um"`` and
    ``"run1_square_016um"`` are both library ``"run1"``, so that one section read at two bin
    sizes has one id; elements that would share an id within one call keep their names). Its
    spot centres are transformed into the pixels of its full-resolution image
    (through a coordinate system both share) and stored in ``obsm["spatial"]``, the circles'
    diameter in the same pixels as ``spot_diameter_fullres``. Square polygons (Visium HD bins,
    as spatialdata-io reads them) are read as well: their centroid is the spot centre and their
    side the patch size. Where the bin size in microns is known (``bin_size_um``, or a
    ``square_008um``-style element or table name), it is recorded with the image's resolution as
    ``scalefactors["bin_size_um"]`` and ``["microns_per_pixel"]``, as Space Ranger writes them,
    for :func:`rankbygene.pp.aggregate_bins`. The image element's dask array
    (level 0 of a multiscale image) goes to ``uns["spatial"][library]["images"]["fullres"]``
    with scale factor 1, so that patches are read from it region by region; a thumbnail
    (``"hires"``, from the coarsest pyramid level that suffices) is computed for plotting.

    Parameters
    ----------
    sdata
        A :class:`spatialdata.SpatialData` object.
    table_key
        Table in ``sdata.tables`` with the counts; it must annotate circles elements (its
        ``region``, ``region_key`` and ``instance_key``, as ``TableModel.parse`` writes them).
    image_key
        Image element of every library, or a mapping from circles element to image element.
        ``None``: the sharpest image that shares a coordinate system with the circles (the
        one with the most pixels per circles unit).
    shapes_key
        Circles or square-polygon element(s) to read, among those the table annotates;
        ``None``: all of them.
    library_key
        ``obs`` column written with each spot's library (the section's name).
    hires_size
        Longest side of the ``"hires"`` thumbnail, in pixels.
    bin_size_um
        Side of the bins in microns (one for all elements, or per shapes element); ``None``:
        read from an element or table name holding ``square_<n>um``, else not recorded.

    Returns
    -------
    A copy of the table's rows of the chosen elements (``X``, layers, ``obs``, ``var`` as in
    the table) with ``obsm["spatial"]``, ``obs[library_key]`` and ``uns["spatial"]``; each
    library's ``metadata`` names the table, shapes and image elements it came from.

    Raises
    ------
    KeyError
        The table, an element, or the table's region/instance key is missing, or a table row
        names a circle that the element lacks.
    ValueError
        An element is neither circles nor squares, an image has neither 1, 3 nor 4 channels, no
        coordinate system links the shapes and the image, or the image is ambiguous.

    Examples
    --------
    >>> import spatialdata as sd  # doctest: +SKIP
    >>> import rankbygene as rbg  # doctest: +SKIP
    >>> sdata = sd.read_zarr("visium.zarr")  # doctest: +SKIP
    >>> adata = rbg.io.from_spatialdata(sdata, table_key="table")  # doctest: +SKIP
    >>> rbg.RankByGene.setup_anndata(adata, library_key="library_id")  # doctest: +SKIP

    Visium HD, as spatialdata-io reads it (one table per bin size):

    >>> import rankbygene as rbg
    >>> sdata = rbg.datasets.synthetic_visium_hd(size_um=400, bin_sizes_um=(8, 16))
    >>> bins = rbg.io.from_spatialdata(sdata, table_key="square_016um")
    >>> bins.uns["spatial"]["synthetic_hd"]["scalefactors"]["bin_size_um"]
    16.0
    """
    import_spatialdata()
    if int(hires_size) < 1:
        raise ValueError(f"hires_size must be a positive int; got {hires_size!r}.")
    table = named_table(sdata, table_key)
    regions, region_key, instance_key = table_annotation(table, table_key)
    libraries = _chosen_shapes(sdata, table_key, regions, shapes_key)
    ids = library_ids(libraries)
    obs_region = table.obs[region_key].astype(str).to_numpy()
    keep = np.isin(obs_region, libraries)
    coords = np.zeros((table.n_obs, 2), dtype=np.float64)
    spatial: dict[str, Any] = {}
    thumbnails: dict[str, tuple[np.ndarray, float]] = {}  # an image shared by several libraries
    for library in libraries:
        shapes = sdata.shapes[library]
        centres, sizes = _centres_and_sizes(shapes, library)
        image_name = _chosen_image(sdata, library, image_key)
        image = sdata.images[image_name]
        affine = _shapes_to_pixels(sdata, library, image_name)
        rows = np.flatnonzero(obs_region == library)
        positions = _instance_positions(shapes, table.obs[instance_key].to_numpy()[rows], library)
        coords[rows] = centres[positions] @ affine[:2, :2].T + affine[:2, 2]
        # a circle stays a circle only under similarity transforms; sqrt|det| keeps its area
        pixels_per_unit = float(np.sqrt(abs(np.linalg.det(affine[:2, :2]))))
        diameter = _diameter(sizes[positions] * pixels_per_unit, library)
        bin_size = _bin_size(bin_size_um, library, table_key)
        levels = _levels(image, image_name)
        if image_name not in thumbnails:
            thumbnails[image_name] = _thumbnail(levels, hires_size)
        hires, scale = thumbnails[image_name]
        spatial[ids[library]] = spatial_entry(
            {HIRES_IMAGE_KEY: (hires, scale), FULLRES_IMAGE_KEY: (levels[0], 1.0)},
            diameter,
            metadata={
                METADATA_SPATIALDATA_TABLE: table_key,
                METADATA_SPATIALDATA_SHAPES: library,
                METADATA_SPATIALDATA_IMAGE: image_name,
            },
            scalefactors=None if bin_size is None else _bin_scalefactors(bin_size, diameter),
        )
        logger.info(
            "library %r (shapes %r): %d spots, image %r (%d x %d pixels), spot diameter %.1f "
            "pixels%s",
            ids[library],
            library,
            len(rows),
            image_name,
            levels[0].shape[1],
            levels[0].shape[0],
            diameter,
            "" if bin_size is None else f" ({bin_size:g} um bins, {bin_size / diameter:.3f} um/px)",
        )
    adata = table[keep].copy()
    adata.obsm[SPATIAL_KEY] = coords[keep]
    adata.obs[library_key] = pd.Categorical(
        pd.Series(obs_region[keep]).map(ids).to_numpy(),
        categories=list(dict.fromkeys(ids.values())),
    )
    adata.uns[SPATIAL_KEY] = spatial
    attrs = dict(adata.uns.get(SPATIALDATA_ATTRS_KEY, {}))
    attrs["region"] = libraries if len(libraries) > 1 else libraries[0]
    adata.uns[SPATIALDATA_ATTRS_KEY] = attrs
    return adata


def library_ids(elements: Sequence[str]) -> dict[str, str]:
    """The library id of each shapes element: the section's name, without the bin suffix.

    spatialdata-io names Visium HD bins ``<dataset>_square_<n>um``; the library is the
    dataset, the same at every bin size. Elements that would share an id keep their names.

    Examples
    --------
    >>> library_ids(["run1_square_008um"])
    {'run1_square_008um': 'run1'}
    >>> library_ids(["run1_square_008um", "run1_square_016um"])
    {'run1_square_008um': 'run1_square_008um', 'run1_square_016um': 'run1_square_016um'}
    """
    ids = {name: _BIN_SUFFIX.sub("", name) or name for name in elements}
    if len(set(ids.values())) < len(ids):
        logger.info("shapes %s are of one section: libraries keep the element names", elements)
        return {name: name for name in elements}
    return ids


def _chosen_shapes(
    sdata: SpatialData, table_key: str, regions: list[str], shapes_key: str | Sequence[str] | None
) -> list[str]:
    if shapes_key is None:
        chosen = [region for region in regions if region in sdata.shapes]
        if not chosen:
            raise KeyError(
                f"Table {table_key!r} annotates {regions}, none of them a shapes element of sdata "
                f"(shapes: {list(sdata.shapes)})."
            )
        skipped = [region for region in regions if region not in chosen]
        if skipped:
            logger.info("table %r: skipping %s, which are no shapes elements", table_key, skipped)
        return chosen
    chosen = [shapes_key] if isinstance(shapes_key, str) else [str(s) for s in shapes_key]
    for name in chosen:
        if name not in sdata.shapes:
            raise KeyError(f"sdata has no shapes element {name!r} (shapes: {list(sdata.shapes)}).")
        if name not in regions:
            raise KeyError(
                f"Table {table_key!r} does not annotate shapes {name!r} (it annotates {regions})."
            )
    return chosen


def _centres_and_sizes(shapes: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``(n, 2)`` and sizes (circle diameter or square side) of a shapes element."""
    import shapely

    if not shapes.index.is_unique:
        raise ValueError(f"Shapes {name!r} have repeated index values: spots cannot be matched.")
    types = set(shapes.geometry.geom_type.unique())
    if types == {"Point"} and "radius" in shapes.columns:
        centres = np.column_stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()])
        return centres, 2 * shapes["radius"].to_numpy(dtype=np.float64)
    if types == {"Polygon"}:
        geometry = shapes.geometry.to_numpy()
        area = shapely.area(geometry)
        # the square minimises perimeter^2 / area (16) among quadrilaterals: any rotation passes
        ratio = np.divide(shapely.length(geometry) ** 2, 16 * area, where=area > 0, out=area * 0)
        corners = shapely.get_num_coordinates(geometry) == 5  # closed ring of 4 corners, no holes
        squares = corners & (np.abs(ratio - 1) <= _SQUARE_TOLERANCE)
        if squares.all():
            centroids = shapely.centroid(geometry)
            centres = np.column_stack([shapely.get_x(centroids), shapely.get_y(centroids)])
            return centres, np.sqrt(area)
        raise ValueError(
            f"Shapes {name!r} are polygons, {int((~squares).sum())} of them not squares: spots "
            "need circles (points with a 'radius' column) or square bins."
        )
    raise ValueError(
        f"Shapes {name!r} are neither circles nor squares (geometry {sorted(types)}, columns "
        f"{list(shapes.columns)}): spots need points with a 'radius' column or square polygons "
        "(spatialdata.to_circles makes circles from other polygons)."
    )


def _bin_size(
    bin_size_um: float | Mapping[str, float] | None, library: str, table_key: str
) -> float | None:
    """The library's bin side in microns: given, or read from a ``square_<n>um`` name."""
    if isinstance(bin_size_um, Mapping):
        bin_size_um = bin_size_um.get(library)
    if bin_size_um is not None:
        if not float(bin_size_um) > 0:
            raise ValueError(f"bin_size_um must be positive; got {bin_size_um!r} for {library!r}.")
        return float(bin_size_um)
    for name in (library, table_key):
        found = _BIN_NAME.search(name)
        if found:
            return float(found.group(1))
    return None


def _bin_scalefactors(bin_size: float, diameter: float) -> dict[str, float]:
    return {SCALEFACTOR_BIN_SIZE_UM: bin_size, SCALEFACTOR_MPP: bin_size / diameter}


def _chosen_image(
    sdata: SpatialData, library: str, image_key: str | Mapping[str, str] | None
) -> str:
    if isinstance(image_key, Mapping):
        if library not in image_key:
            raise KeyError(
                f"image_key has no image for shapes {library!r} (keys: {list(image_key)})."
            )
        image_key = image_key[library]
    if image_key is not None:
        if image_key not in sdata.images:
            raise KeyError(
                f"sdata has no image element {image_key!r} (images: {list(sdata.images)})."
            )
        return str(image_key)
    from spatialdata.transformations import get_transformation

    systems = set(get_transformation(sdata.shapes[library], get_all=True))
    candidates = {}
    for name, image in sdata.images.items():
        if not systems & set(get_transformation(image, get_all=True)):
            continue
        affine = _shapes_to_pixels(sdata, library, name)
        candidates[name] = abs(float(np.linalg.det(affine[:2, :2])))
    if not candidates:
        raise KeyError(
            f"No image element shares a coordinate system with shapes {library!r} (its systems: "
            f"{sorted(systems)}; images: {list(sdata.images)}): pass image_key."
        )
    best = max(candidates.values())
    sharpest = [name for name, det in candidates.items() if np.isclose(det, best, rtol=1e-6)]
    if len(sharpest) > 1:
        raise ValueError(
            f"Images {sharpest} are equally sharp for shapes {library!r}: pass image_key "
            "(a name, or a mapping from shapes to image)."
        )
    if len(candidates) > 1:
        logger.info(
            "shapes %r: image %r, the sharpest of %s", library, sharpest[0], sorted(candidates)
        )
    return sharpest[0]


def _shapes_to_pixels(sdata: SpatialData, shapes_name: str, image_name: str) -> np.ndarray:
    """3 x 3 affine matrix from the circles' coordinates to the image's level-0 pixels (x, y)."""
    from spatialdata.transformations import (
        get_transformation,
        get_transformation_between_coordinate_systems,
    )

    def matrix(transformation: Any) -> np.ndarray:
        xy = ("x", "y")
        return np.asarray(transformation.to_affine_matrix(input_axes=xy, output_axes=xy), float)

    shapes, image = sdata.shapes[shapes_name], sdata.images[image_name]
    to_systems = get_transformation(shapes, get_all=True)
    image_to_systems = get_transformation(image, get_all=True)
    shared = sorted(set(to_systems) & set(image_to_systems))
    if shared:
        # through a coordinate system both share: spatialdata's path search refuses the several
        # equal paths of spatialdata-io's Visium HD objects (full and downscaled systems)
        inverse = np.linalg.pinv(matrix(image_to_systems[shared[0]]))
        affine = inverse @ matrix(to_systems[shared[0]])
    else:
        try:
            transformation = get_transformation_between_coordinate_systems(sdata, shapes, image)
        except Exception as err:  # networkx and spatialdata raise several types for "no path"
            raise ValueError(
                f"No coordinate system links shapes {shapes_name!r} and image {image_name!r}: {err}"
            ) from err
        affine = matrix(transformation)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:2, :2])) == 0:
        raise ValueError(
            f"The transformation from shapes {shapes_name!r} to image {image_name!r} is singular."
        )
    return affine


def _instance_positions(shapes: Any, instances: np.ndarray, library: str) -> np.ndarray:
    """Row of each table instance id in the circles element."""
    positions = shapes.index.get_indexer(instances)
    if (positions < 0).any():  # ids stored as strings on one side, numbers on the other
        as_str = pd.Index(shapes.index.astype(str)).get_indexer(pd.Index(instances).astype(str))
        positions = np.where(positions < 0, as_str, positions)
    missing = positions < 0
    if missing.any():
        raise KeyError(
            f"{int(missing.sum())} table rows of region {library!r} name circles that shapes "
            f"{library!r} lacks (first ids: {instances[missing][:3].tolist()})."
        )
    return positions


def _diameter(diameters: np.ndarray, library: str) -> float:
    diameters = diameters[np.isfinite(diameters) & (diameters > 0)]
    if not len(diameters):
        raise ValueError(f"Shapes {library!r} have no positive radius: the patch size needs one.")
    diameter = float(np.median(diameters))
    if np.ptp(diameters) > 0.01 * diameter:
        logger.warning(
            "shapes %r: circle diameters range %.1f-%.1f pixels; patches use the median, %.1f",
            library,
            diameters.min(),
            diameters.max(),
            diameter,
        )
    return diameter


def _levels(image: Any, name: str) -> list[Any]:
    """Pyramid levels as lazy ``(y, x, c)`` arrays, finest first."""
    from spatialdata import get_pyramid_levels

    arrays = get_pyramid_levels(image) if hasattr(image, "children") else [image]
    if "c" in arrays[0].dims and arrays[0].sizes["c"] not in (1, 3, 4):
        raise ValueError(
            f"Image {name!r} has {arrays[0].sizes['c']} channels; H&E needs 1, 3 or 4."
        )
    order = ("y", "x", "c") if "c" in arrays[0].dims else ("y", "x")
    # transposing a dask-backed DataArray is lazy: no pixel is read here
    return [array.transpose(*order).data for array in arrays]


def _thumbnail(levels: list[Any], max_side: int) -> tuple[np.ndarray, float]:
    """A ``(H, W, 3)`` uint8 thumbnail and its scale, read from the coarsest level that suffices."""
    import dask.array as da

    height, width = (int(s) for s in levels[0].shape[:2])
    scale = min(1.0, max_side / max(height, width))
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    level = next(
        (lvl for lvl in reversed(levels) if lvl.shape[0] >= out_h and lvl.shape[1] >= out_w),
        levels[0],
    )
    level_h, level_w = (int(s) for s in level.shape[:2])
    array = level if is_lazy_array(level) else np.asarray(level)
    factor = max(1, min(level_h // out_h, level_w // out_w))
    if factor > 1:
        # block means chunk by chunk, so that a level much larger than memory is never held
        array = da.asarray(array)
        pad = [(0, -level_h % factor), (0, -level_w % factor)] + [(0, 0)] * (array.ndim - 2)
        array = da.pad(array, pad, mode="edge")
        array = da.coarsen(np.mean, array, {0: factor, 1: factor})
        if np.issubdtype(level.dtype, np.integer):
            array = da.round(array)
        array = array.astype(level.dtype)
    small = as_rgb_uint8(np.asarray(array), name="thumbnail")
    # the padded edge is left out: the box is the level's own extent, in block units
    box = (0.0, 0.0, level_w / factor, level_h / factor)
    resized = Image.fromarray(np.ascontiguousarray(small)).resize(
        (out_w, out_h), Image.Resampling.BILINEAR, box=box
    )
    return np.asarray(resized), float(scale)
