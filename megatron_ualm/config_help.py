"""Every run setting with its type, default and comment, read from the config dataclasses.

The help text is not written twice: a setting's comment is the trailing ``# ...`` comment on
its field in megatron_ualm/config.py (plus the comment-only lines aligned under it), and a
section's description is its class docstring. ``settings(UALMConfig)`` walks the dataclass
tree; ``settings_help`` renders it for ``python -m megatron_ualm.train --help``.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass

from megatron_ualm.config_loader import describe_type

__all__ = ["Setting", "field_comments", "settings", "settings_help"]


@dataclass
class Setting:
    key: str           # dotted key, as written in overrides (list items: data.train[N].path)
    type: str          # human-readable type; Literal choices spelled out
    default: str       # YAML form of the default, or "required"
    comment: str       # the field's source comment, "" when it has none
    section_doc: str   # docstring of the dataclass holding the field


@functools.lru_cache(maxsize=None)
def _module_comments(path: str) -> dict[tuple[str, str], str]:
    """{(class name, field name): comment} for every annotated field of every class in `path`."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    comments: dict[int, tuple[int, str, bool]] = {}  # line -> (text indent after '#', text, comment-only)
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            body = tok.string[1:]
            text = body.strip()
            comments[tok.start[0]] = (len(body) - len(body.lstrip()), text, tok.start[0] not in code_lines)
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENCODING, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    out = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                out[(node.name, stmt.target.id)] = _field_comment(stmt, comments)
    return out


def _field_comment(stmt: ast.AnnAssign, comments: dict[int, tuple[int, str, bool]]) -> str:
    """The trailing comment of a field statement, continued by the comment-only lines right
    below it whose text is indented under it (``#`` then several spaces; a ``# heading`` of
    the next field has one)."""
    trailing = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1)
                if n in comments and not comments[n][2]]
    if not trailing:
        return ""
    parts = [trailing[-1][1]]
    line = stmt.end_lineno + 1
    while line in comments and comments[line][2] and comments[line][0] > 2 and comments[line][1]:
        parts.append(comments[line][1])
        line += 1
    return " ".join(parts)


def field_comments(cls) -> dict[str, str]:
    """{field name: comment from the source} for the dataclass `cls`."""
    found = _module_comments(inspect.getsourcefile(cls))
    return {f.name: found.get((cls.__name__, f.name), "") for f in dataclasses.fields(cls)}


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)) and not value:
        return "[]" if isinstance(value, list) else "{}"
    return str(value)


def _doc(cls) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(cls.__name__ + "(") else " ".join(doc.split())  # skip the generated one


def settings(cls, prefix: str = "") -> list[Setting]:
    """Every leaf setting under the dataclass `cls`, in declaration order; a list of
    dataclasses is walked as ``key[N].field``."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    out, nested = [], []  # a section's own settings come before its subsections'
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            nested += settings(tp, key + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = _yaml_value(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = _yaml_value(f.default_factory())
        else:
            default = "required"
        out.append(Setting(key, describe_type(tp), default, comments[f.name], _doc(cls)))
        if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            nested += settings(args[0], key + "[N].")
    return out + nested


def settings_help(cls, width: int = 100) -> str:
    """The settings of `cls` grouped by section: ``key = default  (type)`` then the comment."""
    lines, section = [], None
    for s in settings(cls):
        head = s.key.rsplit(".", 1)[0] if "." in s.key else ""
        if head != section:
            section = head
            lines.append("")
            lines.append(f"{head}:" + (f"  {s.section_doc}" if s.section_doc else ""))
        lines.append(f"  {s.key} = {s.default}  ({s.type})")
        if s.comment:
            lines += textwrap.wrap(s.comment, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines).lstrip("\n")
