"""The database: SQLModel tables, engine and sessions, state transitions, Alembic migrations."""
