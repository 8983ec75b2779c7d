"""What the tests share, so that no test file imports another.

- `db_fixtures`: the demo database (a template cloned per test: `demo_dsn`), `pg_dsn`, and the
  session's PgBouncer (`pgbouncer`); registered by tests/conftest.py. The server itself is
  planner's own pytest plugin's (`planner_pg`).
- `pgbouncer`: starts and stops the `pgbouncer` binary in front of a server.
- `replica_pair`: a primary and a streaming replica of their own (the `replica` tier).

`tests/nodes.py`, the Python functions the test flows call (`call: tests.nodes:add`), stays
where the flows name it.
"""
