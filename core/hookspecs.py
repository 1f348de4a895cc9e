"""Every hook a commhub plugin can implement, in one file.

A plugin is a module (or object) with functions named like these specs and marked with
``@commhub.core.hookimpl``; outside plugins are found through the ``commhub`` entry-point
group. commhub's own channels, classifier and workflows use these same hooks.

**Contributing hooks** (``register_*``) receive a ``register`` callback and call it once per
thing they contribute; the manager validates each one where it is registered, so a bad
contribution fails at start with the plugin's name.

**Calls.** The manager calls every implementation through pluggy, in pluggy's call order
(last registered first). The contributing and middleware hooks are called one plugin at
a time (so ``register`` knows its plugin, and each middleware gets the previous one's
message) inside one pluggy call that their wrappers wrap; see ``core/plugins.py``.

**Async rule.** pluggy is synchronous. The lifecycle and middleware hooks may be written
``async def``: the manager awaits each awaitable result, one implementation after
another. A hook that has a ``wrapper``/``hookwrapper`` implementation cannot also have
an ``async def`` one (a wrapper runs in one synchronous call): that is refused at load.
The middleware hooks are ``firstresult``: each pluggy call of them runs one
implementation, and a wrapper's ``yield`` gives the chain's outcome itself, not a list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from commhub.core.envelope import Message

__all__ = ["hookspec", "hookimpl", "PROJECT"]

PROJECT = "commhub"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_channels(register: Callable[[type], None]) -> None:
    """Contribute channel classes: ``register(MyChannel)``.

    A channel class subclasses :class:`commhub.core.channel.Channel`; its ``name`` is a
    subject token and must be unique across plugins.
    """


@hookspec
def register_classifiers(register: Callable[[type], None]) -> None:
    """Contribute classifier classes: ``register(MyClassifier)``.

    A classifier class subclasses :class:`commhub.core.classify.Classifier`; the
    ``classifier`` setting picks one by ``name`` (default ``tfidf``).
    """


@hookspec
def register_workflows(register: Callable[[Any], None]) -> None:
    """Contribute workflows: ``register(path)`` for a YAML/TOML file or folder of them,
    ``register(definition)`` for a :class:`commhub.core.workflow.WorkflowDef`, or
    ``register(SomeWorkflow)`` for a :class:`commhub.core.workflow.Workflow` subclass.

    Definitions are checked when registered; a broken one stops the hub with the
    file, line and problem.
    """


@hookspec
def startup(hub: Any) -> Any:
    """Called once the hub is connected and its components run; may be async."""


@hookspec
def shutdown(hub: Any) -> Any:
    """Called when the hub stops, before the bus closes; may be async."""


@hookspec(firstresult=True)
def inbound_message(message: Message) -> Any:
    """Middleware on every inbound message before it is routed; may be async.

    Return None to pass the message on unchanged, a :class:`Message` to replace it, or
    ``False`` to drop it (it stays recorded; it is just not routed). Implementations run
    one after another, each seeing the previous one's result. A wrapper wraps the whole
    chain: its ``yield`` gives the final Message, or ``False`` if one dropped it.
    """


@hookspec(firstresult=True)
def outbound_message(message: Message) -> Any:
    """Middleware on every outbound message the router produces, before it is published;
    may be async. Same return rule as :func:`inbound_message`.
    """
