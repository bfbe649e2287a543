"""The ids the tables' keys can hold, for code that checks input before any database is opened (the CLI
imports no SQLAlchemy at start-up)."""

# posts are BIGINT (db.models.ID); faces and model versions INTEGER: PostgreSQL refuses a larger number in a
# query ("integer out of range"), so a larger id is bad input, not a database error
MAX_BIGINT_ID = 2**63 - 1
MAX_INTEGER_ID = 2**31 - 1
