"""What the tests share, so that a test file imports no other test file.

- `db_fixtures`: the demo database (a template cloned per test: `demo_dsn`), `pg_dsn`, and the
  session's PgBouncer (`pgbouncer`); registered by tests/conftest.py. The server itself is
  planner's own pytest plugin's (`planner_pg`).
- `pgbouncer`: starts and stops the `pgbouncer` binary in front of a server.
- `replica_pair`: a primary and a streaming replica of their own (the `replica` tier).
- `cli`: the `planner` console script run as a user runs it (the `subprocess` tier).
- `spies`: `Counting`, a backend wrapper that records what reaches the database.
- `stacks`: planners whose coalesced batches a test forces (the `stacks` fixture is in
  tests/db/conftest.py).

`tests/nodes.py`, the Python functions the test flows call (`call: tests.nodes:add`), stays
where the flows name it.
"""
