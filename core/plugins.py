"""The plugin manager: built-ins and outside plugins through the same hooks.

Built like tox's: :func:`build_plugin_manager` registers ``DEFAULT_PLUGINS``, loads the
``commhub`` entry-point group, skips the names of the ``disable_plugins`` setting, then
``check_pending()`` so that a misspelled hook fails loudly at start.

:class:`Plugins` wraps the ``pm.hook`` calls with typed methods that validate what each
plugin contributes, in one place. Every implementation is called by pluggy (so
``wrapper=True``/``hookwrapper=True`` implementations run and pluggy's tracing and call
monitoring see every call); how the contributing and middleware hooks manage that is
in :class:`_Runner`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import pluggy

from commhub.core import hookspecs
from commhub.core.channel import Channel
from commhub.core.classify import Classifier
from commhub.core.config import load_settings
from commhub.core.engine.classes import Workflow
from commhub.core.envelope import Message
from commhub.core.hookspecs import hookimpl
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

CONTRIBUTING_HOOKS = ("register_channels", "register_classifiers", "register_workflows")
MIDDLEWARE_HOOKS = ("inbound_message", "outbound_message")
RUNNER_NAME = "commhub.core.plugins:runner"  # the name _Runner is registered under


class PluginError(RuntimeError):
    """A plugin could not be loaded or contributed something invalid; says which and why."""


@dataclass
class PluginInfo:
    """One line of ``commhub plugins``."""

    name: str
    version: str
    origin: str
    hooks: list[str] = field(default_factory=list)


def build_plugin_manager(
    disabled: Iterable[str] | None = None,
    extra: Iterable[object] = (),
    entry_points: bool = True,
) -> pluggy.PluginManager:
    """Create the manager: built-ins, entry points, ``extra`` objects, minus disabled ones.

    ``disabled`` is the ``disable_plugins`` setting; None reads it from the settings
    (``COMMHUB_DISABLE_PLUGINS``, ``COMMHUB_CONFIG``), so there is one parser for it.
    """
    if disabled is None:
        disabled = load_settings().disable_plugins
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in set(disabled):
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
    """Typed access to the hooks. Not thread-safe; used from the event loop.

    Creating one registers a :class:`_Runner` in ``pm`` and checks that every hook can be
    called as documented (see :func:`_check_hook`); a plugin that breaks a rule is a
    :class:`PluginError` naming it.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._plans: dict[str, _Plan] = {}
        self._callers: dict[str, pluggy.HookCaller] = {
            name: getattr(pm.hook, name) for name in (*CONTRIBUTING_HOOKS, *MIDDLEWARE_HOOKS)}
        old = pm.get_plugin(RUNNER_NAME)
        if old is not None:  # a second Plugins on one manager: the newest runs the chains
            pm.unregister(old)
        pm.unblock(RUNNER_NAME)
        pm.register(_Runner(self), name=RUNNER_NAME)
        for name, caller in vars(pm.hook).items():
            if isinstance(caller, pluggy.HookCaller) and caller.spec is not None:
                _check_hook(name, caller.get_hookimpls())
        for name in (*CONTRIBUTING_HOOKS, *MIDDLEWARE_HOOKS):
            self._plan(name)  # a plugin that cannot be called one by one fails now

    @classmethod
    def load(
        cls, disabled: Iterable[str] | None = None, extra: Iterable[object] = ()
    ) -> Plugins:
        """Build the manager (see :func:`build_plugin_manager`) and wrap it."""
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

    def _contribute(self, hook_name: str, collect: Callable[[str, Any], None]) -> None:
        """Call a ``register_*`` hook: each plugin's implementation gets a ``register``
        that knows the plugin; the hook's wrappers, if any, wrap all of it."""
        plan = self._plan(hook_name)
        register = _Register(collect, plan.wrappers)  # what a wrapper registers is its own
        if plan.wrappers:
            plan.call(register=register)  # the wrappers around the runner's _register_each
        else:
            self._register_each(hook_name, register)

    def _register_each(self, hook_name: str, register: _Register) -> None:
        """One pluggy call per plugin, each with its own ``register``."""
        for label, call in self._plan(hook_name).steps:
            call(register=_Register(register.collect, label))

    # -- lifecycle and middleware ----------------------------------------------------
    async def startup(self, hub: Any) -> None:
        await _await_all(self.pm.hook.startup(hub=hub))

    async def shutdown(self, hub: Any) -> None:
        await _await_all(self.pm.hook.shutdown(hub=hub))

    async def inbound_message(self, message: Message) -> Message | None:
        """Run the inbound middleware chain; None means a plugin dropped the message."""
        return await self._middleware("inbound_message", message)

    async def outbound_message(self, message: Message) -> Message | None:
        """Run the outbound middleware chain; None means a plugin dropped the message."""
        return await self._middleware("outbound_message", message)

    async def _middleware(self, hook_name: str, message: Message) -> Message | None:
        plan = self._plan(hook_name)
        if plan.idle:  # the hot path: most hubs have no middleware
            return message
        if plan.wrappers:
            result = plan.call(message=message)  # the wrappers around the runner's chain
        else:  # nothing to wrap the chain: run it without that extra pluggy call
            result = self._chain(hook_name, message, plan)
        if inspect.isawaitable(result):  # an async implementation is in the chain
            result = await result
        if result is DROP:
            return None
        return result if isinstance(result, Message) else message

    def _chain(self, hook_name: str, message: Message, plan: _Plan | None = None) -> Any:
        """The middleware chain: one pluggy call per implementation, each with the
        message the previous one returned, in pluggy's call order. The runner calls it
        with the plan :meth:`_middleware` just made.

        Returns the final message or ``DROP``; at the first awaitable result, a coroutine
        that awaits it and runs the rest (only when no wrapper wraps the chain: a wrapper
        runs inside one synchronous pluggy call, and would see the coroutine).
        """
        plan = plan or self._plans.get(hook_name) or self._plan(hook_name)
        steps = iter(plan.steps)
        for label, call in steps:
            result = call(message=message)
            if inspect.isawaitable(result):
                if plan.wrappers:
                    _discard(result)
                    raise PluginError(
                        f"plugin {label}: {hook_name} returned an awaitable, but plugin "
                        f"{plan.wrappers} wraps {hook_name}, and a wrapper cannot wrap "
                        "an async implementation (pluggy calls it synchronously)")
                return _finish_chain(result, message, steps)
            if result is DROP:
                return DROP
            if isinstance(result, Message):
                message = result
        return message

    def _plan(self, hook_name: str) -> _Plan:
        """How to call a hook, made again whenever its implementations change."""
        impls = self._callers[hook_name].get_hookimpls()
        plan = self._plans.get(hook_name)
        if plan is None or plan.impls != impls:
            plan = self._plans[hook_name] = _make_plan(self.pm, hook_name, impls)
        return plan

    # -- introspection -------------------------------------------------------------
    def describe(self) -> list[PluginInfo]:
        """Name, version, origin and hooks of every registered plugin."""
        dists = {id(plugin): dist for plugin, dist in self.pm.list_plugin_distinfo()}
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None or name == RUNNER_NAME:
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


# -- calling implementations one by one through pluggy -----------------------------------
class _Runner:
    """commhub's own implementation of the contributing and middleware hooks.

    pluggy calls every implementation of a hook with the same arguments. That does not
    fit two of commhub's rules: a ``register`` callback must know which plugin it was
    given to (so that errors name the plugin), and a middleware implementation must get
    the message the previous one returned (a chain). So each implementation is called on
    its own, through a ``pm.subset_hook_caller`` that holds only that plugin: a real
    pluggy call, seen by ``pm.enable_tracing()`` and ``add_hookcall_monitoring``.

    When the hook has wrappers, those calls are made by this plugin's implementation,
    which :class:`Plugins` calls through the subset of the hook that holds only it and
    the wrappers. So a ``wrapper=True`` or ``hookwrapper=True`` implementation wraps the
    whole hook call once, exactly as in a plain pluggy call: it sees the arguments,
    everything the plugins do happens at its ``yield``, and it may change the result.
    (Without wrappers, :class:`Plugins` makes the per-plugin calls itself, saving a
    pluggy call per message.) The other ways considered: one subset call per plugin with
    the wrappers in each runs a wrapper once per plugin (and never, with no plugin);
    ``HookCaller._hookexec`` with a hand-made implementation list is pluggy's private API.
    """

    def __init__(self, plugins: Plugins) -> None:
        self._plugins = plugins

    # A call of these hooks that does not come from Plugins (its register is not a
    # _Register) already calls every implementation itself: nothing to add then.
    @hookimpl
    def register_channels(self, register: Any) -> None:
        if isinstance(register, _Register):
            self._plugins._register_each("register_channels", register)

    @hookimpl
    def register_classifiers(self, register: Any) -> None:
        if isinstance(register, _Register):
            self._plugins._register_each("register_classifiers", register)

    @hookimpl
    def register_workflows(self, register: Any) -> None:
        if isinstance(register, _Register):
            self._plugins._register_each("register_workflows", register)

    @hookimpl
    def inbound_message(self, message: Message) -> Any:
        return self._plugins._chain("inbound_message", message)

    @hookimpl
    def outbound_message(self, message: Message) -> Any:
        return self._plugins._chain("outbound_message", message)


class _Register:
    """The ``register`` argument of a ``register_*`` call: passes each contribution on
    with the plugin it was given to."""

    __slots__ = ("collect", "plugin")

    def __init__(self, collect: Callable[[str, Any], None], plugin: str) -> None:
        self.collect = collect
        self.plugin = plugin

    def __call__(self, item: Any) -> None:
        self.collect(self.plugin, item)

    def __repr__(self) -> str:  # as pluggy's tracing shows it
        return f"<register of plugin {self.plugin}>"


@dataclass(frozen=True)
class _Plan:
    """How :class:`Plugins` calls one hook, for the implementations it was made from."""

    impls: list[Any]
    call: pluggy.HookCaller  # the hook's wrappers around the runner (used if any)
    steps: tuple[tuple[str, pluggy.HookCaller], ...]  # (plugin, its implementation alone)
    wrappers: str  # the wrapping plugins, for messages ("" when there is none)

    @property
    def idle(self) -> bool:
        """Nothing but the runner implements the hook: calling it would change nothing."""
        return not self.steps and not self.wrappers


def _make_plan(pm: pluggy.PluginManager, hook_name: str, impls: list[Any]) -> _Plan:
    runner = pm.get_plugin(RUNNER_NAME)
    plain = [impl for impl in impls if not _is_wrapper(impl) and impl.plugin is not runner]
    for impl in impls:
        try:
            hash(impl.plugin)
        except TypeError:
            raise PluginError(
                f"plugin {_plugin_label(impl)} cannot be hashed, and commhub calls each "
                f"{hook_name} implementation through pm.subset_hook_caller, which needs "
                "that: register a module, a class or an object with __hash__") from None
    everyone = {impl.plugin for impl in impls}
    steps = tuple(
        (_plugin_label(impl), pm.subset_hook_caller(hook_name, everyone - {impl.plugin}))
        # pluggy calls the last registered first; keep that order.
        for impl in reversed(plain)
    )
    wrappers = " and ".join(_plugin_label(impl) for impl in impls if _is_wrapper(impl))
    call = pm.subset_hook_caller(hook_name, {impl.plugin for impl in plain})
    return _Plan(impls, call, steps, wrappers)


def _check_hook(hook_name: str, impls: list[Any]) -> None:
    """Refuse, at load, the implementations that could not be called as documented."""
    wrappers = [impl for impl in impls if _is_wrapper(impl)]
    seen: set[int] = set()
    for impl in impls:
        if id(impl.plugin) in seen:
            raise PluginError(
                f"plugin {_plugin_label(impl)} implements {hook_name} more than once; "
                "commhub calls each plugin's implementation on its own, so keep one")
        seen.add(id(impl.plugin))
        if _is_wrapper(impl) or not _is_async(impl.function):
            continue
        if hook_name in CONTRIBUTING_HOOKS:
            raise PluginError(
                f"plugin {_plugin_label(impl)}: {hook_name} must be a plain function, not "
                "async (it runs once at start, and its contributions are validated as "
                "they are registered)")
        if wrappers:
            raise PluginError(
                f"plugin {_plugin_label(wrappers[0])} wraps {hook_name}, but plugin "
                f"{_plugin_label(impl)} implements it with async def: pluggy runs a "
                "wrapper in one synchronous call, so it cannot wrap an async "
                "implementation; make one of them synchronous or disable one "
                "(COMMHUB_DISABLE_PLUGINS)")


def _is_wrapper(impl: Any) -> bool:
    return bool(impl.wrapper or impl.hookwrapper)


def _is_async(function: Any) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)


async def _finish_chain(
    pending: Any, message: Message, steps: Iterator[tuple[str, pluggy.HookCaller]]
) -> Any:
    """The rest of a middleware chain from its first awaitable result (see Plugins._chain)."""
    result = await pending
    while True:
        if result is DROP:
            return DROP
        if isinstance(result, Message):
            message = result
        step = next(steps, None)
        if step is None:
            return message
        result = step[1](message=message)
        if inspect.isawaitable(result):
            result = await result


def _discard(awaitable: Any) -> None:
    close = getattr(awaitable, "close", None)  # a coroutine never awaited would warn
    if callable(close):
        close()


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
