"""Flow shapes for the executor benchmarks and property tests, built as YAML text."""

from __future__ import annotations

import asyncio
import random
from typing import Any

# The seed's process_buffered shape, with the latencies of its analysis (ms).
SEED_SHAPE: dict[str, tuple[list[str], float]] = {
    "instance": ([], 20),
    "conversation": (["instance"], 30),
    "webhook_config": (["instance"], 50),
    "is_escalated": (["instance"], 50),
    "is_duplicate": (["conversation"], 50),
    "history": (["conversation"], 100),
    "recent_messages": (["conversation"], 80),
    "store_message": (["conversation", "is_duplicate"], 30),
}
UNEVEN_SHAPE: dict[str, tuple[list[str], float]] = {
    "a": ([], 10),
    "b": (["a"], 100),
    "c": ([], 100),
    "d": (["c"], 10),
}


async def zero(**deps: Any) -> int:
    """A node that does nothing but return: what is left is the engine's own cost."""
    return len(deps)


async def sleep_ms(ms: float, **deps: Any) -> float:
    await asyncio.sleep(ms / 1000)
    return ms


def fan_out(n: int) -> dict[str, list[str]]:
    return {"root": [], **{f"n{i}": ["root"] for i in range(n - 1)}}


def chain(n: int) -> dict[str, list[str]]:
    return {f"n{i}": ([f"n{i - 1}"] if i else []) for i in range(n)}


def random_dag(n: int, deps_each: int = 3, seed: int = 1) -> dict[str, list[str]]:
    rng = random.Random(seed)
    return {f"n{i}": sorted({f"n{rng.randrange(i)}" for _ in range(min(i, deps_each))}, key=lambda s: int(s[1:])) for i in range(n)}


def flow_yaml(deps: dict[str, list[str]], call: str, extra: dict[str, str] | None = None) -> str:
    """A flow whose every node calls `call` with its dependencies' values as arguments."""
    lines = ["nodes:"]
    for name, needs in deps.items():
        args = ", ".join(f"{d}: ${d}" for d in needs)
        more = (extra or {}).get(name, "")
        lines.append(f"  {name}: {{call: '{call}', with: {{{args}{', ' if args and more else ''}{more}}}}}")
    return "\n".join(lines) + "\n"
