"""OpenTelemetry spans for a registration and its phases, recorded by the SDK's in-memory
exporter; nothing imported without the package (issue 18, part 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from async_registrar import Registrar, RegistrationFailed, Settings
from async_registrar._local import LocalStack

from .conftest import MiB, make_job, mims_server, on, request_for

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The process's tracer provider (set once: OpenTelemetry allows no second one), emptied."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def named(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == f"async_registrar.{name}"]


def attribute(span: ReadableSpan, name: str) -> object:
    assert span.attributes is not None
    return span.attributes.get(f"async_registrar.{name}")


async def test_a_registration_is_a_span_with_a_child_per_phase(
    tmp_path: Path, settings: Settings, spans: InMemorySpanExporter
) -> None:
    job = make_job(tmp_path, model_bytes=6 * MiB)
    async with Registrar(settings) as registrar:
        result = await registrar.register(request_for(job, workflow_execution_id="wf-traced"))
    finished = spans.get_finished_spans()
    (root,) = named(finished, "register")
    assert root.parent is None
    assert attribute(root, "lineage_id") == "wf-traced"
    assert attribute(root, "status") == "SUCCEEDED"
    assert attribute(root, "registration_id") == result.registration_id
    assert root.status.status_code != StatusCode.ERROR
    assert root.context is not None
    for phase in ("preflight", "upload", "submit", "wait", "cleanup"):
        (step,) = named(finished, phase)
        assert step.parent is not None
        assert step.parent.span_id == root.context.span_id, phase
        assert step.context is not None
        assert step.context.trace_id == root.context.trace_id
        assert str(attribute(step, "run_id")).startswith("run-") or phase == "preflight"
    artifacts = {attribute(s, "artifact"): s for s in named(finished, "upload_artifact")}
    assert set(artifacts) == {"model", "payload"}
    model = artifacts["model"]
    assert attribute(model, "bytes") == result.model_artifact.size
    assert attribute(model, "parts") == result.model_artifact.parts == 3
    assert attribute(model, "integrity") == "size-only"  # moto checks nothing
    (upload,) = named(finished, "upload")
    assert model.parent is not None
    assert upload.context is not None
    assert model.parent.span_id == upload.context.span_id
    (submit,) = named(finished, "submit")
    assert attribute(submit, "registration_id") == result.registration_id
    assert attribute(submit, "model_id") == result.model_id
    assert attribute(submit, "region") == "us-west-2"
    (wait,) = named(finished, "wait")
    assert attribute(wait, "status") == "SUCCEEDED"
    assert attribute(wait, "registration_id") == result.registration_id


async def test_a_failed_registration_records_the_error_on_its_spans(
    tmp_path: Path, settings: Settings, stack: LocalStack, spans: InMemorySpanExporter
) -> None:
    job = make_job(tmp_path)
    with mims_server(stack, fail_registrations="model rejected by policy") as failing:
        async with Registrar(on(settings, failing)) as registrar:
            with pytest.raises(RegistrationFailed):
                await registrar.register(request_for(job))
    finished = spans.get_finished_spans()
    for name in ("wait", "register"):
        (span,) = named(finished, name)
        assert span.status.status_code == StatusCode.ERROR, name
        recorded = [e for e in span.events if e.name == "exception"]
        assert recorded, name
        assert recorded[0].attributes is not None
        assert recorded[0].attributes["exception.type"].endswith("RegistrationFailed")
    (cleanup,) = named(finished, "cleanup")
    assert cleanup.status.status_code != StatusCode.ERROR  # the cleanup itself went well


def test_without_opentelemetry_nothing_is_imported_and_registration_works() -> None:
    """With the package blocked (as if absent), the demo registers and nothing of it is
    imported; and the command line never imports it before a registration runs."""
    script = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"
        "from async_registrar._cli import main\n"
        "code = main(['--log-level', 'WARNING', 'demo'])\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry.')], 'imported'\n"
        "sys.exit(code)\n"
    )
    blocked = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert blocked.returncode == 0, blocked.stderr
    assert len(blocked.stdout.splitlines()) == 2
    startup = "import sys, async_registrar._cli\nassert 'opentelemetry' not in sys.modules\n"
    assert subprocess.run([sys.executable, "-c", startup], capture_output=True, timeout=60).returncode == 0


def test_the_example_service_logs_json_and_prints_its_spans(tmp_path: Path) -> None:
    """examples/service: a registration through the app, with OTEL_TRACES_EXPORTER=console,
    logs JSON lines with the registrar's fields and prints the registration's spans."""
    script = """
import anyio, httpx, json, sys
from async_registrar._local import LocalStack
from examples.service.app import create_app, observe
from opentelemetry import trace

observe({"OTEL_TRACES_EXPORTER": "console"})

async def main():
    with LocalStack() as stack:
        app = create_app(stack.registrar_settings())
        config = json.loads(open("examples/demo/registration.json").read())
        body = {"config": config, "model_path": "examples/demo/model", "payload_path": "examples/demo/payload"}
        async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://service"
        ) as client:
            response = await client.post("/registrations", json=body, timeout=60)
        assert response.text.splitlines()[-1].startswith('{"event": "registered"'), response.text

anyio.run(main)
trace.get_tracer_provider().force_flush()
"""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert '"name": "async_registrar.register"' in done.stdout
    assert '"name": "async_registrar.upload_artifact"' in done.stdout
    logged = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(r.get("phase") == "upload" and r.get("artifact") == "model" for r in logged)
    assert any(r.get("phase") == "wait" and r.get("registration_id") for r in logged)
