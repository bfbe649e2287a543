"""Celery app and thin task shells; the work itself lives in plain functions in sibling modules."""
