"""Loading a flow file: safe YAML with line marks -> a validated `FlowSpec`.

PyYAML's safe loader accepts duplicate keys silently and forgets where things were; this
module composes the node tree itself, refuses duplicates and non-standard tags, and keeps a
map from each key path to its line, so that every error can name the file, line and node.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from planner.errors import FlowFileError
from planner.models import FlowSpec

Path_ = tuple[str | int, ...]
MAX_FILE_BYTES = 2_000_000
_STANDARD_TAGS = frozenset(
    "tag:yaml.org,2002:" + t
    for t in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp", "merge", "binary")
)


@dataclass(frozen=True)
class Marks:
    """Where each key path of a YAML document sits: `(line, column)`, both 1-based."""

    file: str
    positions: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    # Where each scalar value's text starts: (line, column) of its first character, 1-based.
    texts: dict[Path_, tuple[int, int]] = field(default_factory=dict)

    def at(self, path: Path_) -> tuple[int | None, int | None]:
        """The position of `path`, or of its nearest ancestor that has one."""
        for end in range(len(path), -1, -1):
            pos = self.positions.get(path[:end])
            if pos:
                return pos
        return None, None

    def inside(self, path: Path_, text: str, offset: int) -> tuple[int | None, int | None]:
        """The file position of character `offset` of the scalar at `path` (SQL, `when:`)."""
        start = self.texts.get(path)
        if start is None:
            return self.at(path)
        inner_line = text.count("\n", 0, offset)
        inner_col = offset - (text.rfind("\n", 0, offset) + 1)
        if inner_line == 0:
            return start[0], start[1] + inner_col
        # Later lines of a block scalar keep its indentation, which is the first line's.
        return start[0] + inner_line, start[1] + inner_col

    def error(self, message: str, path: Path_, *, node: str | None = None, **kw: Any) -> FlowFileError:
        line, column = self.at(path)
        if node is None and len(path) >= 2 and path[0] == "nodes":
            node = str(path[1])
        return FlowFileError(message, file=self.file, line=line, column=column, node=node, **kw)


@dataclass(frozen=True)
class LoadedFlow:
    """A flow file that passed schema validation, with the marks to report later errors."""

    name: str
    path: Path
    spec: FlowSpec
    marks: Marks


def load_spec(path: str | os.PathLike[str]) -> LoadedFlow:
    """Read and validate one flow file. Raises `FlowFileError`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FlowFileError(f"cannot read flow file: {exc.strerror or exc}", file=path) from exc
    if len(raw) > MAX_FILE_BYTES:
        raise FlowFileError(f"flow file is larger than {MAX_FILE_BYTES} bytes", file=path, line=1)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FlowFileError("flow file is not UTF-8", file=path, line=1) from exc
    return load_text(text, file=path, name=path.stem)


def load_text(text: str, *, file: str | Path = "<string>", name: str = "flow") -> LoadedFlow:
    """Validate a flow given as YAML text. Raises `FlowFileError`."""
    data, marks = _parse_yaml(text, str(file))
    if not isinstance(data, dict):
        raise FlowFileError("a flow file must be a mapping with at least `nodes:`", file=file, line=1)
    try:
        spec = FlowSpec.model_validate(data)
    except ValidationError as exc:
        raise _translate(exc, marks) from None
    clash = next((n for n in spec.nodes if n in spec.inputs), None)
    if clash is not None:
        raise marks.error(f"{clash!r} is both an input and a node", ("nodes", clash))
    if spec.name is not None and spec.name != name:
        raise marks.error(f"`name: {spec.name}` does not match the file name {name!r}", ("name",))
    return LoadedFlow(name=name, path=Path(file), spec=spec, marks=marks)


_BOOL = "tag:yaml.org,2002:bool"


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader (libyaml's parser when present: several times faster), with YAML 1.2
    booleans: only true/false. YAML 1.1 reads `on`, `off`, `yes`, `no` as booleans, which
    would turn `retry: {on: any}` into `{True: "any"}`."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _parse_yaml(text: str, file: str) -> tuple[Any, Marks]:
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        marks = Marks(file)
        if root is not None:
            _check_size(root)
            _walk(root, (), marks, set(), text.splitlines())
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        column = mark.column + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise FlowFileError(f"YAML: {problem}", file=file, line=line, column=column) from None
    except yaml.YAMLError as exc:
        raise FlowFileError(f"YAML: {exc}", file=file) from None
    except RecursionError:
        raise FlowFileError("YAML is nested too deeply", file=file) from None
    finally:
        loader.dispose()
    return data, marks


MAX_EXPANDED_NODES = 200_000


def _check_size(root: yaml.Node) -> None:
    """Refuse alias bombs: the size the document has once every alias is expanded."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a recursive alias counts once; construction refuses it later
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in node.value)
        else:
            total = 1
        sizes[id(node)] = total
        if total > MAX_EXPANDED_NODES:
            raise yaml.MarkedYAMLError(
                problem=f"document expands to more than {MAX_EXPANDED_NODES} values (alias bomb?)",
                problem_mark=node.start_mark,
            )
        return total

    size(root)


def _walk(node: yaml.Node, path: Path_, marks: Marks, done: set[int], lines: list[str]) -> None:
    # An aliased node is walked once: its positions are those of its first appearance.
    if id(node) in done:
        return
    done.add(id(node))
    if node.tag not in _STANDARD_TAGS:
        raise yaml.MarkedYAMLError(problem=f"tag {node.tag!r} is not allowed", problem_mark=node.start_mark)
    if isinstance(node, yaml.ScalarNode):
        marks.texts[path] = _text_start(node, lines)
    elif isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node)
            if key in seen:
                where = _node_name(path + (key,))
                raise yaml.MarkedYAMLError(
                    problem=f"duplicate key {key!r}{where} (first at line {seen[key]})",
                    problem_mark=key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
            marks.positions[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _walk(value_node, path + (key,), marks, done, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            marks.positions[path + (index,)] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _walk(item, path + (index,), marks, done, lines)


def _text_start(node: yaml.ScalarNode, lines: list[str]) -> tuple[int, int]:
    """Where a scalar's text begins: after a quote, or on the line after a `|`/`>` indicator."""
    line, column = node.start_mark.line, node.start_mark.column
    if node.style in ("|", ">"):
        line += 1
        while line < len(lines) and not lines[line].strip():
            line += 1
        content = lines[line] if line < len(lines) else ""
        return line + 1, len(content) - len(content.lstrip(" ")) + 1
    return line + 1, column + 1 + (1 if node.style in ("'", '"') else 0)


def _node_name(path: Path_) -> str:
    return f" in node {path[1]!r}" if len(path) >= 3 and path[0] == "nodes" else ""


def _translate(exc: ValidationError, marks: Marks) -> FlowFileError:
    """pydantic's errors -> one FlowFileError pointing at the first; the rest follow in the text."""
    messages: list[tuple[Path_, str]] = []
    for err in exc.errors(include_url=False):
        loc: Path_ = tuple(err["loc"])
        if len(loc) >= 3 and loc[0] == "nodes":
            loc = loc[:2] + loc[3:]  # drop the union tag ("sql"/"call") pydantic inserts
        messages.append((loc, _describe(err, loc)))
    path, first = messages[0]
    more = f" (and {len(messages) - 1} more: " + "; ".join(m for _, m in messages[1:4]) + ")" if len(messages) > 1 else ""
    return marks.error(first + more, path)


def _describe(err: Any, loc: Path_) -> str:
    kind = err["type"]
    field_path = ".".join(str(p) for p in (loc[2:] if loc[:1] == ("nodes",) else loc))
    if kind == "extra_forbidden":
        return f"unknown key {str(loc[-1])!r}"
    if kind == "missing":
        return f"missing required key {str(loc[-1])!r}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{field_path}: {msg}" if field_path else msg
