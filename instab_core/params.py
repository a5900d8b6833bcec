"""A notebook's parameters: what its ``parameters`` cell declares, its named profiles, and checks of given values.

Papermill injects any name it is given and only warns about unknown ones, so a typo (``-p num_angle 10``) would
run silently with the defaults. :func:`check` refuses an unknown name (suggesting the closest one) and a value of
the wrong type, naming the parameter, before anything runs.

Types come from the cell itself: an annotation (``context: int | None = 256``) when there is one, else the
default's type (``num_angles = 1000`` takes an int; ``s_max = 1e-6`` an int or a float; ``path = None`` anything).

Profiles live in the notebook's ``metadata["instab"]["profiles"]`` (``{"smoke": {...}, "seed": {...}}``);
``default`` is the parameters cell itself. The older ``metadata["instab"]["smoke_parameters"]`` is read as the
``smoke`` profile.
"""

from __future__ import annotations

import ast
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

UNKNOWN = object()  # a default that is not a literal (e.g. a name imported in an earlier cell)
DEFAULT_PROFILE = "default"


class ParameterError(ValueError):
    """A parameter name or value that the notebook does not take."""


@dataclass(frozen=True)
class Parameter:
    """One name assigned in a ``parameters`` cell."""

    name: str
    default: Any  # the evaluated default, or UNKNOWN
    annotation: ast.expr | None  # the declared type, if the cell annotates it
    help: str  # the line's trailing comment

    @property
    def type_text(self) -> str:
        if self.annotation is not None:
            return ast.unparse(self.annotation)
        if self.default is UNKNOWN or self.default is None:
            return "any"
        return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}.get(
            type(self.default), type(self.default).__name__)


def parse_value(text: str) -> Any:
    """A -p value as papermill would take it: int, float, bool, null, JSON, else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def _parameters_cell(nb: nbformat.NotebookNode) -> str:
    for cell in nb.cells:
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return "".join(cell.source)
    return ""


def _evaluate(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    try:  # arithmetic and comprehensions of literals: "1e-6 + 1815 * 2e-13", "[10 ** k for k in range(13)]"
        return eval(compile(ast.Expression(node), "<parameters>", "eval"), {"__builtins__": {"range": range}}, {})
    except Exception:
        return UNKNOWN


def declared(nb_path: Path) -> dict[str, Parameter]:
    """The parameters a notebook declares, in order (``a, b = 1, 2`` declares both)."""
    nb = nbformat.read(nb_path, as_version=4)
    source = _parameters_cell(nb)
    lines = source.splitlines()
    tree = ast.parse(source)
    out: dict[str, Parameter] = {}
    for stmt in tree.body:
        line = lines[stmt.lineno - 1]
        comment = line.split("#", 1)[1].strip() if "#" in line else ""
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            value = _evaluate(stmt.value) if stmt.value is not None else UNKNOWN
            out[stmt.target.id] = Parameter(stmt.target.id, value, stmt.annotation, comment)
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = Parameter(target.id, _evaluate(stmt.value), None, comment)
                elif isinstance(target, ast.Tuple) and isinstance(stmt.value, ast.Tuple):
                    for t, v in zip(target.elts, stmt.value.elts):
                        if isinstance(t, ast.Name):
                            out[t.id] = Parameter(t.id, _evaluate(v), None, comment)
    return out


def profiles(nb_path: Path) -> dict[str, dict[str, Any]]:
    """Named parameter sets of a notebook; ``default`` ({}: the cell's own values) is always there."""
    meta = dict(nbformat.read(nb_path, as_version=4).metadata.get("instab", {}))
    out: dict[str, dict[str, Any]] = {DEFAULT_PROFILE: {}}
    if "smoke_parameters" in meta:
        out["smoke"] = dict(meta["smoke_parameters"])
    out.update({k: dict(v) for k, v in (meta.get("profiles") or {}).items()})
    return out


def profile(nb_path: Path, name: str) -> dict[str, Any]:
    """The parameters of profile ``name`` (a one-line error lists the notebook's profiles)."""
    known = profiles(nb_path)
    if name not in known:
        raise ParameterError(f"{nb_path.stem} has no profile {name!r}; its profiles: {', '.join(known)}")
    return dict(known[name])


# --- types ------------------------------------------------------------------------------------------------

_SIMPLE = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict, "tuple": tuple}


def _accepts(ann: ast.expr, value: Any) -> bool:
    """Does ``value`` fit the annotation ``ann`` (int, float, str, bool, None, list[T], dict, X | Y, Any)?"""
    if isinstance(ann, ast.BinOp) and isinstance(ann.op, ast.BitOr):
        return _accepts(ann.left, value) or _accepts(ann.right, value)
    if isinstance(ann, ast.Constant) and ann.value is None:
        return value is None
    if isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "list":
        return isinstance(value, list) and all(_accepts(ann.slice, v) for v in value)
    if isinstance(ann, ast.Name):
        if ann.id == "Any":
            return True
        if ann.id == "None":
            return value is None
        t = _SIMPLE.get(ann.id)
        if t is None:
            raise ParameterError(f"unsupported annotation {ann.id!r} in a parameters cell")
        if t is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if t is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, t)
    raise ParameterError(f"unsupported annotation {ast.unparse(ann)!r} in a parameters cell")


def _type_of_default(default: Any) -> ast.expr | None:
    if default is UNKNOWN or default is None:
        return None
    name = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}.get(type(default))
    return ast.Name(name) if name else None


def _fits(p: Parameter, value: Any) -> bool:
    ann = p.annotation if p.annotation is not None else _type_of_default(p.default)
    return True if ann is None else _accepts(ann, value)


def _wants_float(p: Parameter) -> bool:
    ann = p.annotation if p.annotation is not None else _type_of_default(p.default)
    return ann is not None and "float" in ast.unparse(ann) and "int" not in ast.unparse(ann)


def check(experiment: str, nb_path: Path, values: dict[str, Any], raw: dict[str, str] | None = None) -> dict[str, Any]:
    """``values`` checked against the notebook's parameters cell; returns them ready for papermill.

    ``raw`` holds the command-line text of values that came from ``-p NAME TEXT``: where the parameter takes a
    string and the parsed value is not one (``-p text 2024``), the text itself is used. Integers given to a
    float parameter become floats. Raises :class:`ParameterError` naming the first offending parameter.
    """
    params = declared(nb_path)
    raw = raw or {}
    out: dict[str, Any] = {}
    for name, value in values.items():
        p = params.get(name)
        if p is None:
            close = difflib.get_close_matches(name, list(params), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ParameterError(f"{experiment} has no parameter {name!r}{hint} (its parameters: "
                                 f"`instab params {experiment}`)")
        if not _fits(p, value) and name in raw and _fits(p, raw[name]):
            value = raw[name]
        if not _fits(p, value):
            given = raw.get(name, repr(value))
            raise ParameterError(f"{experiment}: parameter {name!r} takes {p.type_text}, got {given!r} "
                                 f"({type(value).__name__}){_help(p)}")
        if _wants_float(p) and isinstance(value, int):
            value = float(value)
        out[name] = value
    return out


def _help(p: Parameter) -> str:
    return f"; {p.name}: {p.help}" if p.help else ""


def describe(nb_path: Path) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) rows for ``instab params``."""
    rows = []
    for p in declared(nb_path).values():
        default = "(set in an earlier cell)" if p.default is UNKNOWN else repr(p.default)
        rows.append((p.name, p.type_text, default, p.help))
    return rows
