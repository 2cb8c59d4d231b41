"""The public API, listed: every name users import and every signature, against a stored list.

A change to the API (a name or parameter added, renamed or removed, a default changed) fails
here until ``tests/public_api.txt`` is regenerated on purpose::

    python tests/test_public_api.py > tests/public_api.txt

and the change is named in CHANGELOG.md.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import rankbygene

STORED = Path(__file__).with_name("public_api.txt")


def _signature(obj: object) -> str:
    """Parameters and defaults, without annotations: fixing a type hint is not an API change."""
    try:
        signature = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"
    stripped = signature.replace(
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=signature.empty,
    )
    # object reprs carry memory addresses, which change from run to run
    return re.sub(r" at 0x[0-9a-f]+", "", str(stripped))


def _members(cls: type) -> dict[str, str]:
    """A class's own public methods and properties, one line each."""
    lines = {}
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, (classmethod, staticmethod)):
            lines[name] = f"    {name}{_signature(member.__func__)}"
        elif isinstance(member, property):
            lines[name] = f"    {name} (property)"
        elif callable(member):
            lines[name] = f"    {name}{_signature(member)}"
    return lines


def public_api() -> list[str]:
    """One line per public name (with its signature), and one per public method of a class."""
    lines = []
    modules = [("rankbygene", rankbygene)]
    for name in sorted(rankbygene.__all__):
        value = getattr(rankbygene, name)
        if inspect.ismodule(value):
            modules.append((value.__name__, value))
    for module_name, module in modules:
        for name in sorted(getattr(module, "__all__", [])):
            value = getattr(module, name)
            if inspect.ismodule(value):
                continue
            if inspect.isclass(value):
                lines.append(f"{module_name}.{name} (class){_signature(value)}")
                # members from the package's own bases (the model's mixins) are the class's API,
                # whichever mixin holds them
                members: dict[str, str] = {}
                for klass in reversed(value.__mro__):
                    if klass.__module__.startswith("rankbygene"):
                        members.update(_members(klass))
                lines += [members[member] for member in sorted(members)]
            elif callable(value):
                lines.append(f"{module_name}.{name}{_signature(value)}")
            else:
                lines.append(f"{module_name}.{name} = {type(value).__name__}")
    return lines


def test_public_api_is_the_stored_one():
    current = public_api()
    stored = STORED.read_text().splitlines()
    removed = [line for line in stored if line not in current]
    added = [line for line in current if line not in stored]
    assert (removed, added) == ([], []), (
        "the public API changed; if on purpose, regenerate tests/public_api.txt "
        "(python tests/test_public_api.py > tests/public_api.txt)."
    )


if __name__ == "__main__":
    print("\n".join(public_api()))
