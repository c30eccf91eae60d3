"""The tracing module on its own: endpoints, samplers, context across headers, spans."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import INVALID_SPAN, SpanKind, StatusCode, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mesh.tracing import ROOT, Tracing, make_sampler, resolve_endpoint

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("given", "extra", "want", "noted"), [
    ("", {}, "", False),
    ("http://jaeger:14268/api/traces", {}, "http://jaeger:4318/v1/traces", True),
    ("http://10.0.0.7:14268", {}, "http://10.0.0.7:4318/v1/traces", True),
    ("http://jaeger:4318/v1/traces", {}, "http://jaeger:4318/v1/traces", False),
    ("https://otel.example/custom/path", {}, "https://otel.example/custom/path", False),
    ("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces", False),
    ("", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:9/x"}, "http://c:9/x", False),
])
def test_endpoint_resolution(given: str, extra: dict[str, str], want: str, noted: bool) -> None:
    url, note = resolve_endpoint(given, extra)
    assert url == want
    assert (note is not None) == noted
    if note:
        assert "legacy" in note and want in note


def test_sampler_names_and_errors() -> None:
    assert "TraceIdRatioBased" in make_sampler(
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    ).get_description()
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER='sometimes'"):
        make_sampler({"OTEL_TRACES_SAMPLER": "sometimes"})
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG"):
        make_sampler({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"})


def test_disabled_tracing_makes_no_provider() -> None:
    tracing = Tracing(node_id="n", mesh_id="m")
    assert not tracing.enabled and tracing.provider is None
    with tracing.span("x") as span:
        assert not span.is_recording()


def test_context_crosses_headers_between_two_nodes() -> None:
    exp_a, exp_b = InMemorySpanExporter(), InMemorySpanExporter()
    a = Tracing(node_id="eu-1", mesh_id="eu", exporter=exp_a, batch=False)
    b = Tracing(node_id="us-1", mesh_id="us", exporter=exp_b, batch=False)
    with a.span("source.publish", SpanKind.PRODUCER):
        headers = a.inject()
    assert set(headers) == {"traceparent"}
    with b.span("stream_function.receive", SpanKind.CONSUMER, parent=b.extract(headers)):
        pass
    [sent], [got] = exp_a.get_finished_spans(), exp_b.get_finished_spans()
    assert got.context.trace_id == sent.context.trace_id
    assert got.parent is not None and got.parent.span_id == sent.context.span_id
    assert got.resource.attributes["service.instance.id"] == "us-1"
    assert got.resource.attributes["cloud.region"] == "us"
    assert sent.resource.attributes["service.name"] == "prscd"


def test_inject_writes_what_the_sdk_propagator_writes() -> None:
    exp = InMemorySpanExporter()
    node = Tracing(node_id="eu-1", mesh_id="eu", exporter=exp, batch=False)
    parent = node.extract({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-"
                                          "b7ad6b7169203331-01", "tracestate": "vendor=x1"})
    with node.span("stream_function.receive", SpanKind.CONSUMER, parent=parent) as span:
        ours = node.inject(span)
        theirs: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(theirs)
        assert node.inject() == ours  # the current span's, looked up
    assert ours == theirs and ours["tracestate"] == "vendor=x1", ours
    assert ours["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert node.inject() == {}, "no span current: no headers"


def test_a_span_records_an_exception_and_leaves_the_context_as_it_was() -> None:
    exp = InMemorySpanExporter()
    node = Tracing(node_id="n", mesh_id="m", exporter=exp, batch=False)
    with pytest.raises(KeyError), node.span("prscd.receive", SpanKind.SERVER, {"a": "b"},
                                            parent=ROOT) as span:
        assert get_current_span() is span
        raise KeyError("k")
    assert get_current_span() is INVALID_SPAN
    [done] = exp.get_finished_spans()
    assert done.status.status_code is StatusCode.ERROR and "KeyError" in done.status.description
    assert [e.name for e in done.events] == ["exception"] and done.parent is None
    assert done.attributes == {"a": "b"}


def test_the_resource_hash_is_the_sdks_computed_once() -> None:
    node = Tracing(node_id="n", mesh_id="m", exporter=InMemorySpanExporter())
    assert node.provider is not None
    resource = node.provider.resource
    same = Resource(resource.attributes, resource.schema_url)
    assert hash(resource) == hash(same) and resource == same
