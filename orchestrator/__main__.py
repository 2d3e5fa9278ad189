"""``python -m orchestrator ...`` — same as the ``orchestrator`` console script."""

from orchestrator.cli import run

run()
