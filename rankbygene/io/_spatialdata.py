"""SpatialData in and out: a table, its circles and their H&E image as the package's AnnData layout,
and embeddings and predictions written back into a SpatialData table.

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

from rankbygene._constants import (
    FULLRES_IMAGE_KEY,
    GENE_EMBEDDING_KEY,
    HIRES_IMAGE_KEY,
    IMAGE_EMBEDDING_KEY,
    IMAGES_KEY,
    LIBRARY_ID_KEY,
    METADATA_SPATIALDATA_IMAGE,
    METADATA_SPATIALDATA_SHAPES,
    METADATA_SPATIALDATA_TABLE,
    PATCH_STATISTICS_KEY,
    PREDICTED_LAYER_KEY,
    RANK_CONSISTENCY_KEY,
    SCALEFACTOR_BIN_SIZE_UM,
    SCALEFACTOR_MPP,
    SCALEFACTOR_SPOT_DIAMETER,
    SCALEFACTORS_KEY,
    SPATIAL_KEY,
    SPATIALDATA_ATTRS_KEY,
    UNS_KEY,
)
from rankbygene._docs import d
from rankbygene._image import as_rgb_uint8, is_lazy_array
from rankbygene._layout import (
    image_scales,
    resolve_library_key,
    spatial_coordinates,
    spatial_entry,
    spot_libraries,
)
from rankbygene._logging import logger

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["from_spatialdata", "to_spatialdata"]

#: What :func:`to_spatialdata` writes by default, where ``adata`` has it: the package's outputs.
DEFAULT_KEYS = (
    IMAGE_EMBEDDING_KEY,
    GENE_EMBEDDING_KEY,
    PREDICTED_LAYER_KEY,
    PATCH_STATISTICS_KEY,
    RANK_CONSISTENCY_KEY,
)
# Space Ranger and spatialdata-io name Visium HD bins by their side: square_008um, ...
_BIN_NAME = re.compile(r"square_(\d+)um")
_BIN_SUFFIX = re.compile(r"_?square_\d+um$")
#: Chunk side of the images to_spatialdata writes, and the long side of their coarsest level.
IMAGE_CHUNK_PX = 1024
# A quadrilateral whose perimeter^2 / area is within this of 16 is a square (16 is its minimum).
_SQUARE_TOLERANCE = 0.01


def _import_spatialdata() -> Any:
    try:
        import spatialdata
    except ImportError as err:
        raise ImportError(
            "SpatialData input and output need the spatialdata package: pip install spatialdata."
        ) from err
    return spatialdata


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
    _import_spatialdata()
    if int(hires_size) < 1:
        raise ValueError(f"hires_size must be a positive int; got {hires_size!r}.")
    table = _table(sdata, table_key)
    regions, region_key, instance_key = _table_attrs(table, table_key)
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


@d.dedent
def to_spatialdata(
    adata: AnnData,
    sdata: SpatialData | None = None,
    table_key: str = "table",
    keys: Sequence[str] | None = None,
    predicted_table_key: str | None = None,
    library_key: str | None = None,
    instance_key: str = "spot_id",
    key_added: str | None = None,
    write: bool = False,
) -> SpatialData:
    """Put embeddings and predicted expression where squidpy and spatialdata-plot find them.

    With ``sdata`` (e.g. the object :func:`from_spatialdata` read), ``adata``'s rows are matched
    to the table's by the table's region and instance keys (else by ``obs_names``) and ``keys``
    are written into the table in place: ``obsm`` entries as ``obsm``, ``obs`` columns as
    ``obs``, and a layer as a layer when ``adata`` has the table's genes. A layer over other
    genes (a prediction over the model's panel) goes to a new table, ``predicted_table_key``,
    annotating the same circles, its values in ``X`` and in the layer. ``uns["rankbygene"]``
    (what produced the results) is copied. Table rows that ``adata`` lacks get NaN.

    Without ``sdata``, a new object is built from ``adata``'s layout: per library, a circles
    element named after the library (centres ``obsm["spatial"]``, radius half of
    ``spot_diameter_fullres``) and an image element (the lazy ``"fullres"`` image when there
    is one, else the sharpest in-memory image, scaled back to full-resolution pixels), both in
    the coordinate system ``"global"`` (one library) or named after each library; and the whole
    ``adata`` as the table annotating the circles. Each image is written as a multiscale
    image (halving down to 1024 px on the long side, in 1024 px chunks), as whole-slide images
    are kept on disk and read by viewers.

    **Saving into a zarr store.** spatialdata does not overwrite an element in the store an
    object was read from, so results join a disk-backed object as a new table:
    ``key_added`` writes them there (annotating the same shapes, the table itself unchanged),
    and ``write=True`` adds that table to the store (``sdata.write_element``; a table of that
    name written by an earlier run is replaced)::

        sdata = sd.read_zarr("run.zarr")
        adata = rbg.io.from_spatialdata(sdata, table_key="square_016um")
        model.predict_expression(adata)
        rbg.io.to_spatialdata(
            adata, sdata, table_key="square_016um", key_added="rankbygene", write=True
        )
        sd.read_zarr("run.zarr")["rankbygene"]  # the prediction, with the table's region keys

    Parameters
    ----------
    adata
        AnnData in the package's layout, with the results.
    sdata
        SpatialData to write into (in place), or ``None`` for a new one.
    table_key
        Table of ``sdata`` to write into, or the name of the new object's table.
    keys
        ``obsm`` keys, layers and ``obs`` columns of ``adata`` to write (looked up in that
        order). ``None``: those of the package's outputs that ``adata`` has
        (``X_rankbygene``, ``X_rankbygene_gene``, ``rankbygene_predicted``,
        ``X_patch_statistics``, ``rank_consistency``).
    predicted_table_key
        Table for layers over genes other than the table's; default
        ``"<table_key>_rankbygene"``.
    %(library_key)s
        For a new object only. Library ids name its elements, so spatialdata's rule for names
        applies: letters, digits, ``_``, ``-`` and ``.``, not starting with ``__``.
    instance_key
        ``obs`` column of circle ids written to the new object's table.
    key_added
        Write every result into a new table of this name (rows matched as for ``table_key``,
        annotating the same shapes) instead of into ``table_key``, which stays as it was.
    write
        Also write the new tables into ``sdata``'s zarr store (``sdata.write_element``). Needs a
        disk-backed ``sdata`` and results that go to new tables (``key_added``, or layers over
        other genes): spatialdata does not overwrite ``table_key`` in its own store.

    Returns
    -------
    ``sdata``, written into, or the new SpatialData.

    Raises
    ------
    KeyError
        The table, or a key of ``keys``, is missing.
    ValueError
        Rows of ``adata`` match no row of the table; a library id or table name that
        spatialdata refuses as an element name (the error names it); ``write=True`` without a
        zarr store or with results for ``table_key`` itself. Raised before anything is
        changed.

    Examples
    --------
    >>> adata = rbg.io.from_spatialdata(sdata)  # doctest: +SKIP
    >>> adata.obsm["X_rankbygene"] = model.get_image_representation(adata)  # doctest: +SKIP
    >>> model.predict_expression(adata)  # doctest: +SKIP
    >>> rbg.io.to_spatialdata(adata, sdata)  # doctest: +SKIP
    >>> import spatialdata_plot  # doctest: +SKIP
    >>> sdata.pl.render_shapes(  # doctest: +SKIP
    ...     color="ERBB2", table_layer="rankbygene_predicted"
    ... ).pl.show()
    """
    _import_spatialdata()
    explicit = keys is not None
    keys = list(DEFAULT_KEYS if keys is None else keys)
    found = {key: _where(adata, key) for key in keys}
    missing = [key for key, where in found.items() if where is None]
    if explicit and missing:
        raise KeyError(
            f"adata has no {missing} in obsm, layers or obs (obsm: {list(adata.obsm)}, "
            f"layers: {list(adata.layers)})."
        )
    found = {key: where for key, where in found.items() if where is not None}
    if sdata is None:
        if write:
            raise ValueError(
                "write=True writes into the zarr store of sdata; a new object has none: save it "
                "with sdata.write(path)."
            )
        return _new_spatialdata(adata, found, table_key, library_key, instance_key)
    _check_element_names([n for n in (key_added, predicted_table_key) if n is not None], "table")
    if write:
        _check_writable(adata, sdata, found, table_key, key_added)
    new_tables = _write_into(adata, sdata, found, table_key, predicted_table_key, key_added)
    if write:
        _write_tables(sdata, new_tables)
    return sdata


def _check_writable(
    adata: AnnData, sdata: SpatialData, found: dict[str, str], table_key: str, key_added: str | None
) -> None:
    """write=True: a zarr store, and nothing for the table that spatialdata cannot overwrite."""
    if sdata.path is None:
        raise ValueError(
            "write=True writes into sdata's zarr store, and sdata has none (sdata.path is None): "
            "save it first with sdata.write(path)."
        )
    if key_added is not None:
        return
    table = _table(sdata, table_key)
    same_genes = set(adata.var_names) == set(table.var_names) and adata.n_vars == table.n_vars
    into_table = [k for k, w in found.items() if w != "layers" or same_genes]
    if into_table:
        raise ValueError(
            f"{into_table} would go into table {table_key!r}, which spatialdata does not "
            "overwrite in its own store: pass key_added, a new table for the results."
        )


def _write_tables(sdata: SpatialData, names: list[str]) -> None:
    """Add new tables to sdata's zarr store, replacing tables of those names written before."""
    import warnings

    on_disk = set(sdata.elements_paths_on_disk())
    with warnings.catch_warnings():
        # zarr announces a default of its next release on every write; nothing to act on
        warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
        for name in names:
            if f"tables/{name}" in on_disk:
                sdata.delete_element_from_disk(name)  # a table this function wrote before
            sdata.write_element(name)
    logger.info("wrote tables %s to %s", names, sdata.path)


# ---------------------------------------------------------------------------- reading


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


def _table(sdata: SpatialData, table_key: str) -> AnnData:
    if table_key not in sdata.tables:
        raise KeyError(
            f"sdata has no table {table_key!r} (tables: {list(sdata.tables)}): pass table_key."
        )
    return sdata.tables[table_key]


def _table_attrs(table: AnnData, table_key: str) -> tuple[list[str], str, str]:
    """The elements the table annotates, and the ``obs`` columns naming them and their rows."""
    attrs = table.uns.get(SPATIALDATA_ATTRS_KEY) or {}
    regions, region_key = attrs.get("region"), attrs.get("region_key")
    instance_key = attrs.get("instance_key")
    if regions is None or region_key is None or instance_key is None:
        raise KeyError(
            f"Table {table_key!r} annotates no element: its uns[{SPATIALDATA_ATTRS_KEY!r}] lacks "
            "'region', 'region_key' or 'instance_key' (set them with "
            "spatialdata.models.TableModel.parse(table, region=..., region_key=..., "
            "instance_key=...))."
        )
    for key in (region_key, instance_key):
        if key not in table.obs:
            raise KeyError(
                f"Table {table_key!r} has no obs column {key!r}, which its "
                f"uns[{SPATIALDATA_ATTRS_KEY!r}] names (columns: {list(table.obs.columns)})."
            )
    regions = [regions] if isinstance(regions, str) else [str(r) for r in regions]
    return regions, str(region_key), str(instance_key)


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


# ---------------------------------------------------------------------------- writing


def _where(adata: AnnData, key: str) -> str | None:
    for where in ("obsm", "layers", "obs"):
        if key in getattr(adata, where):
            return where
    return None


def _values(adata: AnnData, key: str, where: str) -> Any:
    if where == "obs":
        return adata.obs[key]
    values = getattr(adata, where)[key]
    return values.to_numpy() if isinstance(values, pd.DataFrame) else values


def _dense(values: Any) -> np.ndarray:
    values = values.toarray() if hasattr(values, "toarray") else np.asarray(values)
    return values if np.issubdtype(values.dtype, np.floating) else values.astype(np.float32)


def _table_rows(adata: AnnData, table: AnnData, table_key: str) -> np.ndarray:
    """Row of the table for each row of ``adata``: by region and instance keys, else obs_names."""
    attrs = table.uns.get(SPATIALDATA_ATTRS_KEY) or {}
    region_key, instance_key = attrs.get("region_key"), attrs.get("instance_key")
    if region_key in adata.obs and instance_key in adata.obs and region_key in table.obs:
        ours = pd.MultiIndex.from_arrays(
            [adata.obs[region_key].astype(str), adata.obs[instance_key].astype(str)]
        )
        theirs = pd.MultiIndex.from_arrays(
            [table.obs[region_key].astype(str), table.obs[instance_key].astype(str)]
        )
        how = f"obs[{region_key!r}] and obs[{instance_key!r}]"
    else:
        ours, theirs, how = adata.obs_names, table.obs_names, "obs_names"
    if not theirs.is_unique:
        raise ValueError(f"Table {table_key!r} has repeated {how}: rows cannot be matched.")
    rows = theirs.get_indexer(ours)
    if (rows < 0).any():
        raise ValueError(
            f"{int((rows < 0).sum())} rows of adata match no row of table {table_key!r} by "
            f"{how} (first: {list(adata.obs_names[rows < 0][:3])})."
        )
    return rows


def _scattered(values: np.ndarray, rows: np.ndarray, n_rows: int) -> np.ndarray:
    """``values`` placed at ``rows`` of an array of ``n_rows`` rows, NaN elsewhere."""
    out = np.full((n_rows, *values.shape[1:]), np.nan, dtype=values.dtype)
    out[rows] = values
    return out


def _write_into(
    adata: AnnData,
    sdata: SpatialData,
    found: dict[str, str],
    table_key: str,
    predicted_table_key: str | None,
    key_added: str | None,
) -> list[str]:
    """Write the results into the table (or ``key_added``); returns the new tables' names."""
    table = _table(sdata, table_key)
    _table_attrs(table, table_key)  # fails early on a table that annotates nothing
    if key_added == table_key:
        raise ValueError(f"key_added must name a new table, not the table {table_key!r} itself.")
    rows = _table_rows(adata, table, table_key)
    if key_added is not None:
        sdata.tables[key_added] = _results_table(adata, table, rows, found)
        logger.info("wrote %s to new table %r", list(found), key_added)
        return [key_added]
    same_genes = set(adata.var_names) == set(table.var_names) and adata.n_vars == table.n_vars
    other_layers = []
    for key, where in found.items():
        values = _values(adata, key, where)
        if where == "obs":
            column = values.set_axis(rows).reindex(range(table.n_obs))  # NaN where adata lacks
            table.obs[key] = column.set_axis(table.obs.index)
        elif where == "obsm":
            table.obsm[key] = _scattered(_dense(values), rows, table.n_obs)
        elif same_genes:
            order = pd.Index(adata.var_names).get_indexer(table.var_names)
            table.layers[key] = _scattered(_dense(values)[:, order], rows, table.n_obs)
        else:
            other_layers.append(key)
    if UNS_KEY in adata.uns:
        table.uns[UNS_KEY] = adata.uns[UNS_KEY]
    written = [key for key in found if key not in other_layers]
    logger.info("table %r: wrote %s", table_key, written)
    if not other_layers:
        return []
    name = predicted_table_key or f"{table_key}_rankbygene"
    # the layers over other genes, with the embeddings beside them
    results = {k: w for k, w in found.items() if w == "obsm" or k in other_layers}
    sdata.tables[name] = _results_table(adata, table, rows, results)
    logger.info(
        "adata's genes differ from table %r's: wrote %s to new table %r",
        table_key,
        other_layers,
        name,
    )
    return [name]


def _results_table(
    adata: AnnData, table: AnnData, rows: np.ndarray, found: dict[str, str]
) -> AnnData:
    """A table of ``adata``'s rows and results, annotating the shapes that ``table`` annotates.

    Layers go to ``layers`` (the first also to ``X``) over ``adata``'s genes, ``obsm`` entries
    to ``obsm``, ``obs`` columns to ``obs``, beside the table's region and instance columns.
    """
    from spatialdata.models import TableModel

    attrs = table.uns[SPATIALDATA_ATTRS_KEY]
    region_key, instance_key = attrs["region_key"], attrs["instance_key"]
    obs = table.obs.iloc[rows][[region_key, instance_key]].copy()
    obs.index = adata.obs_names.astype(str)
    layers = [key for key, where in found.items() if where == "layers"]
    results = AnnData(
        X=_dense(_values(adata, layers[0], "layers")).astype(np.float32) if layers else None,
        obs=obs,
        var=pd.DataFrame(index=adata.var_names.astype(str)) if layers else None,
    )
    for key, where in found.items():
        values = _values(adata, key, where)
        if where == "layers":
            results.layers[key] = _dense(values)
        elif where == "obsm":
            results.obsm[key] = _dense(values)
        else:
            results.obs[key] = values.to_numpy()
    if UNS_KEY in adata.uns:
        results.uns[UNS_KEY] = adata.uns[UNS_KEY]
    regions = list(pd.unique(obs[region_key].astype(str)))
    # the region column must list only the regions present, as categories
    results.obs[region_key] = pd.Categorical(obs[region_key].astype(str), categories=regions)
    return TableModel.parse(
        results,
        region=regions if len(regions) > 1 else regions[0],
        region_key=region_key,
        instance_key=instance_key,
    )


def _new_spatialdata(
    adata: AnnData,
    found: dict[str, str],
    table_key: str,
    library_key: str | None,
    instance_key: str,
) -> SpatialData:
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    library_key = resolve_library_key(adata, library_key)
    libraries = spot_libraries(adata, library_key)
    coords = spatial_coordinates(adata)
    spatial = adata.uns.get(SPATIAL_KEY) or {}
    names = list(pd.unique(libraries))
    where = (
        f"adata.obs[{library_key!r}]" if library_key is not None else f"adata.uns[{SPATIAL_KEY!r}]"
    )
    _check_element_names(names, "library id", f" of {where}")
    _check_element_names([table_key], "table_key")
    images, shapes = {}, {}
    instances = np.zeros(adata.n_obs, dtype=np.int64)
    for library in names:
        system = "global" if len(names) == 1 else library
        rows = np.flatnonzero(libraries == library)
        instances[rows] = np.arange(len(rows))
        entry = spatial.get(library) or {}
        scalefactors = entry.get(SCALEFACTORS_KEY) or {}
        diameter = scalefactors.get(SCALEFACTOR_SPOT_DIAMETER)
        if diameter is None:
            raise KeyError(
                f"adata.uns[{SPATIAL_KEY!r}][{library!r}][{SCALEFACTORS_KEY!r}] has no "
                f"{SCALEFACTOR_SPOT_DIAMETER!r}: the circles' radius is half of it."
            )
        shapes[library] = ShapesModel.parse(
            coords[rows],
            geometry=0,
            radius=np.full(len(rows), float(diameter) / 2),
            index=np.arange(len(rows)),
            transformations={system: Identity()},
        )
        image = _sharpest_image(entry, library)
        if image is not None:
            key, array, scale = image
            name = f"{library}_full_image" if scale == 1.0 else f"{library}_{key}_image"
            transform = Identity() if scale == 1.0 else Scale([1 / scale] * 2, axes=("y", "x"))
            dims = ("y", "x", "c") if array.ndim == 3 else ("y", "x")
            images[name] = Image2DModel.parse(
                array,
                dims=dims,
                transformations={system: transform},
                scale_factors=pyramid_factors(array.shape[:2]) or None,
                chunks={"c": array.shape[2] if array.ndim == 3 else 1}
                | {"y": IMAGE_CHUNK_PX, "x": IMAGE_CHUNK_PX},
            )
    table = AnnData(
        X=adata.X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        layers=dict(adata.layers),
        obsm=dict(adata.obsm),
        uns={key: value for key, value in adata.uns.items() if not key.startswith("_scvi")},
    )
    # one library: no column was needed to find it; squidpy's name holds it in the table
    region_key = library_key if library_key is not None else LIBRARY_ID_KEY
    table.obs[region_key] = pd.Categorical(libraries.astype(str), categories=names)
    table.obs[instance_key] = instances
    # lazy full-resolution images live in the image elements; the table keeps the thumbnails
    table.uns[SPATIAL_KEY] = {
        library: {
            **entry,
            IMAGES_KEY: {
                key: image
                for key, image in (entry.get(IMAGES_KEY) or {}).items()
                if not is_lazy_array(image)
            },
        }
        for library, entry in spatial.items()
        if isinstance(entry, Mapping)
    }
    table.uns.pop(SPATIALDATA_ATTRS_KEY, None)
    table = TableModel.parse(
        table,
        region=names if len(names) > 1 else names[0],
        region_key=region_key,
        instance_key=instance_key,
    )
    logger.info(
        "new SpatialData: %d libraries, table %r with %s", len(names), table_key, list(found)
    )
    return SpatialData(images=images, shapes=shapes, tables={table_key: table})


def _check_element_names(names: Sequence[str], what: str, where: str = "") -> None:
    """Refuse names that SpatialData cannot give its elements, before it is asked to.

    Element names hold letters, digits, ``_``, ``-`` and ``.`` only, are neither ``.`` nor
    ``..``, do not start with ``__``, and differ in more than case (its store is a folder per
    element, and file systems may ignore case).
    """
    seen: dict[str, str] = {}
    for name in names:
        valid = (
            bool(name)
            and name not in (".", "..")
            and not name.startswith("__")
            and all(c.isalnum() or c in "_-." for c in name)
        )
        if not valid:
            suggestion = re.sub(r"[^0-9A-Za-z_.-]+", "_", name).lstrip("_.") or "library"
            raise ValueError(
                f"The {what} {name!r}{where} cannot name a SpatialData element: use letters, "
                "digits, '_', '-' and '.' only (not '.', '..' or a leading '__'), e.g. "
                f"{suggestion!r}."
            )
        other = seen.setdefault(name.lower(), name)
        if other != name:
            raise ValueError(
                f"The {what}s {other!r} and {name!r}{where} differ only in case: SpatialData "
                "stores each element in a folder of its name, which some file systems do not "
                "tell apart."
            )


def pyramid_factors(shape: tuple[int, int], smallest: int = IMAGE_CHUNK_PX) -> list[int]:
    """Scale factors of a multiscale image: halving until the long side is at most ``smallest``.

    Examples
    --------
    >>> pyramid_factors((5000, 3000)), pyramid_factors((800, 600))
    ([2, 2, 2], [])
    """
    factors, side = [], max(int(s) for s in shape)
    while side > smallest:
        factors.append(2)
        side = -(-side // 2)
    return factors


def _sharpest_image(entry: Mapping[str, Any], library: str) -> tuple[str, Any, float] | None:
    """``(key, image, scale)`` of the library's image with the largest scale factor, if any."""
    scales = image_scales(entry)
    if not scales:
        logger.warning("library %r: no image with a scale factor; circles only", library)
        return None
    key = max(scales, key=scales.get)
    return key, entry[IMAGES_KEY][key], scales[key]
