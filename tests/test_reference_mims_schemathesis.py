"""The reference registry against its own OpenAPI document, probed by schemathesis (issue 19)."""

from __future__ import annotations

import itertools
import json
import re
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from botocore.credentials import ReadOnlyCredentials
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test
from pydantic import ValidationError
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import (
    NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES,
    POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES,
)

from async_registrar._local import ACCESS_KEY, REGION, SECRET_KEY, LocalStack
from async_registrar._mims_contract import RegistrationSubmission
from async_registrar._regions import region_pattern
from async_registrar._sigv4 import sign_request
from async_registrar.reference_mims import openapi_document
from async_registrar.reference_mims._app import _parse_json, _unsafe_key
from async_registrar.reference_mims._openapi import PLAIN_S3_URI

from .conftest import mims_server
from .test_reference_mims_hardening import submission

#: What the auth provider puts where the signature goes; the session's signer replaces it.
PLACEHOLDER = "sign-me"


class SignWhereAsked(requests.auth.AuthBase):
    """Sign a prepared request (the exact bytes sent) with the registrar's own SigV4 code, if it
    carries the placeholder: the probes that drop or replace the credentials go unsigned."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if request.headers.get("Authorization") != PLACEHOLDER:
            return request
        del request.headers["Authorization"]
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        # Signed for the registration's region, as the registrar does: the body's for a
        # submission, the one it was submitted in for a poll.
        region = REGIONS.get(urllib.parse.unquote(request.path_url.rsplit("/", 1)[-1]), REGION)
        try:
            named = json.loads(body).get("model_registration_region")
            if isinstance(named, str) and re.fullmatch(region_pattern(), named):
                region = named
        except (ValueError, AttributeError):
            pass
        assert request.url is not None
        assert request.method is not None
        signed = httpx.Request(request.method, request.url, headers=dict(request.headers), content=body)
        sign_request(signed, ReadOnlyCredentials(ACCESS_KEY, SECRET_KEY, None), region=region, service="mims")
        for name in ("Authorization", "X-Amz-Date"):
            request.headers[name] = signed.headers[name]
        return request


#: The region each registration was submitted in (the stateful test polls them).
REGIONS: dict[str, str] = {}
#: Answers to schema-valid submissions, per service: the run must have got past the checks.
ACCEPTED: Counter[str] = Counter()


@pytest.fixture(scope="module", params=["verified", "unverified"])
def mims_endpoint(request: pytest.FixtureRequest, stack: LocalStack) -> Iterator[str]:
    """The service with signatures verified (and only the test buckets allowed), and with
    signatures only parsed (and any bucket: schema-valid submissions are then accepted)."""
    overrides: dict[str, Any] = (
        {"signing_secrets": None, "allowed_buckets": None} if request.param == "unverified" else {}
    )
    with mims_server(stack, **overrides) as registry:
        MODES[registry.endpoint] = request.param
        yield registry.endpoint
    if request.param == "unverified" and "POST /v1/registrations" in SEEN[registry.endpoint]:
        assert ACCEPTED[registry.endpoint] > 10, "hardly any schema-valid submission was accepted"


SEEN: dict[str, set[str]] = defaultdict(set)
MODES: dict[str, str] = {}


#: A body over the service's limit is 413 before it is read, valid or not (documented): a
#: refusal to schemathesis too, which lists it in neither check's answers by default.
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "negative_data_rejection": {"expected-statuses": [*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "413"]},
            "positive_data_acceptance": {"expected-statuses": [*POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES, "413"]},
        }
    }
)
schema = schemathesis.openapi.from_dict(openapi_document(), config=CONFIG)
load_all_checks()
#: `--checks all`: every check schemathesis has (the stateful ones see single calls here).
EVERY_CHECK = CHECKS.get_all()


@schema.auth()
class Placeholder:
    def get(self, case: Any, context: Any) -> str:
        return PLACEHOLDER

    def set(self, case: Any, data: str, context: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": data}


def repeats_a_name(body: Any) -> bool:
    """Whether a variable list names a variable twice: what the schema says in words only
    (JSON Schema cannot say "unique by the first item"); the service refuses it (422)."""
    if not isinstance(body, dict):
        return False
    for field in ("source_model_inference_input_variable_list", "source_model_inference_output_variable_list"):
        pairs = body.get(field)
        if isinstance(pairs, list) and all(isinstance(p, list) and p for p in pairs):
            names = [json.dumps(p[0]) for p in pairs]
            if len(set(names)) != len(names):
                return True
    return False


def beyond_the_json_limits(body: Any) -> bool:
    """Whether a body breaks the limits on the JSON text itself (400): an integer of more
    than 30 digits, nesting deeper than 64, a lone surrogate. A schema cannot state them
    (it sees values, not digits or escapes); the service's own parser tells."""
    if not isinstance(body, dict | list):
        return False  # no body (a GET), or a scalar
    try:
        _parse_json(json.dumps(body).encode())
    except (ValueError, RecursionError):
        return True
    return False


def not_as_described(case: Any) -> bool:
    """A schema-valid case that breaks a rule the schema states in words only."""
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    return positive and (repeats_a_name(case.body) or beyond_the_json_limits(case.body))


def checks_for(case: Any) -> list[Any]:
    """Every check; for a case that breaks the rule in words, every check but the one that
    wants it accepted (the caller asserts it is refused instead)."""
    if not_as_described(case):
        return [c for c in EVERY_CHECK if getattr(c, "__name__", "") != "positive_data_acceptance"]
    return EVERY_CHECK


def as_described(case: Any, response: Any) -> bool:
    """Check what the service answered beyond schemathesis' checks; whether the case is a
    schema-valid one the schema fully describes (its answer then counts as an acceptance)."""
    if not_as_described(case):
        assert response.status_code in (400, 401, 403, 413, 422), response.text
        return False
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return False
    # Signed as the registrar signs: never refused for its signature (else every answer
    # would be a 403, which schemathesis takes for a valid one).
    assert response.status_code != 401, response.text
    assert "signature" not in response.text, response.text
    return True


@schema.parametrize()
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_service_keeps_its_documented_contract(case: Any, mims_endpoint: str) -> None:
    with requests.Session() as session:
        session.auth = SignWhereAsked()
        response = case.call_and_validate(base_url=mims_endpoint, session=session, checks=checks_for(case))
    if not_as_described(case):
        as_described(case, response)
        return
    SEEN[mims_endpoint].add(case.operation.label)
    if as_described(case, response):
        ACCEPTED[mims_endpoint] += 200 <= response.status_code < 300


def test_submitted_registrations_read_back_as_documented(mims_endpoint: str) -> None:
    """Stateful: submissions followed through the document's link to their state (the GETs
    above see unknown ids only), every check on every step, signed as the registrar signs."""

    class Signed(schema.as_state_machine()):  # type: ignore[misc]
        def call(self, case: Any, **kwargs: Any) -> Any:
            key = (case.headers or {}).get("Idempotency-Key")
            if isinstance(key, str) and 1 <= len(key) <= 256:
                # A key of its own per call: a key reused by an earlier example would make the
                # service answer differently on a replay (hypothesis calls that flaky).
                case.headers["Idempotency-Key"] = f"k-{next(KEYS)}"
            with requests.Session() as session:
                session.auth = SignWhereAsked()
                response = case.call(base_url=mims_endpoint, session=session, **kwargs)
            if case.operation.label.startswith("POST") and response.status_code in (200, 202):
                REGIONS[response.json()["registration_id"]] = case.body["model_registration_region"]
            return response

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            case.validate_response(response, checks=checks_for(case), transport_kwargs={"base_url": mims_endpoint})
            if as_described(case, response):
                READ_BACK[mims_endpoint] += case.operation.label.startswith("GET") and response.status_code == 200

    run_state_machine_as_test(
        Signed,
        settings=settings(
            max_examples=25,
            stateful_step_count=6,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            # The service keeps what earlier steps submitted: a replay would not see what the
            # first run saw (hypothesis calls that flaky), so a failure is reported as found.
            phases=[Phase.generate],
            database=None,
        ),
    )
    if "unverified" in MODES[mims_endpoint]:
        assert READ_BACK[mims_endpoint] > 0, "no registration was read back through the link"


KEYS = itertools.count()
#: Registrations read back with a 200 through the link, per service.
READ_BACK: Counter[str] = Counter()


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(["a", ".", "..", "", "...", ".a", "a.", "ab", "/", "\x01"]), min_size=1, max_size=5))
def test_the_documented_uri_pattern_is_what_the_service_takes(parts: list[str]) -> None:
    """The document's s3_uri pattern: the contract's form with a plain key, no more, no less."""
    uri = "s3://bucket/" + "/".join(parts)
    fits_type = re.fullmatch(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^\x00-\x1f]+$", uri) is not None
    assert (re.fullmatch(PLAIN_S3_URI, uri) is not None) == (fits_type and not _unsafe_key(uri)), uri


_TEXT_CHARS = st.sampled_from(["a", " ", "\t", "\x1c", "\x85", "\u3000", "\ufeff", "\x7f", "\u200b"])


@settings(max_examples=1500, deadline=None)
@given(st.lists(_TEXT_CHARS, max_size=6).map("".join))
def test_the_documented_text_pattern_is_what_the_service_takes(text: str) -> None:
    """The document's pattern for text fields (with their length bounds) against a submission."""
    schema = openapi_document()["components"]["schemas"]["RegistrationSubmission"]["properties"]["model_owner"]
    documented = re.fullmatch(schema["pattern"], text) is not None and 1 <= len(text) <= schema["maxLength"]
    body = {**json.loads(submission("text")), "model_owner": text}
    try:
        RegistrationSubmission.model_validate(body)
        taken = True
    except ValidationError:
        taken = False
    assert documented == taken, repr(text)
