"""The OpenAPI document of the MIMS contract, generated from the wire models."""

from __future__ import annotations

import functools
from typing import Any

from pydantic.json_schema import models_json_schema

from .._config import _NO_CONTROL
from .._mims_contract import (
    IDEMPOTENCY_HEADER,
    REGISTRATIONS_PATH,
    ErrorBody,
    Registration,
    RegistrationSubmission,
)
from .._regions import region_pattern

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref("ErrorBody")}}}


def _retry_after(description: str) -> dict[str, Any]:
    answer = _error(description)
    answer["headers"] = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds or an HTTP date"}}
    return answer


#: A key segment that is not empty, `.` or `..` (without look-arounds, which not every
#: regular-expression engine has).
_SEGMENT = r"(?:[^/\x00-\x1f]{3,}|[^/.\x00-\x1f]|[^/.\x00-\x1f][^/\x00-\x1f]|\.[^/.\x00-\x1f])"
#: The s3:// URIs the service takes: the contract's form, with a plain key (400 otherwise).
PLAIN_S3_URI = rf"^s3://[a-z0-9][a-z0-9.-]{{1,61}}[a-z0-9]/{_SEGMENT}(?:/{_SEGMENT})*$"


#: What may stand at either end of a text field (no control character, no Unicode white
#: space: the service refuses padded text), and what may stand inside.
_EDGE = r"[^\x00-\x1f\x7f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_INSIDE = r"[^\x00-\x1f\x7f]"
#: The text fields of a submission: trimmed, no control character.
TRIMMED_TEXT = rf"^{_EDGE}(?:{_INSIDE}*{_EDGE})?$"


def _declare_trimmed(properties: dict[str, Any]) -> None:
    """Text fields come trimmed (a padded one is 422): the schema says so with a pattern."""
    for schema in properties.values():
        if schema.get("type") == "string" and schema.get("pattern") == _NO_CONTROL:
            schema["pattern"] = TRIMMED_TEXT


def _declare_regions(properties: dict[str, Any]) -> None:
    """Region fields: exactly the names the service takes (the `Region` form alone lets
    through names no partition has, which the service refuses)."""
    for name in ("model_registration_region", "source_model_region"):
        for schema in properties[name].get("anyOf", [properties[name]]):
            if schema.get("type") == "string":
                schema["pattern"] = region_pattern()


def _close_pattern_keys(schema: Any) -> None:
    """Maps whose keys have a form (pydantic writes `patternProperties`, which leaves keys of
    any other form unchecked): every key of that form, every value of that schema."""
    if isinstance(schema, list):
        for item in schema:
            _close_pattern_keys(item)
        return
    if not isinstance(schema, dict):
        return
    patterns = schema.get("patternProperties")
    if isinstance(patterns, dict) and len(patterns) == 1 and "additionalProperties" not in schema:
        ((pattern, values),) = patterns.items()
        del schema["patternProperties"]
        schema["propertyNames"] = {**schema.get("propertyNames", {}), "pattern": pattern}
        schema["additionalProperties"] = values
    for value in schema.values():
        _close_pattern_keys(value)


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The document served at `/openapi.json`."""
    _, schemas = models_json_schema(
        [(m, "validation") for m in (RegistrationSubmission, Registration, ErrorBody)],
        ref_template="#/components/schemas/{model}",
    )
    _declare_regions(schemas["$defs"]["RegistrationSubmission"]["properties"])
    _close_pattern_keys(schemas)
    schemas["$defs"]["ArtifactRef"]["properties"]["s3_uri"]["pattern"] = PLAIN_S3_URI
    _declare_trimmed(schemas["$defs"]["RegistrationSubmission"]["properties"])
    registration = {
        "description": "the registration",
        "content": {"application/json": {"schema": _ref("Registration")}},
    }
    # Where a registration's state is: what a client (or a stateful fuzzer) does next.
    submitted = {
        **registration,
        "links": {
            "GetRegistration": {
                "operationId": "getRegistration",
                "parameters": {"registration_id": "$response.body#/registration_id"},
            }
        },
    }
    auth = {
        "401": {
            **_error("no Authorization header"),
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "AWS4-HMAC-SHA256"}},
        },
        "403": _error(
            "a malformed or wrong SigV4 signature; a signature for another region than the "
            "registration's; an Idempotency-Key the signature does not cover; an x-amz-content-sha256 that is "
            "not the body's sha256 (UNSIGNED-PAYLOAD included)"
        ),
        "413": _error("the body is larger than the service's limit (MIMS_MAX_BODY_BYTES, 1 MiB by default)"),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MIMS (Model Inference Management Service): registration API",
            "version": "1",
            "description": (
                "Every request is signed with AWS SigV4 (service 'mims', the registration's region), covering "
                "host, x-amz-date and Idempotency-Key, and the body (its sha256). "
                "A registration moves PENDING -> IN_PROGRESS -> SUCCEEDED or FAILED; before SUCCEEDED the "
                "registry reads each artifact back, checks size, sha256 and tar.gz, and copies it."
            ),
        },
        "paths": {
            REGISTRATIONS_PATH: {
                "post": {
                    "operationId": "submitRegistration",
                    "parameters": [
                        {
                            "name": IDEMPOTENCY_HEADER,
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 256},
                            "description": "one value per logical registration, the same on every retry",
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("RegistrationSubmission")}},
                    },
                    "responses": {
                        "202": submitted,
                        "200": {**submitted, "description": "the same key and body were submitted before"},
                        "400": _error(
                            "not JSON, no Idempotency-Key, or `model_registration_region` is not one region name"
                        ),
                        "409": _error(
                            "the Idempotency-Key was used with a different body; `registration_id` names the "
                            "registration that holds it"
                        ),
                        "422": _error("invalid fields; `errors` names each"),
                        "503": _retry_after("busy; retry after the given time"),
                        **auth,
                    },
                }
            },
            REGISTRATIONS_PATH + "/{registration_id}": {
                "get": {
                    "operationId": "getRegistration",
                    "description": (
                        "The registration's current state. The signature is verified first: a bad signature is "
                        "403 whatever the id, and an id the registry does not know is 404 only after the "
                        "signature was verified. Clients rely on it to check an endpoint and their signature "
                        "before they upload anything (a GET of an id that cannot exist must be 404)."
                    ),
                    "parameters": [
                        {"name": "registration_id", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": registration,
                        "404": _error("no such registration (answered after the signature was verified)"),
                        "429": _retry_after("throttled; retry after the given time"),
                        **auth,
                    },
                }
            },
        },
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {
                "sigv4": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "AWS Signature Version 4 (AWS4-HMAC-SHA256), service 'mims', with X-Amz-Date",
                }
            },
        },
        "security": [{"sigv4": []}],
    }
