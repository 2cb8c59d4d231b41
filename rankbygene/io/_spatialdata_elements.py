"""SpatialData's elements as reading and writing meet them: the package itself, a table by name
and the elements it annotates, and the names that SpatialData gives elements."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from anndata import AnnData

from rankbygene._layout._keys import SPATIALDATA_ATTRS_KEY

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["check_element_names", "import_spatialdata", "named_table", "table_annotation"]


def import_spatialdata() -> Any:
    try:
        import spatialdata
    except ImportError as err:
        raise ImportError(
            "SpatialData input and output need the spatialdata package: pip install spatialdata."
        ) from err
    return spatialdata


def named_table(sdata: SpatialData, table_key: str) -> AnnData:
    if table_key not in sdata.tables:
        raise KeyError(
            f"sdata has no table {table_key!r} (tables: {list(sdata.tables)}): pass table_key."
        )
    return sdata.tables[table_key]


def table_annotation(table: AnnData, table_key: str) -> tuple[list[str], str, str]:
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


def check_element_names(names: Sequence[str], what: str, where: str = "") -> None:
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
