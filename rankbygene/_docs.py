"""Parameter descriptions shared by the package's functions, written once (docrep).

As in scvi-tools and squidpy: a docstring names a shared parameter as ``%(library_key)s`` in its
Parameters section, and the function is decorated with ``@d.dedent``, which dedents the
docstring and puts the text in. A method decorated with
``torch.inference_mode()`` takes ``@d.dedent`` below it, so that the wrapper copies the
finished docstring.
"""

from __future__ import annotations

from docrep import DocstringProcessor

__all__ = ["d"]

_adata = """\
adata
    AnnData in the scanpy/squidpy spatial layout (``obsm["spatial"]``, ``uns["spatial"]``)."""

_adata_model = """\
adata
    AnnData in the scanpy/squidpy spatial layout; ``None``: the model's own AnnData."""

# The one rule for library_key=None, implemented by rankbygene._layout.resolve_library_key.
_library_key = """\
library_key
    ``obs`` column naming each spot's library (slide). ``None``: found from the data: with at
    most one library in ``uns["spatial"]`` all spots are one library; with several, the
    column whose values are the library ids of ``uns["spatial"]`` (``library_id`` when several
    qualify), logged at INFO level; an error when no column qualifies."""

_library_key_model = """\
library_key
    ``obs`` column naming each spot's library (slide) in ``adata``. ``None``: the column given
    at :meth:`~rankbygene.RankByGene.setup_anndata` where ``adata`` has it, else found from
    the data as every function of the package does (one library in ``uns["spatial"]``: all
    spots; several: the column whose values are their ids)."""

_layer = """\
layer
    ``layers`` key of the expression to read; ``None``: ``X``."""

_key_added = """\
key_added
    Key the result is written under."""

_copy = """\
copy
    ``False``: write the result into ``adata`` and return ``None``; ``True``: leave ``adata``
    unchanged and return a copy of it with the result."""

_batch_size = """\
batch_size
    Spots per forward pass; ``None``: ``scvi.settings.batch_size`` (at least 256 on a GPU)."""

_num_workers = """\
num_workers
    DataLoader workers reading patches while the encoder runs; ``None``: one per CPU core but
    one, up to 8 (16 beside a GPU), on Linux for three batches or more; otherwise none."""

#: The processor: ``@d.dedent`` fills ``%(name)s`` in a docstring.
d = DocstringProcessor(
    adata=_adata,
    adata_model=_adata_model,
    library_key=_library_key,
    library_key_model=_library_key_model,
    layer=_layer,
    key_added=_key_added,
    copy=_copy,
    batch_size=_batch_size,
    num_workers=_num_workers,
)
