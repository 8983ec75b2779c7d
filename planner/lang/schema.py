"""The JSON Schema of the flow format, for editors: draft-07 safe, one branch per node kind.

yaml-language-server supports draft 7 and ignores OpenAPI's `discriminator`, so every node
variant must be told apart by the schema alone: an `sql` node requires `sql`, a `call` node
requires `call`, and `additionalProperties: false` forbids the other key.
"""

from __future__ import annotations

from typing import Any

from planner.lang.models import FlowSpec

SCHEMA_ID = "https://planner.dev/schemas/flow.schema.json"


def flow_schema() -> dict[str, Any]:
    """The flow format as a draft-07 JSON Schema (`planner schema`), built from the pydantic
    models so that it cannot drift from what the loader accepts."""
    schema = FlowSpec.model_json_schema(by_alias=True, ref_template="#/definitions/{model}", mode="validation")
    definitions = schema.pop("$defs", {})
    out: dict[str, Any] = {"$schema": "http://json-schema.org/draft-07/schema#", "$id": SCHEMA_ID}
    out.update(schema)
    out["title"] = "planner flow"
    # An input may be written as its bare type name: `phone: str`.
    type_names = definitions["InputSpec"]["properties"]["type"]["enum"]
    out["properties"]["inputs"]["additionalProperties"] = {
        "anyOf": [{"type": "string", "enum": type_names}, {"$ref": "#/definitions/InputSpec"}]
    }
    out["definitions"] = definitions
    _draft7(out)
    return out


def _draft7(node: Any) -> None:
    """Drop what draft 7 does not know (pydantic targets 2020-12)."""
    if isinstance(node, dict):
        node.pop("discriminator", None)
        if "prefixItems" in node:  # tuples; none in the model today, but never emit them
            node["items"] = node.pop("prefixItems")
        for value in node.values():
            _draft7(value)
    elif isinstance(node, list):
        for value in node:
            _draft7(value)
