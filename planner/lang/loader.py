"""Loading a flow file: safe YAML with line marks -> a validated `FlowSpec`.

PyYAML's safe loader accepts duplicate keys silently and forgets where things were; this
module composes the node tree itself, refuses duplicates and non-standard tags, and keeps a
map from each key path to its line, so that every error can name the file, line and node.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from pydantic import ValidationError

from planner.errors import FlowError, FlowFileError
from planner.lang.models import MAX_NUMBER_CHARS, FlowSpec
from planner.results import error_text

Path_ = tuple[str | int, ...]
MAX_FILE_BYTES = 2_000_000
# Deeper than any real flow (a node's `default:` or `with:` is a few levels down); low enough that
# every recursive step that follows (templates, getters, JSON of results) stays far from
# Python's recursion limit. Counted with aliases expanded.
MAX_DEPTH = 64
MAX_EXPANDED_NODES = 200_000
UNEXPECTED = "PLN199"
"""The code of a load failure that no specific check caught (see `unexpected_error`)."""

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


class FileStamp(NamedTuple):
    """What a stat says of a flow file, to tell whether it changed, and how.

    Never compared with the clock: a file copied with its times (`cp -p`, rsync), or written
    on a machine whose clock runs ahead, is a change like any other. Another file at the path
    (`dev`, `ino`) is a replacement by rename, complete at once; the same file with another
    stamp was rewritten in place, perhaps not yet to the end.
    """

    dev: int
    ino: int
    mtime_ns: int
    ctime_ns: int
    size: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def same_file(self, other: FileStamp) -> bool:
        """Whether `other` is a stamp of this very file (rewritten or not), not of another one."""
        return (self.dev, self.ino) == (other.dev, other.ino)


@dataclass(frozen=True)
class LoadedFlow:
    """A flow file that passed schema validation, with the marks to report later errors."""

    name: str
    path: Path
    spec: FlowSpec
    marks: Marks
    # The file's stamp as it was read (None for text given directly): a cache can compare it
    # with a later stat without a race between its stat and this read.
    stamp: FileStamp | None = None


def unexpected_error(exc: Exception, file: str | Path | None) -> FlowFileError:
    """The backstop at the loading boundary: a failure no specific check caught is still a
    FlowFileError naming the file, never an internal error of the caller."""
    what = "nested too deeply" if isinstance(exc, RecursionError) else error_text(exc)
    return FlowFileError(f"cannot load this flow ({what})", file=file, code=UNEXPECTED)


def load_spec(path: str | os.PathLike[str]) -> LoadedFlow:
    """Read and validate one flow file. Raises `FlowFileError`."""
    path = Path(path)
    text, stamp = read_flow_text(path)
    return dataclasses.replace(load_text(text, file=path, name=path.stem), stamp=stamp)


def read_flow_text(path: str | os.PathLike[str], *, limit: int = MAX_FILE_BYTES) -> tuple[str, FileStamp]:
    """The text of a flow file and its stamp (of the very file read). Raises `FlowFileError`.

    Only a regular file of at most `limit` bytes is read, and never more than `limit + 1`
    bytes of it: a FIFO, a device (a link to /dev/zero) or a file that grows while it is read
    is refused without waiting on it or holding more than that in memory.
    """
    path = Path(path)
    try:
        raw, stamp = _read_bounded(path, limit)
    except OSError as exc:
        raise FlowFileError(f"cannot read flow file: {exc.strerror or exc}", file=path) from exc
    try:
        return raw.decode("utf-8"), stamp
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise FlowFileError(f"flow file is not UTF-8 (byte {exc.start + 1})", file=path, line=line) from None


def _read_bounded(path: Path, limit: int) -> tuple[bytes, FileStamp]:
    # O_NONBLOCK: opening a FIFO must not wait for a writer to appear. It changes nothing for
    # the regular files that are read.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FlowFileError(f"not a regular file ({_file_kind(st.st_mode)}): a flow must be a file", file=path)
        if st.st_size > limit:
            raise FlowFileError(f"flow file is larger than {limit} bytes ({st.st_size} bytes)", file=path, line=1)
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(raw) > limit:  # it grew after the stat: refused all the same
        raise FlowFileError(f"flow file is larger than {limit} bytes", file=path, line=1)
    return raw, FileStamp.of(st)


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def load_text(text: str, *, file: str | Path = "<string>", name: str = "flow") -> LoadedFlow:
    """Validate a flow given as YAML text. Raises `FlowFileError`."""
    try:
        return _load_text(text, file, name)
    except (FlowError, MemoryError):
        raise  # running out of memory is the process's condition, not the file's
    except Exception as exc:
        raise unexpected_error(exc, file) from exc


def _load_text(text: str, file: str | Path, name: str) -> LoadedFlow:
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


def _parse_yaml(text: str, file: str) -> tuple[Any, Marks]:
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


def _translate(exc: ValidationError, marks: Marks) -> FlowFileError:
    """pydantic's errors -> one FlowFileError pointing at the first; the rest follow in the text."""
    messages: list[tuple[Path_, str]] = []
    # An unknown key first: `nodez:` explains the missing `nodes:` better than the other way round.
    for err in sorted(exc.errors(include_url=False), key=lambda e: e["type"] == "missing"):
        loc: Path_ = tuple(err["loc"])
        if len(loc) >= 3 and loc[0] == "nodes":
            loc = loc[:2] + loc[3:]  # drop the union tag ("sql"/"call") pydantic inserts
        messages.append((loc, _describe(err, loc)))
    # The members of a union that all refuse one value (`sql: 42` is neither a string nor a
    # list) are one problem at one place, said once: "... or ...".
    places: dict[tuple[int | None, int | None, str | None], int] = {}
    merged: list[tuple[Path_, str]] = []
    for path, message in messages:
        at = marks.error(message, path)
        key = (at.line, at.column, at.node)
        if key in places:
            first_path, first_message = merged[places[key]]
            merged[places[key]] = (first_path, f"{first_message}, or {message}")
        else:
            places[key] = len(merged)
            merged.append((path, message))
    messages = merged
    errors = [marks.error(message, path) for path, message in messages]
    if len(errors) == 1:
        return errors[0]
    # The first error's text counts the rest and names each one's node and line (the same
    # mistake in four nodes is four problems, not one); `.problems` has each with its place.
    rest = [f"{f'node {e.node!r}: ' if e.node else ''}{e.message} (line {e.line})" for e in errors[1:]]
    shown = "; ".join(rest[:3]) + (f"; {len(rest) - 3} more" if len(rest) > 3 else "")
    first = marks.error(f"{errors[0].message} (and {len(rest)} more: {shown})", messages[0][0])
    first.problems = errors  # each with its own text and place, the first's without the count
    return first


def _describe(err: Any, loc: Path_) -> str:
    kind = err["type"]
    field_path = ".".join(str(p) for p in (loc[2:] if loc[:1] == ("nodes",) else loc))
    if kind == "extra_forbidden":
        key, raw = str(loc[-1]), tuple(err["loc"])
        hint = _did_you_mean(key, _keys_at(raw))
        if not hint and len(raw) == 4 and raw[0] == "nodes" and raw[2] in ("sql", "call"):
            other = "call" if raw[2] == "sql" else "sql"
            if key in _keys_at(raw[:2] + (other, key)):
                hint = f" (`{key}:` is a key of `{other}:` nodes)"
        return f"unknown key {key!r}{hint}"
    if kind == "node_kind" and isinstance(err.get("input"), dict):
        keys = [str(k) for k in err["input"]]
        close = next((k for k in keys if _did_you_mean(k, ["sql", "call"])), None)
        hint = f" (is {close!r} meant to be {_closest(close, ['sql', 'call'])!r}?)" if close else ""
        return f"{err['msg']}{hint}"
    if kind == "missing":
        return f"missing required key {str(loc[-1])!r}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{field_path}: {msg}" if field_path else msg


def _keys_at(loc: Path_) -> list[str]:
    """The keys allowed where pydantic found an unknown one (`loc` as pydantic gives it, the node
    kind's tag included), for a did-you-mean."""
    from planner.lang.models import CallNode, InputSpec, Retry, Settings, SqlNode

    parent = loc[:-1]
    model: type[Any] | None = None
    if not parent:
        model = FlowSpec
    elif parent == ("settings",):
        model = Settings
    elif len(parent) == 2 and parent[0] == "inputs":
        model = InputSpec
    elif len(parent) >= 3 and parent[0] == "nodes":
        kind = SqlNode if parent[2] == "sql" else CallNode if parent[2] == "call" else None
        model = kind if len(parent) == 3 else Retry if parent[3:] == ("retry",) else None
    if model is None:
        return []
    return [info.alias or name for name, info in model.model_fields.items()]


def _closest(word: str, choices: list[str]) -> str | None:
    import difflib

    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = _closest(word, choices)
    return f" (did you mean {close!r}?)" if close else ""
