"""Workflows declared as Python classes: :class:`Workflow`, :class:`State`, :func:`on`
and :func:`slot`.

A subclass of :class:`Workflow` is a workflow file written in Python, with the file
format's own keys::

    class OrderPizza(Workflow):
        \"\"\"Order a pizza.\"\"\"                    # description (its first paragraph)
        name = "order_pizza"
        examples = ["I want a pizza", "order a pizza"]
        slots = {"size": slot("choice", choices=["small", "large"])}

        ask_size = State(say="Which size?", on=on(message={"slot": "size"}, to="done"))
        done = State(say="A {size} pizza is on its way.", final=True)

The top-level keys (``name``, ``description``, ``examples``, ``slots``, ``initial``) are
class attributes; every :class:`State` attribute is a state named after the attribute,
in definition order, and the first one is the initial state unless ``initial`` says
otherwise. :func:`on` and :func:`slot` build a transition and a slot with the keys of
the file (``if_`` stands for ``if``, a Python keyword); plain dicts work as well.

:meth:`Workflow.compile` builds the very dict a YAML file holds and runs it through the
loader's own validation and :func:`~commhub.core.engine.check.check_workflow`, so a
class and the equivalent file give equal definitions and the same errors. Errors name
the class's source file and the line of the offending attribute or key (read from the
class body's syntax tree; the class line when nothing closer is known).
"""

from __future__ import annotations

import ast
import inspect
from typing import Any, ClassVar

from commhub.core.engine.check import check_workflow
from commhub.core.engine.load import _from_data  # the file loader's validation step, shared
from commhub.core.engine.model import Path_, WorkflowDef

__all__ = ["TOP_LEVEL_KEYS", "State", "Workflow", "on", "slot"]

# The keys of a workflow file that are class attributes (``states`` are State attributes).
TOP_LEVEL_KEYS = ("name", "description", "examples", "slots", "initial")
_RESERVED = (*TOP_LEVEL_KEYS, "states", "source")
_LIST_KEYS = ("say", "emit", "on")  # state keys whose single item stands for a list of one


def _given(**keys: Any) -> dict[str, Any]:
    """The keys that were given: None means absent, as ``key: null`` does in a file."""
    return {key: value for key, value in keys.items() if value is not None}


class State:
    """One state, with the keys of a state in a file; ``data`` is that state's mapping.

    The values take the same forms as in a file (``say`` a string, a ``{text, buttons}``
    mapping or a list of them; ``on`` one transition or a list; ``emit`` a name, a
    ``{name, data}`` mapping or a list). Nothing is checked here but the key names (an
    unknown keyword is a ``TypeError``); :meth:`Workflow.compile` checks the rest.
    """

    __slots__ = ("data",)

    def __init__(
        self,
        *,
        say: str | dict[str, Any] | list[str | dict[str, Any]] | None = None,
        set: dict[str, Any] | None = None,  # the file's key
        emit: str | dict[str, Any] | list[str | dict[str, Any]] | None = None,
        on: dict[str, Any] | list[dict[str, Any]] | None = None,
        final: bool | None = None,
        reprompt: str | None = None,
        handoff: bool | None = None,
        ask: dict[str, Any] | None = None,
        expires: bool | None = None,
    ) -> None:
        self.data: dict[str, Any] = _given(
            say=say, set=set, emit=emit, on=on, final=final, reprompt=reprompt,
            handoff=handoff, ask=ask, expires=expires,
        )

    def __repr__(self) -> str:
        return f"State({', '.join(f'{k}={v!r}' for k, v in self.data.items())})"


def on(
    *,
    to: str,
    message: str | dict[str, Any] | None = None,
    button: str | None = None,
    event: str | None = None,
    timeout: float | None = None,
    reply: str | None = None,
    if_: dict[str, Any] | None = None,
    invalid: str | None = None,
) -> dict[str, Any]:
    """A transition's mapping: one trigger (``message``, ``button``, ``event``,
    ``timeout`` or ``reply``), its target ``to``, and optionally ``if_`` (the file's
    ``if``) and ``invalid``. Only key names are checked here (an unknown keyword or a
    missing ``to`` is a ``TypeError``); the rest when the workflow is compiled."""
    transition = _given(message=message, button=button, event=event, timeout=timeout,
                        reply=reply, to=to, invalid=invalid)
    if if_ is not None:
        transition["if"] = if_
    return transition


def slot(
    type: str = "text",  # the file's key
    *,
    min: float | None = None,
    max: float | None = None,
    integer: bool | None = None,
    choices: list[str] | None = None,
    pattern: str | None = None,
) -> dict[str, Any]:
    """A slot's mapping, ``{type, min, max, integer, choices, pattern}``: what a file
    writes as ``size: {type: choice, choices: [...]}``. Only key names are checked here;
    options that do not fit the type are errors when the workflow is compiled."""
    return _given(type=type, min=min, max=max, integer=integer, choices=choices,
                  pattern=pattern)


class Workflow:
    """Base class of a workflow declared in Python; see the module docstring.

    Register the class itself (not an instance) from a ``register_workflows`` hook; the
    hub compiles it with :meth:`compile` at start, like a file. A workflow class cannot
    subclass another workflow class (``TypeError`` when it is defined): it is compiled
    from its own body only.
    """

    # The top-level keys, for type checkers; set them as plain class attributes.
    name: ClassVar[str]
    description: ClassVar[str]
    examples: ClassVar[list[str]]
    slots: ClassVar[dict[str, Any]]
    initial: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        bases = [b.__qualname__ for b in cls.__mro__[1:]
                 if b is not Workflow and issubclass(b, Workflow)]
        if bases:
            raise TypeError(f"workflow class {cls.__qualname__} subclasses workflow class "
                            f"{bases[0]}: a workflow class is compiled from its own body, "
                            "so subclass Workflow directly")

    @classmethod
    def compile(cls) -> WorkflowDef:
        """Build and check this class's :class:`WorkflowDef`; a new one on every call.

        Raises :class:`WorkflowError` naming the class's file and line for everything a
        file's loader and :func:`check_workflow` reject, and for a public attribute that
        is neither a top-level key, a :class:`State` nor a method, a :class:`State` named
        like a key, or a class without states. ``TypeError`` on :class:`Workflow` itself.
        """
        if cls is Workflow:
            raise TypeError("compile a subclass of Workflow, not Workflow itself")
        file, body = _class_body(cls)
        lines: dict[Path_, int] = {}
        data: dict[str, Any] = {}
        states: dict[str, Any] = {}
        if body is not None:
            lines[()] = lines[("states",)] = body.node.lineno
        name = cls.__dict__.get("name")
        problem: tuple[Path_, str] | None = None
        for attr, value in vars(cls).items():
            if attr.startswith("_") or _is_code(value):
                continue
            path: Path_ = ("states", attr) if isinstance(value, State) else (attr,)
            if body is not None and attr in body.assigned:
                _record_lines(body.assigned[attr], path, lines)
            if problem is not None:
                continue  # keep collecting lines for the error
            if isinstance(value, State):
                if attr in _RESERVED:
                    problem = (path, f"{attr!r} is a workflow key, so it cannot be a state")
                states[attr] = value.data
            elif attr in TOP_LEVEL_KEYS:
                data[attr] = value
            else:
                problem = (path, f"{attr}: not a workflow key (expected one of "
                           f"{', '.join(TOP_LEVEL_KEYS)}) nor a State")
        if problem is None and not states:
            problem = (("states",), f"workflow class {cls.__name__} has no State attribute")
        if problem is not None:
            probe = WorkflowDef.model_construct(name=name if isinstance(name, str) else "",
                                                source=file)
            probe._lines = lines
            raise probe.error(*problem)
        if "description" not in data and cls.__doc__:
            data["description"] = _summary(cls.__doc__)
            if body is not None and body.doc_line is not None:
                lines[("description",)] = body.doc_line
        data.setdefault("initial", next(iter(states)))
        defn = _from_data({**data, "states": states}, lines, file)
        check_workflow(defn)
        return defn


def _is_code(value: Any) -> bool:
    """Methods, nested classes and descriptors: allowed in the body, not workflow keys."""
    return callable(value) or isinstance(value, classmethod | staticmethod | property)


def _summary(doc: str) -> str:
    """A docstring's first paragraph on one line."""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


class _Body:
    """The syntax of a class body: its node, docstring line, and attribute values."""

    def __init__(self, node: ast.ClassDef) -> None:
        self.node = node
        self.doc_line: int | None = None
        self.assigned: dict[str, tuple[int, ast.expr]] = {}
        for stmt in node.body:
            if (stmt is node.body[0] and isinstance(stmt, ast.Expr)
                    and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)):
                self.doc_line = stmt.lineno
            elif isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    if isinstance(target, ast.Name):
                        self.assigned[target.id] = (stmt.lineno, stmt.value)
            elif (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                  and stmt.value is not None):
                self.assigned[stmt.target.id] = (stmt.lineno, stmt.value)


def _class_body(cls: type) -> tuple[str, _Body | None]:
    """The class's source file and body syntax, best effort: a class whose source cannot
    be read (defined interactively or by ``exec``) gets no lines; one without a file at
    all is named ``<class QUALNAME>``."""
    try:
        file = inspect.getsourcefile(cls) or inspect.getfile(cls)
    except TypeError:
        return f"<class {cls.__qualname__}>", None
    try:
        source, start = inspect.findsource(cls)
        tree = ast.parse("".join(source))
    except (OSError, TypeError, SyntaxError, ValueError):
        return file, None
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if first == start + 1:
                return file, _Body(node)
    return file, None


def _record_lines(assigned: tuple[int, ast.expr], path: Path_, lines: dict[Path_, int]) -> None:
    line, value = assigned
    lines[path] = line
    _walk(value, path, lines)


def _walk(node: ast.expr, path: Path_, lines: dict[Path_, int]) -> None:
    """Record the line of every key and list item of a literal value, as the YAML reader
    does: dict keys, call keywords (``on(to=...)``, ``if_`` as ``if``; ``slot``'s first
    argument as ``type``) and list items."""
    items: list[tuple[str | int, int, ast.expr]] = []
    if isinstance(node, ast.Call):
        func = node.func
        helper = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        if helper == "slot" and node.args:
            items.append(("type", node.args[0].lineno, node.args[0]))
        items += [("if" if kw.arg == "if_" else kw.arg, kw.lineno, kw.value)
                  for kw in node.keywords if kw.arg is not None]
    elif isinstance(node, ast.Dict):
        items += [(key.value, key.lineno, value) for key, value in zip(node.keys, node.values,
                                                                        strict=True)
                  if isinstance(key, ast.Constant) and isinstance(key.value, str | int)]
    elif isinstance(node, ast.List | ast.Tuple):
        for index, item in enumerate(node.elts):
            if isinstance(item, ast.Starred):
                break  # the indexes after it are unknown
            items.append((index, item.lineno, item))
    for key, line, value in items:
        lines[(*path, key)] = line
        _walk(value, (*path, key), lines)
    if (len(path) == 3 and path[0] == "states" and path[2] in _LIST_KEYS
            and not isinstance(node, ast.List | ast.Tuple)):
        _walk(node, (*path, 0), lines)  # one item without the list: it is item 0
