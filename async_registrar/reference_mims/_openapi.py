"""The OpenAPI document of the MIMS contract, generated from the wire models."""

from __future__ import annotations

import functools
from typing import Any

from pydantic.json_schema import models_json_schema

from .._mims_contract import (
    IDEMPOTENCY_HEADER,
    REGISTRATIONS_PATH,
    ErrorBody,
    Registration,
    RegistrationSubmission,
)

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref("ErrorBody")}}}


def _retry_after(description: str) -> dict[str, Any]:
    answer = _error(description)
    answer["headers"] = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds or an HTTP date"}}
    return answer


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The document served at `/openapi.json`."""
    _, schemas = models_json_schema(
        [(m, "validation") for m in (RegistrationSubmission, Registration, ErrorBody)],
        ref_template="#/components/schemas/{model}",
    )
    registration = {
        "description": "the registration",
        "content": {"application/json": {"schema": _ref("Registration")}},
    }
    auth = {
        "403": _error(
            "missing, malformed or wrong SigV4 signature; a signature for another region than the "
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
                        "202": registration,
                        "200": {**registration, "description": "the same key and body were submitted before"},
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
