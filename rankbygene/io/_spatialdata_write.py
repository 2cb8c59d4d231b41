"""SpatialData out: embeddings and predictions written into a SpatialData table, or a new
SpatialData object built from the package's layout, its images written as multiscale images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

from rankbygene._constants import (
    GENE_EMBEDDING_KEY,
    IMAGE_EMBEDDING_KEY,
    PATCH_STATISTICS_KEY,
    PREDICTED_LAYER_KEY,
    RANK_CONSISTENCY_KEY,
    UNS_KEY,
)
from rankbygene._docs import d
from rankbygene._image import is_lazy_array
from rankbygene._layout import (
    image_scales,
    resolve_library_key,
    spatial_coordinates,
    spot_libraries,
)
from rankbygene._layout._keys import (
    IMAGES_KEY,
    LIBRARY_ID_KEY,
    SCALEFACTOR_SPOT_DIAMETER,
    SCALEFACTORS_KEY,
    SPATIAL_KEY,
    SPATIALDATA_ATTRS_KEY,
)
from rankbygene._logging import logger
from rankbygene.io._spatialdata_elements import (
    check_element_names,
    import_spatialdata,
    named_table,
    table_annotation,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["pyramid_factors", "to_spatialdata"]

#: What :func:`to_spatialdata` writes by default, where ``adata`` has it: the package's outputs.
DEFAULT_KEYS = (
    IMAGE_EMBEDDING_KEY,
    GENE_EMBEDDING_KEY,
    PREDICTED_LAYER_KEY,
    PATCH_STATISTICS_KEY,
    RANK_CONSISTENCY_KEY,
)
#: Chunk side of the images to_spatialdata writes, and the long side of their coarsest level.
IMAGE_CHUNK_PX = 1024


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
    import_spatialdata()
    explicit = keys is not None
    keys = list(DEFAULT_KEYS if keys is None else keys)
    found = {key: _where(adata, key) for key in keys}
    missing = [key for key, where in found.items() if where is None]
    if explicit and missing:
        raise KeyError(
            f"adata has no {missing} in obsm, layers or obs (obsm: {list(adata.obsm)}, "
            f"layers: {list(adata.layers)})."
        )
    located = {key: where for key, where in found.items() if where is not None}
    if sdata is None:
        if write:
            raise ValueError(
                "write=True writes into the zarr store of sdata; a new object has none: save it "
                "with sdata.write(path)."
            )
        return _new_spatialdata(adata, located, table_key, library_key, instance_key)
    check_element_names([n for n in (key_added, predicted_table_key) if n is not None], "table")
    if write:
        _check_writable(adata, sdata, located, table_key, key_added)
    new_tables = _write_into(adata, sdata, located, table_key, predicted_table_key, key_added)
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
    table = named_table(sdata, table_key)
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
    table = named_table(sdata, table_key)
    table_annotation(table, table_key)  # fails early on a table that annotates nothing
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
    check_element_names(names, "library id", f" of {where}")
    check_element_names([table_key], "table_key")
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
    key = max(scales, key=lambda name: scales[name])
    return key, entry[IMAGES_KEY][key], scales[key]
