"""Print the DSN of the demo database, creating and filling it if needed.

    export DATABASE_URL=$(python -m examples.demo_database)            # the embedded server
    export DATABASE_URL=$(python -m examples.demo_database postgresql://localhost/postgres)

The database is `planner_demo` on the server given (else the embedded PostgreSQL that
`planner demo` uses); progress goes to stderr, the DSN alone to stdout.
"""

from __future__ import annotations

import asyncio
import sys

from planner.demo.run import demo_dsn


def main() -> None:
    server = sys.argv[1] if len(sys.argv) > 1 else None
    print(asyncio.run(demo_dsn(server, lambda message: print(message, file=sys.stderr))))


if __name__ == "__main__":
    main()
