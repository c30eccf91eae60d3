"""OpenTelemetry tracing: one trace per message, across every node it crosses.

Export is OTLP over HTTP, which Jaeger ingests natively (the old Jaeger exporter package
cannot be imported with a current SDK: see docs/tracing.md). The seed's
``YOMO_TRACE_JAEGER_ENDPOINT`` still works: an OTLP URL is used as it is, and the legacy
``http://HOST:14268/api/traces`` form is mapped to ``http://HOST:4318/v1/traces``.

With no endpoint configured :attr:`Tracing.enabled` is False and callers skip every
tracing call behind one attribute check: the hot path pays nothing.

Each node has its own TracerProvider (not the global one), so two nodes in one test
process export as two services instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import trace
from opentelemetry.context import Context, attach, detach
from opentelemetry.propagators.textmap import default_getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from node.config import Settings

log = logging.getLogger("prscd.tracing")

SERVER, PRODUCER, CONSUMER = SpanKind.SERVER, SpanKind.PRODUCER, SpanKind.CONSUMER

LEGACY_PORT = 14268
OTLP_HTTP_PORT = 4318
_PROPAGATOR = TraceContextTextMapPropagator()
#: The parent of a root span, given explicitly: the SDK then skips looking up the current
#: context (twice: the tracer and the parent-based sampler).
ROOT = Context()


class _CachedResource(Resource):
    """A Resource whose hash is computed once. ``Resource.__hash__`` serializes the
    attributes to JSON on every call, and the OTLP encoder hashes the resource of every
    span it exports (to group them): 14% of the encoding in a profile at 100% sampling."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


class Hop:
    """A span made current for a ``with`` block, ended on exit: what
    ``Tracer.start_as_current_span`` does, without its two generator context managers
    (a quarter of a span's cost on the hot path at 100% sampling). An exception is
    recorded on the span, as there."""

    __slots__ = ("_attributes", "_kind", "_name", "_parent", "_token", "_tracer", "span")

    def __init__(self, tracer: trace.Tracer, name: str, kind: SpanKind,
                 attributes: Mapping[str, Any] | None, parent: Context | None) -> None:
        self._tracer, self._name, self._kind = tracer, name, kind
        self._attributes, self._parent = attributes, parent

    def __enter__(self) -> Span:
        span = self.span = self._tracer.start_span(self._name, self._parent, self._kind,
                                                   self._attributes)
        self._token = attach(set_span_in_context(span))
        return span

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        detach(self._token)
        span = self.span
        if isinstance(exc, Exception) and span.is_recording():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()


def resolve_endpoint(jaeger_endpoint: str, extra: Mapping[str, str]) -> tuple[str, str | None]:
    """The OTLP/HTTP traces URL to export to (or ""), and a note worth logging once."""
    if jaeger_endpoint:
        url = urlsplit(jaeger_endpoint)
        if url.port == LEGACY_PORT or url.path.rstrip("/") == "/api/traces":
            host = url.hostname or "localhost"
            if ":" in host:
                host = f"[{host}]"
            mapped = urlunsplit((url.scheme or "http", f"{host}:{OTLP_HTTP_PORT}",
                                 "/v1/traces", "", ""))
            note = (f"YOMO_TRACE_JAEGER_ENDPOINT={jaeger_endpoint} is Jaeger's legacy Thrift "
                    f"endpoint; exporting OTLP/HTTP to {mapped} instead "
                    "(Jaeger >= 1.35 ingests OTLP)")
            return mapped, note
        return jaeger_endpoint, None
    if extra.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return extra["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"], None
    if extra.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return extra["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces", None
    return "", None


def make_sampler(extra: Mapping[str, str]) -> Sampler:
    """OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, as the spec names them."""
    name = extra.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    try:
        ratio = float(extra.get("OTEL_TRACES_SAMPLER_ARG", "1.0") or 1.0)
    except ValueError:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={extra['OTEL_TRACES_SAMPLER_ARG']!r}: "
                         "expected a number between 0 and 1") from None
    samplers: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(ratio),
        "parentbased_always_on": ParentBased(ALWAYS_ON),
        "parentbased_always_off": ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": ParentBased(TraceIdRatioBased(ratio)),
    }
    if name not in samplers:
        raise ValueError(f"OTEL_TRACES_SAMPLER={name!r}: expected one of {', '.join(samplers)}")
    return samplers[name]


class Tracing:
    """Spans for one node. ``enabled`` False = no provider, no spans, no cost."""

    def __init__(self, *, node_id: str, mesh_id: str, endpoint: str = "",
                 extra: Mapping[str, str] | None = None,
                 exporter: SpanExporter | None = None, batch: bool = True) -> None:
        extra = extra or {}
        self.node_id, self.mesh_id = node_id, mesh_id
        self.endpoint = endpoint
        self.enabled = bool(endpoint or exporter)
        self.provider: TracerProvider | None = None
        self._tracer: trace.Tracer = trace.NoOpTracer()
        if not self.enabled:
            return
        resource = Resource.create({
            "service.name": extra.get("OTEL_SERVICE_NAME") or "prscd",
            "service.instance.id": node_id,
            "cloud.region": mesh_id,
            "prscd.mesh_id": mesh_id,
        })
        self.provider = TracerProvider(resource=_CachedResource(resource),
                                       sampler=make_sampler(extra))
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint, timeout=2)
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        self.provider.add_span_processor(processor)
        self._tracer = self.provider.get_tracer("prscd")

    def span(self, name: str, kind: SpanKind = SpanKind.INTERNAL,
             attributes: Mapping[str, Any] | None = None,
             parent: Context | None = None) -> contextlib.AbstractContextManager[Span]:
        """A child of the current span (or of ``parent``; :data:`ROOT` for a new trace).

        Which node and region a span ran on is on the Resource (``service.instance.id``,
        ``cloud.region``), not repeated on every span: at 100% sampling each attribute
        is paid for on the hot path and again when encoding. Values must not be None.
        """
        return Hop(self._tracer, name, kind, attributes, parent)

    @staticmethod
    def inject(span: Span | None = None) -> dict[str, str]:
        """W3C trace context of ``span`` (default: the current one), for bus message
        headers: the ``traceparent`` the SDK's propagator writes, formatted here from the
        span in hand (the propagator looks the span up again and goes through a setter)."""
        ctx = (span or trace.get_current_span()).get_span_context()
        if not ctx.is_valid:
            return {}
        headers = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-"
                                  f"{ctx.trace_flags:02x}"}
        if ctx.trace_state:
            headers["tracestate"] = ctx.trace_state.to_header()
        return headers

    @staticmethod
    def extract(headers: Mapping[str, str] | None) -> Context | None:
        if not headers:
            return None
        return _PROPAGATOR.extract(headers, getter=default_getter)

    def flush(self, timeout_s: float = 5.0) -> None:
        if self.provider is not None:
            self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()

    async def aclose(self, timeout_s: float = 2.0) -> None:
        """Export what is buffered, waiting at most ``timeout_s``: an unreachable collector
        must not hold up a node's exit (a daemon thread is abandoned, not joined)."""
        if self.provider is None:
            return
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def run() -> None:
            try:
                self.shutdown()
            finally:
                loop.call_soon_threadsafe(done.set)

        threading.Thread(target=run, name="prscd-trace-flush", daemon=True).start()
        try:
            await asyncio.wait_for(done.wait(), timeout_s)
        except TimeoutError:
            log.warning("trace export did not finish within %.1f s: spans dropped", timeout_s)


def make_tracing(settings: Settings, node_id: str, exporter: SpanExporter | None = None) -> Tracing:
    """Tracing for a node from its settings; logs where spans go (or that they don't)."""
    endpoint, note = resolve_endpoint(settings.jaeger_endpoint, settings.extra)
    if note:
        log.warning("%s", note)
    tracing = Tracing(node_id=node_id, mesh_id=settings.mesh_id, endpoint=endpoint,
                      extra=settings.extra, exporter=exporter)
    if tracing.enabled:
        log.info("tracing on endpoint=%s sampler=%s", endpoint or "(in-process exporter)",
                 settings.extra.get("OTEL_TRACES_SAMPLER", "parentbased_always_on"))
    return tracing
