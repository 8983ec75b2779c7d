"""The database edge: the asyncpg pool backend (pool), and the wrappers that decide how a query
reaches it (cache, fuse, coalesce, replica); DSN handling (dsn)."""
