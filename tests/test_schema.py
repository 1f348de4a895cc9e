"""``commhub schema`` compiles in Ajv's strict mode and says what the hub enforces.

Ajv is the most used JSON Schema validator, and its default is strict mode, which
refuses schemas with keywords it would otherwise ignore. npm packages cannot be
fetched while the tests run, so the rules are checked here on their own (the checker is
itself tested on schemas that break them); when ``node`` can ``require('ajv')`` (set
NODE_PATH to an install), the schema is also compiled by the real Ajv.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from commhub.core.envelope import (
    RECORD_TYPES,
    Message,
    Record,
    Sender,
    WorkflowInput,
    json_schema,
    new_id,
    record_problem,
)
from commhub.core.subjects import valid_id, valid_token

# -- Ajv's strict mode, as rules -----------------------------------------------------
# Where they come from: Ajv v8's documentation, docs/strict-mode.md in
# ajv-validator/ajv ("Prohibit ignored keywords", "Prevent unexpected validation",
# "Strict types"), and the keywords its default class (draft-07) knows:
# lib/vocabularies/draft7.ts = core + validation + applicator + format + metadata +
# content (lib/vocabularies/core/index.ts, validation/index.ts, applicator/index.ts,
# metadata.ts), plus "type" and "$comment", which the compiler handles itself.
# "discriminator" is known only with the option discriminator: true, so it is not here.
AJV_KEYWORDS = frozenset({
    # core
    "$schema", "$id", "$defs", "definitions", "$ref", "$comment", "type",
    # validation
    "maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum", "multipleOf",
    "maxLength", "minLength", "pattern", "maxProperties", "minProperties", "required",
    "maxItems", "minItems", "uniqueItems", "nullable", "const", "enum",
    # applicator
    "not", "anyOf", "oneOf", "allOf", "if", "then", "else", "additionalItems", "items",
    "contains", "propertyNames", "additionalProperties", "dependencies", "properties",
    "patternProperties",
    # format, metadata, content
    "format", "title", "description", "default", "deprecated", "readOnly", "writeOnly",
    "examples", "contentMediaType", "contentEncoding", "contentSchema",
})
# Ajv itself defines no format: "unknown formats throw exception during schema
# compilation"; the standard ones come from the separate ajv-formats package.
AJV_FORMATS: frozenset[str] = frozenset()
# Keywords that apply to one type only ("Require applicable types": such a keyword needs
# a "type" keyword for that type in the same schema, or a parent schema applying to the
# same data, not through $ref).
TYPE_KEYWORDS = {
    "object": {"properties", "required", "additionalProperties", "patternProperties",
               "propertyNames", "dependencies", "maxProperties", "minProperties"},
    "array": {"items", "additionalItems", "contains", "maxItems", "minItems", "uniqueItems"},
    "string": {"pattern", "maxLength", "minLength"},
    "number": {"maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum", "multipleOf"},
}
# Subschemas: where the walker goes.
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf")
SCHEMA_VALUES = ("not", "if", "then", "else", "additionalProperties", "additionalItems",
                 "contains", "propertyNames")
# Applicators whose subschemas apply to the same data as their parent: a "type" of the
# parent counts for them.
SAME_DATA = {"anyOf", "oneOf", "allOf", "not", "if", "then", "else"}


def _types(schema: dict[str, Any]) -> set[str]:
    declared = schema.get("type", [])
    types = set(declared if isinstance(declared, list) else [declared])
    if "integer" in types:
        types.add("number")  # "Type number can be narrowed to integer"
    return types


def _subschemas(schema: dict[str, Any], path: str) -> Iterator[tuple[str, str, Any]]:
    """(keyword, path, subschema) of every subschema directly under ``schema``."""
    for key in SCHEMA_MAPS:
        for name, sub in schema.get(key, {}).items():
            yield key, f"{path}/{key}/{name}", sub
    for key in SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key, [])):
            yield key, f"{path}/{key}/{i}", sub
    for key in SCHEMA_VALUES:
        if key in schema:
            yield key, f"{path}/{key}", schema[key]
    items = schema.get("items")
    if isinstance(items, list):
        for i, sub in enumerate(items):
            yield "items", f"{path}/items/{i}", sub
    elif items is not None:
        yield "items", f"{path}/items", items
    for name, dep in schema.get("dependencies", {}).items():
        if isinstance(dep, dict):
            yield "dependencies", f"{path}/dependencies/{name}", dep


def _resolves(root: dict[str, Any], ref: str) -> bool:
    if not ref.startswith("#/"):
        return False
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return isinstance(node, dict)


def ajv_strict_problems(root: dict[str, Any]) -> list[str]:
    """What Ajv's strict mode (with strictTypes, strictRequired and strictTuples made
    errors, allowUnionTypes off) would refuse in ``root``, one line per problem."""
    problems: list[str] = []

    def check(schema: Any, path: str, inherited: set[str], known: set[str]) -> None:
        if isinstance(schema, bool):
            return
        if not isinstance(schema, dict):
            problems.append(f"{path}: a schema must be an object or a boolean")
            return
        problems.extend(f"{path}: unknown keyword {key!r}"
                        for key in schema if key not in AJV_KEYWORDS)
        if "format" in schema and schema["format"] not in AJV_FORMATS:
            problems.append(f"{path}: unknown format {schema['format']!r}")
        if "additionalItems" in schema and not isinstance(schema.get("items"), list):
            problems.append(f"{path}: additionalItems without an array of items is ignored")
        if ("then" in schema or "else" in schema) != ("if" in schema):
            problems.append(f"{path}: if without then/else, or then/else without if")
        if ("maxContains" in schema or "minContains" in schema) and "contains" not in schema:
            problems.append(f"{path}: maxContains/minContains without contains")
        declared = schema.get("type")
        if isinstance(declared, list) and len([t for t in declared if t != "null"]) > 1:
            problems.append(f"{path}: union type {declared} (use anyOf)")
        types = _types(schema) | inherited
        for type_name, keywords in TYPE_KEYWORDS.items():
            used = sorted(keywords & set(schema))
            if used and type_name not in types:
                problems.append(f"{path}: {used} need type {type_name!r}")
        properties = known | set(schema.get("properties", {}))
        missing = [name for name in schema.get("required", []) if name not in properties]
        if missing:
            problems.append(f"{path}: required {missing} not defined in properties")
        if isinstance(schema.get("items"), list) and not (
            "minItems" in schema and ("maxItems" in schema or schema.get("additionalItems")
                                      is False)
        ):
            problems.append(f"{path}: unconstrained tuple")
        for pattern in schema.get("patternProperties", {}):
            overlapping = [p for p in schema.get("properties", {}) if re.search(pattern, p)]
            if overlapping:
                problems.append(f"{path}: patternProperties {pattern!r} match {overlapping}")
        if "pattern" in schema:
            try:
                re.compile(schema["pattern"])
            except re.error as exc:
                problems.append(f"{path}: pattern does not compile: {exc}")
        if "$ref" in schema and not _resolves(root, schema["$ref"]):
            problems.append(f"{path}: $ref {schema['$ref']!r} does not resolve")
        for keyword, sub_path, sub in _subschemas(schema, path):
            same = keyword in SAME_DATA
            check(sub, sub_path, types if same else set(), properties if same else set())

    if "$schema" in root:
        problems.append("#: $schema names a meta-schema Ajv's default class may not have")
    check(root, "#", set(), set())
    return problems


# -- the checker catches what it should ------------------------------------------------
@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"anyOf": [{"type": "string"}], "discriminator": {"propertyName": "type"}},
         "unknown keyword 'discriminator'"),
        ({"type": "string", "format": "date-time"}, "unknown format 'date-time'"),
        ({"type": ["string", "number"]}, "union type"),
        ({"properties": {"a": {"type": "string"}}}, "need type 'object'"),
        ({"type": "object", "properties": {}, "required": ["a"]}, "required ['a'] not defined"),
        ({"pattern": "^a$"}, "need type 'string'"),
        ({"type": "array", "items": [{"type": "string"}]}, "unconstrained tuple"),
        ({"$ref": "#/$defs/Nope"}, "does not resolve"),
        ({"type": "object", "if": {"type": "object"}}, "if without then/else"),
        ({"$schema": "https://json-schema.org/draft/2020-12/schema"}, "$schema"),
    ],
)
def test_the_checker_refuses_what_ajv_strict_mode_refuses(
    schema: dict[str, Any], problem: str
) -> None:
    assert any(problem in found for found in ajv_strict_problems(schema))


def test_the_checker_accepts_anyof_branches_under_a_typed_parent() -> None:
    schema = {"type": "object", "anyOf": [{"properties": {"a": {"type": "string"}},
                                           "required": ["a"]}],
              "$defs": {"X": {"type": ["string", "null"], "minLength": 1}}}
    assert ajv_strict_problems(schema) == []


def test_msgspecs_own_schema_was_refused() -> None:
    """What commhub printed before: msgspec's schema carries an OpenAPI discriminator."""
    raw = msgspec.json.schema(Record)  # type: ignore[arg-type]
    assert "#: unknown keyword 'discriminator'" in ajv_strict_problems(raw)


# -- commhub schema --------------------------------------------------------------------
def test_commhub_schema_passes_ajv_strict_mode_rules() -> None:
    assert ajv_strict_problems(json_schema()) == []


def test_commhub_schema_says_what_is_enforced() -> None:
    """Id length and shape, conversation (and a message's channel) as one subject token,
    ``type`` optional, the shape of buttons: as ``record_problem`` applies them."""
    schema = json_schema()
    defs = schema["$defs"]
    assert [ref["$ref"] for ref in schema["anyOf"]] == [
        f"#/$defs/{t.__name__}" for t in RECORD_TYPES
    ]
    for record_type in RECORD_TYPES:
        assert "type" not in defs[record_type.__name__]["required"], record_type.__name__

    id_pattern = re.compile(defs["Message"]["properties"]["id"]["pattern"])
    assert defs["WorkflowInput"]["properties"]["id"] == defs["Message"]["properties"]["id"]
    for value in ["x1", "a" * 15, "a" * 16, "a" * 128, "a" * 129, new_id(), "has.dots-in-it-ok",
                  "with space in it!!"]:
        assert bool(id_pattern.fullmatch(value)) == valid_id(value), value
        message = Message(id=value, conversation="c1", channel="sms", direction="out",
                          sender=Sender(id="bot"))
        assert (record_problem("p.out.sms.c1", message) is None) == valid_id(value), value

    token = re.compile(defs["Message"]["properties"]["conversation"]["pattern"])
    for value in ["c1", "a.b", "a*", "", "x" * 128, "x" * 129, "ok_-1"]:
        assert bool(token.fullmatch(value)) == valid_token(value), value
    for name in ("Message", "WorkflowInput", "Classification", "WorkflowEvent"):
        assert defs[name]["properties"]["conversation"]["pattern"] == token.pattern, name
    assert defs["Message"]["properties"]["channel"]["pattern"] == token.pattern
    assert {"type": "string", "pattern": token.pattern} in (
        defs["ChannelEvent"]["properties"]["conversation"]["anyOf"])

    payload = defs["Message"]["properties"]["payload"]["anyOf"][0]
    for key in ("buttons", "quick_replies"):
        assert {"type": "array", "items": {"$ref": "#/$defs/Button"}} in (
            payload["properties"][key]["anyOf"])
    assert defs["Button"]["required"] == ["title"]
    assert defs["Button"]["properties"]["title"] == {"type": "string"}
    no_title = Message(id=new_id(), conversation="c1", channel="sms", direction="out",
                       sender=Sender(id="bot"), payload={"buttons": [{"payload": {}}]})
    assert record_problem("p.out.sms.c1", no_title) is not None
    untagged = WorkflowInput(id=new_id(), conversation="c1", event="paid")
    assert record_problem("p.wf.c1", untagged) is None


def _node_has_ajv() -> str | None:
    """Why real Ajv cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "node is not installed"
    found = subprocess.run(["node", "-e", "require('ajv')"], capture_output=True, timeout=30)
    if found.returncode != 0:
        return ("node cannot require('ajv') (npm packages are not fetched by the tests; "
                "install ajv and set NODE_PATH to run this part)")
    return None


def test_commhub_schema_compiles_in_real_ajv_when_it_is_installed() -> None:
    """Ajv's default class, strict by default, plus strictRequired and strictTypes made
    errors; then a valid message passes and the enforced rules fail."""
    reason = _node_has_ajv()
    if reason is not None:
        if os.environ.get("COMMHUB_REQUIRE_AJV") == "1":  # CI installs it
            pytest.fail(f"COMMHUB_REQUIRE_AJV=1 but {reason}")
        pytest.skip(reason)
    script = """
const Ajv = require("ajv");
const schema = JSON.parse(require("fs").readFileSync(0, "utf8"));
const ajv = new Ajv({strict: true, strictTypes: true, strictRequired: true, strictTuples: true});
const validate = ajv.compile(schema);
const ok = {id: "0123456789abcdef", conversation: "c1", channel: "sms", direction: "out",
            sender: {id: "bot"}, payload: {buttons: [{title: "Yes", payload: {value: "y"}}]}};
console.log(JSON.stringify([
  validate(ok), validate({...ok, id: "x1"}), validate({...ok, conversation: "a.b"}),
  validate({...ok, payload: {buttons: [{payload: {}}]}}), validate({...ok, type: "message"}),
]));
"""
    result = subprocess.run(["node", "-e", script], input=json.dumps(json_schema()),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [True, False, False, False, True]
