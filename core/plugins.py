"""The plugin manager: built-ins and outside plugins through the same hooks.

Built like tox's: :func:`build_plugin_manager` registers ``DEFAULT_PLUGINS``, loads the
``commhub`` entry-point group, unregisters the names in ``COMMHUB_DISABLE_PLUGINS``,
then ``check_pending()`` so that a misspelled hook fails loudly at start.

:class:`Plugins` wraps the raw ``pm.hook`` calls with typed methods that validate what
each plugin contributes, in one place.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import pluggy

from commhub.core import hookspecs
from commhub.core.channel import Channel
from commhub.core.classify import Classifier
from commhub.core.engine.classes import Workflow
from commhub.core.envelope import Message
from commhub.core.subjects import valid_token

__all__ = ["DEFAULT_PLUGINS", "Plugins", "PluginInfo", "PluginError", "build_plugin_manager"]

# commhub's own features, registered exactly like a third party's.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "commhub.channels.websocket",
    "commhub.channels.http",
    "commhub.channels.telegram",
    "commhub.plugins.tfidf",
    "commhub.plugins.minilm",
    "commhub.workflows.builtin",
)

T = TypeVar("T")

DROP = False  # what a middleware hook returns to stop a message


class PluginError(RuntimeError):
    """A plugin could not be loaded or contributed something invalid; says which and why."""


@dataclass
class PluginInfo:
    """One line of ``commhub plugins``."""

    name: str
    version: str
    origin: str
    hooks: list[str] = field(default_factory=list)


def _disabled_from_env() -> set[str]:
    raw = os.environ.get("COMMHUB_DISABLE_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def build_plugin_manager(
    disabled: Iterable[str] = (), extra: Iterable[object] = (), entry_points: bool = True
) -> pluggy.PluginManager:
    """Create the manager: built-ins, entry points, ``extra`` objects, minus disabled ones."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in set(disabled) | _disabled_from_env():
        pm.set_blocked(name)  # a blocked name is skipped by register() and entry points
    for name in DEFAULT_PLUGINS:
        if pm.is_blocked(name):
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise PluginError(f"built-in plugin {name} failed to import: {exc}") from exc
        pm.register(module, name=name)
    if entry_points:
        try:
            pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        except Exception as exc:
            raise PluginError(f"a plugin of the {hookspecs.PROJECT!r} entry-point group "
                              f"failed to load: {exc!r}") from exc
    for plugin in extra:
        try:
            pm.register(plugin)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {plugin!r} has an invalid hook: {exc}") from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from exc
    return pm


class Plugins:
    """Typed access to the hooks. Not thread-safe; used from the event loop."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm

    @classmethod
    def load(cls, disabled: Iterable[str] = (), extra: Iterable[object] = ()) -> Plugins:
        return cls(build_plugin_manager(disabled, extra))

    # -- contributions ------------------------------------------------------------
    def channels(self) -> dict[str, type[Channel]]:
        """Every registered channel class by name; duplicates and bad names raise."""
        return self._classes("register_channels", Channel, "channel",
                             valid_token, "a token-like name")

    def classifiers(self) -> dict[str, type[Classifier]]:
        """Every registered classifier class by name; duplicates and bad names raise."""
        return self._classes("register_classifiers", Classifier, "classifier",
                             bool, "a name")

    def _classes(
        self,
        hook_name: str,
        base: type[T],
        kind: str,
        name_ok: Callable[[str], bool],
        name_rule: str,
    ) -> dict[str, type[T]]:
        """Collect the ``base`` subclasses a ``register_*`` hook contributes, by ``name``.

        Every error names the plugin that contributed the bad class (and for a duplicate,
        both classes and both plugins).
        """
        found: dict[str, type[T]] = {}
        owners: dict[str, str] = {}

        def register(plugin: str, cls: type) -> None:
            if not (inspect.isclass(cls) and issubclass(cls, base)):
                raise PluginError(f"plugin {plugin}: {hook_name} got {cls!r}, "
                                  f"not a {base.__name__} subclass")
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name_ok(name):
                raise PluginError(f"plugin {plugin}: {kind} {cls.__qualname__} needs {name_rule}")
            if name in found:
                raise PluginError(f"two {kind}s are named {name!r}: {found[name].__qualname__} "
                                  f"of plugin {owners[name]} and {cls.__qualname__} of "
                                  f"plugin {plugin}")
            found[name], owners[name] = cls, plugin

        self._contribute(hook_name, register)
        return found

    def workflow_sources(self) -> list[Any]:
        """Everything plugins registered as workflows, in order: paths (a string becomes a
        :class:`Path`), definitions, and :class:`Workflow` classes compiled to definitions.

        Raises :class:`~commhub.core.workflow.WorkflowError` naming the file and line for a
        broken :class:`Workflow` class; files and definitions are checked when loaded.
        """
        found: list[Any] = []
        self._contribute("register_workflows", lambda _plugin, item: found.append(item))
        return [_workflow_source(item) for item in found]

    def _contribute(self, hook_name: str, register: Callable[[str, Any], None]) -> None:
        """Call each implementation of a ``register_*`` hook in pluggy's order, with a
        ``register`` callback that knows which plugin it was given to (for the errors)."""
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            args = {"register": functools.partial(register, _plugin_label(impl))}
            impl.function(*(args[name] for name in impl.argnames))  # as pluggy calls it

    # -- lifecycle and middleware ----------------------------------------------------
    async def startup(self, hub: Any) -> None:
        await _await_all(self.pm.hook.startup(hub=hub))

    async def shutdown(self, hub: Any) -> None:
        await _await_all(self.pm.hook.shutdown(hub=hub))

    async def inbound_message(self, message: Message) -> Message | None:
        """Run the inbound middleware chain; None means a plugin dropped the message."""
        return await self._chain("inbound_message", message)

    async def outbound_message(self, message: Message) -> Message | None:
        """Run the outbound middleware chain; None means a plugin dropped the message."""
        return await self._chain("outbound_message", message)

    async def _chain(self, hook_name: str, message: Message) -> Message | None:
        hook = getattr(self.pm.hook, hook_name)
        impls = hook.get_hookimpls()
        if not impls:  # the hot path: most hubs have no middleware
            return message
        # pluggy calls the last registered first; keep that order for the chain.
        for impl in reversed(impls):
            result = impl.function(message=message)
            if inspect.isawaitable(result):
                result = await result
            if result is DROP:
                return None
            if isinstance(result, Message):
                message = result
        return message

    # -- introspection -------------------------------------------------------------
    def describe(self) -> list[PluginInfo]:
        """Name, version, origin and hooks of every registered plugin."""
        dists = {id(plugin): dist for plugin, dist in self.pm.list_plugin_distinfo()}
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            dist = dists.get(id(plugin))
            if dist is not None:
                version, origin = dist.version, f"entry point ({dist.project_name})"
            else:
                version = _own_version()
                origin = "built-in" if name in DEFAULT_PLUGINS else "registered in code"
            hooks = sorted(impl.name for impl in _impls_of(self.pm, plugin))
            infos.append(PluginInfo(name, version, origin, hooks))
        return infos


def _workflow_source(item: Any) -> Any:
    if isinstance(item, str):
        return Path(item)
    if inspect.isclass(item) and issubclass(item, Workflow):
        return item.compile()
    return item


def _plugin_label(impl: Any) -> str:
    # Built-ins and entry points have readable names; objects registered in code get
    # pluggy's id() name, so show the object instead.
    name = str(impl.plugin_name)
    return repr(impl.plugin) if name.isdigit() else repr(name)


def _impls_of(pm: pluggy.PluginManager, plugin: object) -> list[Any]:
    return list(pm.get_hookcallers(plugin) or [])


def _own_version() -> str:
    try:
        return metadata.version("commhub")
    except metadata.PackageNotFoundError:
        return "0+unknown"


async def _await_all(results: list[Any]) -> None:
    for result in results:
        if inspect.isawaitable(result):
            await result
