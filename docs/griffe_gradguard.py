"""Griffe extension for the API reference of lightning-gradguard.

- The package exports its public names lazily (``_LAZY`` in ``lightning_gradguard/__init__.py``), which static
  analysis cannot see: they are added as aliases, so ``::: lightning_gradguard.GradientClipping`` works.
- ``Example::`` (reST's literal-block marker, kept so that the docstrings read well in a terminal) becomes the
  Google-style ``Examples:`` section, rendered as code.
- The docstrings cross-reference with reST roles (``:class:`~lightning_gradguard.ExplosionGuard```); they are turned
  into mkdocs-autorefs links, resolved in the scope of the documented object. A name that resolves to nothing
  rendered in the docs stays plain code.
"""

from __future__ import annotations

import ast
import re
from functools import partial
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([\w.]+)`")
EXAMPLE = re.compile(r"^(\s*)Examples?::\n(?:[ \t]*\n)+", re.MULTILINE)


class GradguardDocs(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "lightning_gradguard":
            return
        for name, module in _lazy_exports(pkg).items():
            if name not in pkg.members:
                pkg.set_member(name, griffe.Alias(name, f"{module}.{name}", parent=pkg))
        for obj in _walk(pkg):
            if obj.docstring is not None:
                text = EXAMPLE.sub(r"\1Examples:\n", obj.docstring.value)
                obj.docstring.value = ROLE.sub(partial(_link, obj), text)

    # the name of the same event before griffe 2 (the work above can run twice: it changes nothing the second time)
    on_package_loaded = on_package


def _lazy_exports(pkg: griffe.Module) -> dict[str, str]:
    """The ``_LAZY`` mapping of the package's ``__init__.py``: public name -> module that defines it."""
    tree = ast.parse(pkg.filepath.read_text(encoding="utf-8"))  # type: ignore[union-attr]
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _walk(obj: griffe.Object) -> list[griffe.Object]:
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias:
            found += _walk(member)  # type: ignore[arg-type]
    return found


def _link(obj: griffe.Object, match: re.Match) -> str:
    short, name = match.group(1) == "~", match.group(2)
    title = name.rpartition(".")[2] if short else name
    try:
        target = _resolve(obj, name)
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return f"`{title}`"
    return f'<autoref identifier="{target}" optional>`{title}`</autoref>'


def _resolve(obj: griffe.Object, name: str) -> str:
    """The canonical path of ``name`` seen from ``obj``: a member of ``obj`` or of a parent (imported names
    included), or a full path from the package."""
    head, _, rest = name.partition(".")
    scope: Any = obj
    while scope is not None and head not in scope.members:
        scope = scope.parent
    if scope is not None:
        found = scope.members[head]
    elif head == obj.package.name:
        found = obj.package
    else:
        raise KeyError(name)
    for part in rest.split(".") if rest else []:
        found = found.members[part]
    return found.final_target.path if found.is_alias else found.path
