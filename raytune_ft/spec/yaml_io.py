"""Spec text in and out: strict YAML with line numbers, `--set` overrides, and pydantic's
validation errors turned into one-paragraph :class:`~raytune_ft.errors.UserError`s naming the
file, the YAML line and the field.

The schema itself is :mod:`raytune_ft.spec.schema`; this module imports it (never the other way
round at module level).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raytune_ft.errors import UserError
from raytune_ft.knobs import SPACE_MODELS, SPACES, FieldError, allowed
from raytune_ft.spec.schema import (
    DataSpec,
    ModelSpec,
    PromoteSpec,
    Resources,
    RunSpec,
    Spec,
    TrainSpec,
)
from raytune_ft.spec.searcher import SchedulerSpec, SearcherSpec
from raytune_ft.spec.track import MlflowSpec, TrackSpec

__all__ = ["StrictLoader", "apply_overrides", "check_yaml_size", "field_line", "load_spec",
           "locate", "parse_spec", "spec_to_yaml"]

# --------------------------------------------------------------------------------------------
# YAML → data and a map of field paths to lines. Guards against what YAML allows and a spec
# never needs: duplicate keys, non-scalar keys, tags, alias bombs.
# --------------------------------------------------------------------------------------------
_MERGE_TAG = "tag:yaml.org,2002:merge"
# A spec is a few hundred values. YAML aliases can make a short file expand to billions
# ("billion laughs"); anything past this many values (counted with aliases expanded) or this
# deep is refused before it is built.
_MAX_VALUES = 100_000
_MAX_DEPTH = 50


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys instead of keeping the last one, and keys that
    are not plain scalars (a `? [a, b]` key cannot name a field)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *base`: merged keys may be overridden
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain word, not a list or mapping",
                    key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _check_size(node: yaml.Node | None) -> None:
    """Refuse a document that expands (aliases included) past _MAX_VALUES or _MAX_DEPTH."""
    sizes: dict[int, int] = {}  # per node, memoised: an alias costs one lookup, not a walk

    def size(n: yaml.Node, depth: int) -> int:
        if depth > _MAX_DEPTH:
            raise yaml.MarkedYAMLError(problem=f"nested deeper than {_MAX_DEPTH} levels; "
                                               f"a spec is a few levels deep",
                                       problem_mark=n.start_mark)
        if id(n) not in sizes:
            kids = ([c for kv in n.value for c in kv] if isinstance(n, yaml.MappingNode) else
                    n.value if isinstance(n, yaml.SequenceNode) else [])
            sizes[id(n)] = 1 + sum(size(c, depth + 1) for c in kids)
            if sizes[id(n)] > _MAX_VALUES:
                raise yaml.MarkedYAMLError(problem=f"more than {_MAX_VALUES:,} values once "
                                                   f"aliases are expanded",
                                           problem_mark=n.start_mark)
        return sizes[id(n)]

    if node is not None:
        size(node, 0)


# The same guards for the other YAML files rtft reads (portfolio files): compose the text,
# check_yaml_size(node), then build it with a StrictLoader (or a subclass).
StrictLoader = _StrictLoader
check_yaml_size = _check_size


def _line_map(node: yaml.Node | None, path: tuple = (), out: dict | None = None,
              seen: set[int] | None = None) -> dict:
    """Field path (a tuple of keys and list indexes) → 1-based line, for every node."""
    out = {} if out is None else out
    seen = set() if seen is None else seen
    if node is None or id(node) in seen:  # an alias: its lines were mapped where it was defined
        return out
    seen.add(id(node))
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                continue  # refused by the loader; no path to map
            key = k.value
            _line_map(v, (*path, key), out, seen)
            out[(*path, key)] = k.start_mark.line + 1  # a field's line is its key's line
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, (*path, i), out, seen)
    return out


def field_line(file: str | Path, field: str) -> int | None:
    """The YAML line of dotted `field` (``run.resources.gpu``) in spec `file`, or None when
    the file cannot be read or parsed or lacks the field. For errors raised after loading
    (a missing weights file, a cluster too small), so they can still name the line."""
    try:
        lines = _line_map(yaml.compose(Path(file).read_text(), Loader=yaml.SafeLoader))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return lines.get(tuple(field.split(".")))


def locate(e: UserError, file: str | Path) -> UserError:
    """`e` attributed to spec `file` (:meth:`UserError.located`) and, when it names a field the
    file sets, that field's YAML line: for errors raised after loading (a missing weights file,
    a cluster too small, a bound no trial fits)."""
    had_file = e.file is not None
    e.located(file)
    if not had_file and e.file is not None and e.field and e.line is None:
        e.line = field_line(file, e.field)
    return e


def _read_yaml(text: str, file: str) -> tuple[dict, dict]:
    """The spec's data and its line map; UserError for anything but a YAML mapping."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # parsed once: nodes with lines
        _check_size(node)  # before anything is built from it
        loader = _StrictLoader("")
        try:
            data = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
        lines = _line_map(node)
    except RecursionError:
        raise UserError(f"YAML error: nested deeper than {_MAX_DEPTH} levels; a spec is a few "
                        f"levels deep", file=file) from None  # its cause: 1,000 frames
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "invalid YAML"
        if "\\t" in problem or "\t" in problem:
            problem += " (YAML indents with spaces, never tabs)"
        if "could not determine a constructor" in problem:
            problem = (f"{problem.split(' for the tag')[0]} for the tag in this spec: only "
                       f"plain YAML is read (no !!python or other tags)")
        raise UserError(f"YAML error: {problem}", file=file,
                        line=mark.line + 1 if mark else None) from e
    except yaml.reader.ReaderError as e:  # a control character: binary, not a text file
        char = f"0x{e.character:02x}" if isinstance(e.character, int) else repr(e.character)
        raise UserError(f"YAML error: {e.reason} (character {char} at offset {e.position}); "
                        f"a spec is plain text", file=file,
                        line=text[: e.position].count("\n") + 1) from e
    except yaml.YAMLError as e:
        raise UserError(f"YAML error: {' '.join(str(e).split())}", file=file) from e
    if data is None:
        raise UserError("the spec is empty; it needs at least 'name:' (see "
                        "search_spaces/resnet.yaml)", file=file)
    if not isinstance(data, dict):
        raise UserError(f"the spec must be a mapping of sections, not a "
                        f"{type(data).__name__}", file=file, line=lines.get((), 1))
    return data, lines


# --------------------------------------------------------------------------------------------
# `--set key.sub=value` overrides, applied to the data before validation.
# --------------------------------------------------------------------------------------------
def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> set[tuple]:
    """Apply `key.sub=value` overrides in place (values parsed as YAML scalars/lists).

    Returns the set of paths overridden, so errors on them can say `--set` not a line.
    """
    done = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected key=value, e.g. run.num_samples=4",
                            file="--set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                section = ".".join(parts[: i + 1])
                raise UserError(f"--set {item!r}: '{section}' is not a section",
                                file="--set", field=key)
            node = nxt
        node[parts[-1]] = value
        done.add(tuple(parts))
    return done


# --------------------------------------------------------------------------------------------
# pydantic's ValidationError → one UserError: the first problem, its field, its line.
# --------------------------------------------------------------------------------------------
def _error_from_validation(e: ValidationError, file: str, lines: dict, overridden: set,
                           data: dict) -> UserError:
    # A misspelt key also makes its real name "missing": name the misspelling first.
    errs = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")
    err = errs[0]
    exc = (err.get("ctx") or {}).get("error")
    if isinstance(exc, FieldError):
        loc, message = exc.loc, exc.message
    else:
        loc = tuple(err["loc"])
        # Drop the discriminator tag pydantic puts into the location of tagged unions.
        if loc[:1] == ("search",) and len(loc) > 2 and loc[2] in SPACES:
            loc = loc[:2] + loc[3:]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = (*loc, "space")
        loc, in_union = _drop_union_labels(loc)
        message = (f"got {_short(_get(data, loc))}; allowed: a plain value (text, number, "
                   f"true/false or null)" if in_union else _message(err, loc, data))
    loc = tuple(loc)
    field = ".".join(str(p) for p in loc) or None
    line = None
    if any(loc[: len(o)] == o for o in overridden):
        file = f"{file} (with --set)"
    else:
        for n in range(len(loc), -1, -1):
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
    # One problem per place: a value no member of a union accepts is one problem, not four.
    places = {_drop_union_labels(tuple(x["loc"]))[0] for x in errs}
    more = f" ({len(places) - 1} more problem(s) after this one.)" if len(places) > 1 else ""
    return UserError(message + more, file=file, field=field, line=line)


_UNION_LABEL = re.compile(r"bool|int|float|str|none|(list|nullable|union)\[.*\]")


def _drop_union_labels(loc: tuple) -> tuple[tuple, bool]:
    """`search.x.values.0.bool` → `search.x.values.0`: pydantic names the member of a union
    of plain values (bool, int, …) it tried; that is no part of the user's field path."""
    head, tail = loc[:3], [p for p in loc[3:]
                           if not (isinstance(p, str) and _UNION_LABEL.fullmatch(p))]
    return (*head, *tail), len(tail) < len(loc[3:])


def _message(err: dict, loc: tuple, data: dict) -> str:
    if err["type"] == "extra_forbidden":
        parent = _SECTION_MODELS.get(loc[:-1])
        if loc[:1] == ("search",) and len(loc) == 3:
            parent = SPACE_MODELS.get(_get(data, (*loc[:2], "space")))
        keys = list(parent.model_fields) if parent else []
        near = difflib.get_close_matches(str(loc[-1]), keys, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        return f"unknown key; allowed: {', '.join(keys)}.{hint}"
    if err["type"] == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
        return msg
    value = _get(data, loc)
    got = f"got {_short(value)}; " if value is not _MISSING else ""
    return got + allowed(err)


def _short(value: Any) -> str:
    """repr() of a value from the spec, cut short: an error stays one readable paragraph."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 4, 4, 60, 60
    return r.repr(value)


_MISSING = object()


def _get(data: Any, loc: tuple) -> Any:
    for p in loc:
        in_dict = isinstance(data, dict) and p in data
        in_list = isinstance(data, list) and isinstance(p, int) and p < len(data)
        if in_dict or in_list:
            data = data[p]
        else:
            return _MISSING
    return data


_SECTION_MODELS: dict[tuple, type[BaseModel]] = {
    (): Spec, ("model",): ModelSpec, ("data",): DataSpec, ("train",): TrainSpec,
    ("searcher",): SearcherSpec, ("scheduler",): SchedulerSpec, ("run",): RunSpec,
    ("run", "resources"): Resources, ("promote",): PromoteSpec,
    ("track",): TrackSpec, ("track", "mlflow"): MlflowSpec,
}


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def parse_spec(text: str, *, file: str = "<spec>", overrides: list[str] | tuple = ()) -> Spec:
    """Validate spec text (plus `--set` overrides); raise :class:`UserError` when it is bad."""
    data, lines = _read_yaml(text, file)
    overridden = apply_overrides(data, overrides)
    for path in overridden:  # an overridden field has no YAML line to blame
        lines.pop(path, None)
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise _error_from_validation(e, file, lines, overridden, data) from e


def load_spec(path: str | Path, overrides: list[str] | tuple = ()) -> Spec:
    """Read and validate a spec file; errors are :class:`UserError` naming file/field/line."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError as e:
        raise UserError("file not found", file=str(path)) from e
    except OSError as e:
        raise UserError(f"cannot read the file: {e.strerror}", file=str(path)) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"the file is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                        f"{e.start}); save it as UTF-8", file=str(path), line=line) from e
    return parse_spec(text, file=str(path), overrides=overrides)


def spec_to_yaml(spec: Spec) -> str:
    """The resolved spec as YAML: every default spelled out, loadable by :func:`parse_spec`."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
