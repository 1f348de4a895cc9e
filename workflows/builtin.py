"""commhub's built-in workflows, contributed through the same hook as any plugin's.

The YAML files in ``definitions/`` are registered as one folder; the hub loads and
checks them with :func:`commhub.core.workflow.load_workflows` at start.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from commhub.core.hookspecs import hookimpl

__all__ = ["DEFINITIONS", "register_workflows"]

DEFINITIONS = Path(__file__).parent / "definitions"


@hookimpl
def register_workflows(register: Callable[[Any], None]) -> None:
    """Register ``definitions/``: book_table, support_request and the fallback."""
    register(DEFINITIONS)
