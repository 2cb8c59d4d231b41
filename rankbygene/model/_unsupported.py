"""Members inherited from scvi-tools that this model cannot support, hidden with a pointer."""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = ["Unsupported", "visible_members"]


class Unsupported:
    """A class attribute that hides an inherited member which cannot work for this model.

    Reading it, on the class or an instance, raises :class:`AttributeError` saying what to use
    instead, so ``hasattr`` is ``False``, and :func:`visible_members` leaves it out of ``dir()``
    (tab completion).

    Parameters
    ----------
    use
        What to use instead, for the message.

    Examples
    --------
    >>> from rankbygene.model._unsupported import Unsupported
    >>> class Model:
    ...     get_normalized_expression = Unsupported("predict_expression")
    >>> hasattr(Model(), "get_normalized_expression")
    False
    """

    def __init__(self, use: str) -> None:
        self.use = use
        self.name = "member"

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> NoReturn:
        cls = owner if owner is not None else type(instance)
        raise AttributeError(
            f"{cls.__name__} has no {self.name} (an scvi-tools method for models of "
            f"expression); use {self.use}."
        )


def visible_members(instance: Any) -> list[str]:
    """``dir(instance)`` without the names hidden by :class:`Unsupported`."""
    hidden = {
        name
        for cls in type(instance).__mro__
        for name, value in vars(cls).items()
        if isinstance(value, Unsupported)
    }
    return sorted(set(object.__dir__(instance)) - hidden)
