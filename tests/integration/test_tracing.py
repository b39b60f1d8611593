"""One trace from the SDK's request to the WebSocket frame a subscriber receives (SPEC §8).

The three services run on real sockets, each with its own tracer provider (tracing on,
spans to an in-memory exporter instead of OTLP); the SDK's caller has a provider of its own.
An apply made inside the caller's span must leave, under that one trace id: the Gateway's
server span, its client span to WorldService, WorldService's server span, the Gateway's
ControlBus consumer span — and the activation_updated frame's ``traceparent``.
"""

from __future__ import annotations

import asyncio
import uuid

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from qmtl.bus.inproc import InProcessBus
from qmtl.common.config import TracingConfig, load_config
from qmtl.common.tracing import make_tracer_provider
from qmtl.contracts.events import event_validators
from qmtl.dagmanager.app import create_app as dm_app
from qmtl.gateway.app import create_app as gw_app
from qmtl.sdk import EventStream, GatewayClient
from qmtl.worldservice.app import create_app as ws_app
from tests.helpers.server import free_port, serve


async def test_one_apply_is_one_trace_from_the_sdk_to_the_frame(tmp_path):
    exporter = InMemorySpanExporter()

    def provider(service):
        return make_tracer_provider(TracingConfig(enabled=True), service, span_processor=SimpleSpanProcessor(exporter))

    ports = {"gateway": free_port(), "worldservice": free_port(), "dagmanager": free_port()}
    cfg = load_config(None, overrides={"data_dir": str(tmp_path)})
    cfg.gateway.worldservice_url = f"http://127.0.0.1:{ports['worldservice']}"
    cfg.gateway.dagmanager_url = f"http://127.0.0.1:{ports['dagmanager']}"
    cfg.gateway.public_url = f"http://127.0.0.1:{ports['gateway']}"
    cfg.ensure_service_token()
    bus = InProcessBus(validator=event_validators())
    apps = {
        "worldservice": ws_app(cfg, bus=bus, tracer_provider=provider("worldservice")),
        "dagmanager": dm_app(cfg, bus=bus, tracer_provider=provider("dagmanager")),
        "gateway": gw_app(cfg, bus=bus, tracer_provider=provider("gateway")),
    }
    caller = TracerProvider()
    caller.add_span_processor(SimpleSpanProcessor(exporter))
    world = f"tr-{uuid.uuid4().hex[:8]}"
    async with serve(apps["worldservice"], port=ports["worldservice"]), serve(apps["dagmanager"], port=ports["dagmanager"]), \
            serve(apps["gateway"], port=ports["gateway"]) as url, GatewayClient(url) as client:
        await client.create_world(world, "tracing")
        async with EventStream(client, world_id=world, topics=["activation"]) as stream:
            await stream.wait_synced(15)
            with caller.get_tracer("strategy").start_as_current_span("rebalance") as span:
                await client.apply(world, {"activate": [{"strategy_id": "s1", "side": "long", "weight": 0.5}]}, consent_live=True)
            trace_id = span.get_span_context().trace_id

            async def frame():
                async for event in stream:
                    if event.type == "activation_updated" and event.source == "stream":
                        return event

            event = await asyncio.wait_for(frame(), 15)
    await bus.close()

    assert event.traceparent is not None, event.frame
    assert event.traceparent.split("-")[1] == f"{trace_id:032x}"  # the client joins the frame to its own trace
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    by_service = {}
    for s in spans:
        by_service.setdefault(s.resource.attributes["service.name"], []).append(s)
    gateway = by_service.get("qmtl-gateway", [])
    assert any(s.kind == SpanKind.SERVER and "apply" in s.name for s in gateway), [s.name for s in gateway]
    assert any(s.kind == SpanKind.CLIENT for s in gateway), [s.name for s in gateway]  # the call to WorldService
    assert any(s.kind == SpanKind.CONSUMER and s.name.startswith("control.activation") for s in gateway), [s.name for s in gateway]
    assert any(s.kind == SpanKind.SERVER and "apply" in s.name for s in by_service.get("qmtl-worldservice", [])), by_service.keys()
    # the frame's parent is a span of this trace that a service really recorded
    parent_span_id = int(event.traceparent.split("-")[2], 16)
    assert parent_span_id in {s.context.span_id for s in spans}


async def test_tracing_off_installs_nothing(tmp_path):
    cfg = load_config(None, overrides={"data_dir": str(tmp_path)})
    app = ws_app(cfg, bus=InProcessBus(validator=event_validators()))
    assert type(app.inner).__name__ == "CorrelationMiddleware"  # no tracing middleware in the request path
