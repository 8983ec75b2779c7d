"""The ready set of one run: graphlib's protocol (`done(node)` releases what waited for it).

Pure and synchronous, on adjacency dicts: it knows nothing of tasks, values or policy, which
makes the executor's order of events testable alone. Each node keeps the number of its
dependencies not yet settled; settling a node lowers its successors' counts and hands back
those that reach zero.

    >>> ready = Ready({"a": ("c",), "b": ("c",), "c": ()}, {"a": 0, "b": 0, "c": 2})
    >>> ready.roots(("a", "b", "c"))
    ['a', 'b']
    >>> released = []
    >>> ready.done("a", released.append), ready.done("b", released.append), released
    (0, 1, ['c'])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence


class Ready:
    """Counts of unsettled dependencies for the nodes of one run (those in `waiting`)."""

    __slots__ = ("_successors", "_waiting", "_unsettled")

    def __init__(self, successors: Mapping[str, Sequence[str]], waiting: dict[str, int]) -> None:
        self._successors = successors
        self._waiting = waiting  # owned: counts drop as nodes settle
        self._unsettled = len(waiting)

    @property
    def unsettled(self) -> int:
        """Nodes of the run not yet marked done."""
        return self._unsettled

    def __contains__(self, name: object) -> bool:
        return name in self._waiting

    def roots(self, order: Iterable[str]) -> list[str]:
        """The nodes that wait for nothing, in `order`."""
        waiting = self._waiting
        return [n for n in order if waiting.get(n) == 0]

    def done(self, name: str, released: Callable[[str], object] | None = None) -> int:
        """Mark `name` settled; pass each successor that now waits for nothing to `released`.
        Returns how many were released."""
        self._unsettled -= 1
        waiting = self._waiting
        count = 0
        for successor in self._successors[name]:
            if successor in waiting:
                left = waiting[successor] = waiting[successor] - 1
                if left == 0:
                    count += 1
                    if released is not None:
                        released(successor)
        return count
