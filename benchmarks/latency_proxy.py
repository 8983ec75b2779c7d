"""The latency proxy used by the benchmarks (it lives in `planner.demo`, which `planner demo --rtt` uses too).

    python -m benchmarks.latency_proxy --one-way-ms 10     # prints a DSN through the proxy; Ctrl-C stops
    python -m benchmarks.latency_proxy --one-way-ms 10 --serve
        # the same, and each `requests` line on stdin is answered with the round trips counted so
        # far; closing stdin stops it (`ProxyProcess` drives it this way)
"""

from __future__ import annotations

from planner.demo.latency_proxy import LatencyProxy, ProxyProcess, main

__all__ = ["LatencyProxy", "ProxyProcess"]


if __name__ == "__main__":
    main()
