"""What the model's mixins use of the model, declared once for the type checker.

The mixins (training, representation, prediction, saving) are parts of one class,
:class:`~rankbygene.model.RankByGene`, that also derives from scvi-tools' ``BaseModelClass``.
For the type checker each mixin derives from :class:`ModelAttributes`, which names what the
other parts provide; at run time it is ``object`` and adds nothing to the class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ModelAttributes"]

if TYPE_CHECKING:
    import numpy as np
    from scvi.model.base import BaseModelClass

    from rankbygene.data import ImageSettings
    from rankbygene.model._module import RankByGeneModule

    class ModelAttributes(BaseModelClass):
        """The model's attributes and the methods one mixin calls on another."""

        module: RankByGeneModule
        features_key: str | None
        library_key: str | None
        spatial_key: str
        ema: tuple[float, float]

        @property
        def image_settings(self) -> ImageSettings: ...

        def get_image_representation(self, *args: Any, **kwargs: Any) -> np.ndarray: ...

        def get_gene_representation(self, *args: Any, **kwargs: Any) -> np.ndarray: ...

        def _gene_panel(self) -> list[str]: ...

else:
    ModelAttributes = object
