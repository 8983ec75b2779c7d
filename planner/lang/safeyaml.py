"""Safe YAML with line marks: a flow file's text -> plain data and `Marks` (where each key sits).

PyYAML's safe loader accepts duplicate keys silently and forgets where things were; this
module composes the node tree itself, refuses duplicates and non-standard tags, bounds the
nesting and what aliases expand to, reads booleans as YAML 1.2 does (only true/false), and
keeps a map from each key path to its line, so that every error can name the file, line and
node. A syntax error is said in plain words, with the fix. What the data must look like is
`planner.lang.models`' question (`planner.lang.loader` asks it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from planner.errors import FlowFileError
from planner.lang.models import MAX_NUMBER_CHARS

Path_ = tuple[str | int, ...]
# Deeper than any real flow (a node's `default:` or `with:` is a few levels down); low enough that
# every recursive step that follows (templates, getters, JSON of results) stays far from
# Python's recursion limit. Counted with aliases expanded.
MAX_DEPTH = 64
MAX_EXPANDED_NODES = 200_000

_STANDARD_TAGS = frozenset(
    "tag:yaml.org,2002:" + t
    for t in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp", "merge", "binary")
)
_MERGE = "tag:yaml.org,2002:merge"


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

    def node_at(self, where: tuple[int, int]) -> str | None:
        """The node whose text holds file position `where` (line, column), if any: for errors
        that only know a position, such as a YAML value that cannot be constructed."""
        top = [pos for path, pos in self.positions.items() if len(path) == 1]
        nodes = self.positions.get(("nodes",))
        if nodes is None or where < nodes:
            return None
        if any(nodes < pos <= where for pos in top):
            return None  # past the end of `nodes:`, in a later top-level key
        before = [(pos, path[1]) for path, pos in self.positions.items()
                  if len(path) == 2 and path[0] == "nodes" and pos <= where]
        return str(max(before)[1]) if before else None

    def error(self, message: str, path: Path_, *, node: str | None = None, **kw: Any) -> FlowFileError:
        line, column = self.at(path)
        if node is None and len(path) >= 2 and path[0] == "nodes":
            node = str(path[1])
        return FlowFileError(message, file=self.file, line=line, column=column, node=node, **kw)


_BOOL = "tag:yaml.org,2002:bool"


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader (libyaml's parser when present: several times faster), with YAML 1.2
    booleans: only true/false. YAML 1.1 reads `on`, `off`, `yes`, `no` as booleans, which
    would turn `retry: {on: any}` into `{True: "any"}`."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)\Z"), list("tTfF"))


def _problem(message: str, node: yaml.Node) -> yaml.MarkedYAMLError:
    return yaml.MarkedYAMLError(problem=message, problem_mark=node.start_mark)


def _scalar(construct: Callable[[Any, yaml.ScalarNode], Any], kind: str) -> Callable[[Any, yaml.ScalarNode], Any]:
    """One of PyYAML's scalar constructors, turned into YAML errors at the value's line: a value
    its type refuses (`2024-02-30`, `0b_`, or anything under an explicit `!!bool`/`!!timestamp`
    tag, where PyYAML fails with KeyError or AttributeError), and for numbers, a literal too long
    to convert (str -> int is quadratic; `1:59:59:...` more so) or a float that overflows to inf."""

    def build(loader: Any, node: yaml.ScalarNode) -> Any:
        shown = node.value if len(node.value) <= 40 else node.value[:40] + "..."
        if kind == "number" and len(node.value) > MAX_NUMBER_CHARS:
            raise _problem(f"number {shown} is {len(node.value)} characters long (at most {MAX_NUMBER_CHARS})", node)
        try:
            value = construct(loader, node)
        except (ValueError, KeyError, AttributeError) as exc:
            reason = f": {exc}" if type(exc) is ValueError else ""  # the calendar's or int()'s reason
            raise _problem(f"{shown!r} is not a valid {kind}{reason}", node) from None
        if isinstance(value, float) and math.isinf(value) and "inf" not in node.value.lower():
            raise _problem(f"number {shown} is too large (write .inf for infinity)", node)
        return value

    return build


for _tag, _construct, _kind in (
    ("int", yaml.SafeLoader.construct_yaml_int, "number"),
    ("float", yaml.SafeLoader.construct_yaml_float, "number"),
    ("bool", yaml.SafeLoader.construct_yaml_bool, "boolean"),
    ("timestamp", yaml.SafeLoader.construct_yaml_timestamp, "date or time"),
):
    _Loader.add_constructor("tag:yaml.org,2002:" + _tag, _scalar(_construct, _kind))


def parse_yaml(text: str, file: str) -> tuple[Any, Marks]:
    """The data of YAML document `text` and its marks. Raises `FlowFileError` naming `file`,
    the line and, within `nodes:`, the node."""
    loader = _Loader(text)
    marks = Marks(file)
    try:
        root = loader.get_single_node()
        if root is not None:
            marks.positions[()] = _position(root)  # where an error about the whole document points
            _Walker(loader, marks, text.splitlines()).walk(root, ())
            _check_expanded(root)
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        column = mark.column + 1 if mark else None
        node = marks.node_at((line, column)) if line is not None and column is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        if isinstance(exc, (yaml.scanner.ScannerError, yaml.parser.ParserError, yaml.composer.ComposerError)):
            problem = "syntax error: " + _plain_syntax(exc, text)
        raise FlowFileError(f"YAML: {problem}", file=file, line=line, column=column, node=node) from None
    except yaml.reader.ReaderError as exc:
        # A character YAML does not allow. Its offset counts bytes (libyaml) or characters
        # (PyYAML), so the line is found from the character: the first one refused is its first.
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        line = text.count("\n", 0, max(text.find(chr(code)), 0)) + 1
        raise FlowFileError(f"YAML: {exc.reason} (U+{code:04X})", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise FlowFileError(f"YAML: {exc}", file=file) from None
    except RecursionError:  # PyYAML's pure-Python composer, when libyaml is absent, recurses
        raise FlowFileError("YAML is nested too deeply", file=file) from None
    finally:
        loader.dispose()
    return data, marks


def _plain_syntax(exc: yaml.MarkedYAMLError, text: str) -> str:
    """A YAML parser's complaint in plain words, with the fix; the parser's own words when unknown.

    libyaml and PyYAML word their errors differently; both are covered."""
    problem = exc.problem or exc.context or "invalid YAML"
    opened = f" at line {exc.context_mark.line + 1}" if exc.context_mark is not None else ""
    mark = exc.problem_mark
    rest = ""  # the text from the problem's position to the end of its line
    if mark is not None:
        lines = text.splitlines()
        if mark.line < len(lines):
            rest = lines[mark.line][mark.column:]
    here = rest[:1]
    if "',' or '}'" in problem:
        return f"the `{{` opened{opened} is not closed: a `,` or `}}` was expected here"
    if "',' or ']'" in problem:
        return f"the `[` opened{opened} is not closed: a `,` or `]` was expected here"
    if "mapping values are not allowed" in problem:
        return ("a second `: ` where a value was expected: quote a value that contains `: ` "
                "(sql: \"SELECT a: b\"), or write it as a block (`sql: |`, the text on the lines below)")
    if "cannot start any token" in problem:
        if here == "\t" or "'\\t'" in problem:
            return "a tab character: YAML indents with spaces, never tabs"
        return f"{here or 'this character'!r} cannot start a value: put the value in quotes"
    if "unexpected end of stream" in problem and "quoted" in str(exc.context):
        return f"the quoted text that starts{opened} is never closed"
    if "undefined alias" in problem:
        alias = re.match(r"\*([^\s,\[\]{}]+)", rest)
        name = alias.group(1) if alias else "name"
        return f"`*{name}` refers to an anchor `&{name}` that is not defined above it"
    if "'-' indicator" in problem:
        return (f"every item of the list that starts{opened} must begin with `- `, in the same column "
                "(a `key:` cannot follow list items at that indentation)")
    if "expected key" in problem or "<block end>" in problem:
        return (f"this line's indentation does not fit the mapping that starts{opened}: "
                "keys of one mapping start in the same column")
    if "could not find expected ':'" in problem:
        return "a line that is not `key: value` (a `:` is missing?)"
    if "node content" in problem:
        return "a value is missing here"
    return problem


class _Walker:
    """One pass over the composed document, each node once: tags, keys, depth, and the marks.

    It checks the nesting depth as written before going deeper, so it and every later
    recursive pass over the document are bounded by MAX_DEPTH.
    """

    def __init__(self, loader: Any, marks: Marks, lines: list[str]) -> None:
        self.loader, self.marks, self.lines = loader, marks, lines
        self.done: set[int] = set()

    def walk(self, node: yaml.Node, path: Path_) -> None:
        # An aliased node is walked once: its positions are those of its first appearance.
        if id(node) in self.done:
            return
        self.done.add(id(node))
        _check_tag(node)
        if len(path) >= MAX_DEPTH:
            raise _problem(f"nested more than {MAX_DEPTH} levels deep", node)
        if isinstance(node, yaml.ScalarNode):
            self.marks.texts[path] = _text_start(node, self.lines)
        elif isinstance(node, yaml.MappingNode):
            self._mapping(node, path)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.marks.positions[path + (index,)] = _position(item)
                self.walk(item, path + (index,))

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> None:
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node)
            if key in seen:
                raise _problem(
                    f"duplicate key {key_node.value!r}{_node_name(path + (key_node.value,))} (first at line {seen[key]})",
                    key_node,
                )
            seen[key] = key_node.start_mark.line + 1
            step = key if isinstance(key, str) or type(key) is int else key_node.value
            self.marks.positions[path + (step,)] = _position(key_node)
            self.walk(value_node, path + (step,))

    def _key(self, key_node: yaml.Node) -> Any:
        """The key as the document will hold it, so `1` and `0x1` are one duplicated key."""
        if not isinstance(key_node, yaml.ScalarNode):
            raise _problem("a key must be a single value, not a list or a mapping", key_node)
        _check_tag(key_node)
        if key_node.tag == _MERGE:
            return key_node.value
        return self.loader.construct_object(key_node)


def _check_tag(node: yaml.Node) -> None:
    if node.tag not in _STANDARD_TAGS:
        raise _problem(f"tag {node.tag!r} is not allowed", node)


def _position(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _check_expanded(root: yaml.Node) -> None:
    """Refuse what only expanding aliases reveals: alias bombs, a value that contains itself,
    and nesting deeper than MAX_DEPTH. The recursion follows the document as written, whose
    depth the walk has bounded; each node is measured once."""
    measured: dict[int, tuple[int, int]] = {}  # id -> (size, height), aliases expanded
    open_: set[int] = set()

    def measure(node: yaml.Node) -> tuple[int, int]:
        if id(node) in measured:
            return measured[id(node)]
        if id(node) in open_:
            raise _problem("an alias refers to a value that contains it", node)
        open_.add(id(node))
        size, height = 1, 1
        for child in _children(node):
            child_size, child_height = measure(child)
            size, height = size + child_size, max(height, child_height + 1)
            if size > MAX_EXPANDED_NODES:
                raise _problem(f"document expands to more than {MAX_EXPANDED_NODES} values (alias bomb?)", node)
            if height > MAX_DEPTH:
                raise _problem(f"nested more than {MAX_DEPTH} levels deep once aliases are expanded", node)
        open_.discard(id(node))
        measured[id(node)] = (size, height)
        return size, height

    measure(root)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


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
