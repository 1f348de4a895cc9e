"""Workflow definitions: the public face of the model, the checks and the loader.

A workflow is declared in a YAML or TOML file, as a :class:`Workflow` subclass, or built
in Python as a :class:`WorkflowDef`; all become one validated model. This module gathers
the names flow authors and the hub use; the work is done in modules with one job each:

* ``workflow_model``: the definition model (slots, states, transitions, templates) and
  :class:`WorkflowError`, whose text reads ``FILE:LINE: problem``;
* ``workflow_check``: the checks run on every definition at load (targets, reachability,
  ways out, slots, templates);
* ``workflow_load``: reading YAML and TOML with line numbers, folders, duplicates;
* ``workflow_class``: workflows as Python classes (:class:`Workflow`, :class:`State`,
  :func:`on`, :func:`slot`), compiled through the same validation and checks.
"""

from __future__ import annotations

from commhub.core.engine.check import check_workflow
from commhub.core.engine.classes import State, Workflow, on, slot
from commhub.core.engine.load import load_workflow_file, load_workflows
from commhub.core.engine.model import (
    SLOT_TYPES,
    WORKFLOW_FILE_SUFFIXES,
    ButtonDef,
    EmitDef,
    Guard,
    MessageTrigger,
    SayDef,
    SlotDef,
    StateDef,
    TransitionDef,
    WorkflowDef,
    WorkflowError,
    render_template,
    template_fields,
)

__all__ = [
    "SLOT_TYPES",
    "WORKFLOW_FILE_SUFFIXES",
    "ButtonDef",
    "EmitDef",
    "Guard",
    "MessageTrigger",
    "SayDef",
    "SlotDef",
    "State",
    "StateDef",
    "TransitionDef",
    "Workflow",
    "WorkflowDef",
    "WorkflowError",
    "check_workflow",
    "load_workflow_file",
    "load_workflows",
    "on",
    "render_template",
    "slot",
    "template_fields",
]
