"""Loading a flow file: its text read within bounds -> safe YAML (`planner.lang.safeyaml`) -> a
validated `FlowSpec`.

A file is read only if it is a regular file of at most `MAX_FILE_BYTES`, never waiting on a
FIFO or a device, and is stamped (`FileStamp`) so that a cache can tell a change later.
pydantic's errors become one `FlowFileError` at the first problem's line and node, the others
listed in its text and in `.problems`, with a did-you-mean for an unknown key.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import ValidationError

from planner.errors import FlowError, FlowFileError
from planner.lang.models import FlowSpec
from planner.lang.safeyaml import Marks, Path_, parse_yaml
from planner.results import error_text

MAX_FILE_BYTES = 2_000_000
UNEXPECTED = "PLN199"
"""The code of a load failure that no specific check caught (see `unexpected_error`)."""


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
        data, marks = parse_yaml(text, str(file))
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
    except (FlowError, MemoryError):
        raise  # running out of memory is the process's condition, not the file's
    except Exception as exc:  # the backstop: whatever no check above caught still names the file
        raise unexpected_error(exc, file) from exc


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
