#!/usr/bin/env python3
"""Check docs/openapi.json and the API's real responses against it.

usage: check-openapi.py SPEC [CAPTURE_DIR]

1. SPEC must be a valid OpenAPI 3.1 document (openapi-spec-validator).
2. Every file CAPTURE_DIR/<Schema>-<n>.json (written by tests/api.rs from
   responses the server really sent) must validate against
   #/components/schemas/<Schema> of SPEC, and every schema used by a
   response in SPEC must have at least one capture.
3. Every file CAPTURE_DIR/OpenAPI-<n>.json (live documents the server built
   at /openapi-live.json) must itself be a valid OpenAPI 3.1 document.
"""
import json
import pathlib
import sys

from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012


def main() -> int:
    spec_path = pathlib.Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    validate(spec)
    print(f"{spec_path}: valid OpenAPI {spec['openapi']}")
    if len(sys.argv) < 3:
        return 0
    captures = sorted(pathlib.Path(sys.argv[2]).glob("*.json"))
    if not captures:
        print(f"no captures in {sys.argv[2]}: run the API tests first", file=sys.stderr)
        return 1
    registry = Registry().with_resource("urn:spec", Resource.from_contents(spec, default_specification=DRAFT202012))
    schemas = spec["components"]["schemas"]
    seen = set()
    failed = 0
    live = 0
    for f in captures:
        name = f.name.split("-", 1)[0]
        if name == "OpenAPI":
            try:
                validate(json.loads(f.read_text()))
                live += 1
            except Exception as e:  # noqa: BLE001 - report any validator failure
                print(f"{f.name}: not a valid OpenAPI document: {e}", file=sys.stderr)
                failed += 1
            continue
        if name not in schemas:
            print(f"{f.name}: no schema {name} in the document", file=sys.stderr)
            failed += 1
            continue
        seen.add(name)
        v = Draft202012Validator({"$ref": f"urn:spec#/components/schemas/{name}"}, registry=registry)
        errors = list(v.iter_errors(json.loads(f.read_text())))
        for e in errors:
            print(f"{f.name}: {e.json_path}: {e.message}", file=sys.stderr)
        failed += bool(errors)
    used = set()
    for path in spec["paths"].values():
        for op in path.values():
            for resp in op.get("responses", {}).values():
                ref = resp.get("$ref")
                if ref:
                    resp = spec["components"]["responses"][ref.rsplit("/", 1)[1]]
                schema = resp.get("content", {}).get("application/json", {}).get("schema", {})
                if "$ref" in schema:
                    used.add(schema["$ref"].rsplit("/", 1)[1])
    missing = sorted(used - seen)
    if missing:
        print(f"response schemas never exercised by a capture: {', '.join(missing)}", file=sys.stderr)
        failed += 1
    print(
        f"{len(captures) - live} captured responses checked against {len(seen)} schemas, "
        f"{live} live documents validated: {'FAILED' if failed else 'ok'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
