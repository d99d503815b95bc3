"""What every report reads of a job's ``results.json`` the same way."""

from __future__ import annotations

from typing import Any


def finished(run: dict[str, Any]) -> bool:
    """Whether a job's results count: ``status`` ok, or no status at all (results written before the field
    existed); failed, stopped, killed, broken and missing jobs do not."""
    return run.get("status", "ok") == "ok"
