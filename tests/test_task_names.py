"""Task names are a public contract (Flower's async-apply, scripts) declared once, in worker/steps.py."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.env import PROJECT_ROOT

APPLICATION = ("core", "db", "scraper", "download", "detect", "crop", "train", "predict", "worker", "waifu", "bench")
DECLARATION = Path("worker/steps.py")


def task_name_literals(path: Path) -> list[str]:
    """`"worker.tasks..."` string constants in code (docstrings, which only mention names, left aside)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        f"{path}:{node.lineno} {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith("worker.tasks.")
        and id(node) not in docstrings
    ]


def test_task_names_are_written_only_in_the_step_table() -> None:
    sources = [p for package in APPLICATION for p in sorted((PROJECT_ROOT / package).rglob("*.py"))]
    assert len(sources) > 50, "the application code was not found"
    declared = task_name_literals(PROJECT_ROOT / DECLARATION)
    assert len(declared) == 9, declared  # the check sees the names where they do belong
    elsewhere = [hit for p in sources if p.relative_to(PROJECT_ROOT) != DECLARATION for hit in task_name_literals(p)]
    assert elsewhere == [], "read task names from worker.steps (STEPS[...].task, JOBS[...].task)"


def test_every_declared_task_is_registered_and_routed_to_its_queue() -> None:
    import worker.tasks  # noqa: F401  (registers the shells)
    from worker.app import app
    from worker.steps import JOBS, STEPS

    for declared in (*STEPS.values(), *JOBS.values()):
        assert declared.task in app.tasks, declared
        assert app.amqp.router.route({}, declared.task)["queue"].name == declared.queue, declared


def test_earlier_task_names_still_run_their_step() -> None:
    """detect_faces and resize_face were the public names of the detect and crop tasks (Flower calls,
    scripts): a message sent to either still reaches the same step, on the same queue, with its time limits."""
    import worker.tasks  # noqa: F401  (registers the shells)
    from core.settings import Settings
    from worker.app import app
    from worker.limits import task_annotations
    from worker.steps import STEPS

    limits = task_annotations(Settings())
    for step_name, old in (("detect", "worker.tasks.detect_faces"), ("crop", "worker.tasks.resize_face")):
        step = STEPS[step_name]
        assert step.task == f"worker.tasks.{step_name}"
        assert old in step.aliases and old in app.tasks
        assert app.tasks[old].step is step
        assert app.amqp.router.route({}, old)["queue"].name == step.queue
        assert limits[old] == limits[step.task]
