"""The /metrics endpoint: no redirect, negotiation, exemplars, gzip, filtering, token, schema."""

from __future__ import annotations

import gzip
import hmac
from typing import Any

import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_perfmon import PerfMonMiddleware, metrics_app, metrics_endpoint
from tests._helpers import client

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def instrumented(registry: CollectorRegistry, **endpoint_options: Any) -> Starlette:
    app = Starlette(routes=[Route("/r", ok)])
    app.add_middleware(PerfMonMiddleware, registry=registry)
    app.add_route("/metrics", metrics_app(registry, **endpoint_options))
    return app


async def test_metrics_answers_directly_without_redirect(registry: CollectorRegistry) -> None:
    """``GET /metrics`` is a 200 with the text format, not a 307 to ``/metrics/``."""
    async with client(instrumented(registry), follow_redirects=False) as http:
        await http.get("/r")
        response = await http.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'http_server_request_duration_seconds_count{http_request_method="GET"' in response.text


async def test_openmetrics_negotiation_carries_request_id_exemplars(
    registry: CollectorRegistry,
) -> None:
    """With OpenMetrics accepted, duration buckets carry the request id as an exemplar."""
    async with client(instrumented(registry)) as http:
        await http.get("/r", headers={"X-Request-ID": "exemplar-1"})
        response = await http.get("/metrics", headers={"Accept": OPENMETRICS})

    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    bucket_lines = [
        line
        for line in response.text.splitlines()
        if line.startswith("http_server_request_duration_seconds_bucket")
    ]
    assert any('# {request_id="exemplar-1"}' in line for line in bucket_lines)


async def test_text_format_has_no_exemplars(registry: CollectorRegistry) -> None:
    """The classic text format cannot carry exemplars, so none appear."""
    async with client(instrumented(registry)) as http:
        await http.get("/r", headers={"X-Request-ID": "exemplar-1"})
        response = await http.get("/metrics")

    assert "exemplar-1" not in response.text


async def test_gzip_when_accepted(registry: CollectorRegistry) -> None:
    """``Accept-Encoding: gzip`` gets a gzip body that decodes to the exposition."""
    async with client(instrumented(registry)) as http:
        await http.get("/r")
        plain = await http.get("/metrics", headers={"Accept-Encoding": "identity"})
        zipped = await http.send(
            http.build_request("GET", "/metrics", headers={"Accept-Encoding": "gzip"}), stream=True
        )
        raw = b"".join([chunk async for chunk in zipped.aiter_raw()])

    assert "content-encoding" not in plain.headers
    assert zipped.headers["content-encoding"] == "gzip"
    assert b"http_server_request_duration_seconds" in gzip.decompress(raw)


async def test_name_filter(registry: CollectorRegistry) -> None:
    """``?name[]=`` restricts the output to the named families."""
    async with client(instrumented(registry)) as http:
        await http.get("/r")
        response = await http.get("/metrics", params={"name[]": "asgi_perfmon_info"})

    assert "asgi_perfmon_info" in response.text
    assert "http_server_request_duration_seconds" not in response.text


async def test_token_required_when_configured(registry: CollectorRegistry) -> None:
    """Wrong or missing bearer tokens get 401 and reveal nothing; the right one gets metrics."""
    async with client(instrumented(registry, token="s3cret")) as http:
        missing = await http.get("/metrics")
        wrong = await http.get("/metrics", headers={"Authorization": "Bearer nope"})
        right = await http.get("/metrics", headers={"Authorization": "Bearer s3cret"})

    assert (401, 401, 200) == (missing.status_code, wrong.status_code, right.status_code)
    assert missing.text == wrong.text == "Unauthorized"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert "asgi_perfmon_info" in right.text


async def test_token_from_environment(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``PERFMON_METRICS_TOKEN`` configures the token."""
    monkeypatch.setenv("PERFMON_METRICS_TOKEN", "env-token")
    async with client(instrumented(registry)) as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (
            await http.get("/metrics", headers={"Authorization": "Bearer env-token"})
        ).status_code == 200


async def test_only_get_and_head(registry: CollectorRegistry) -> None:
    """Other methods get 405."""
    async with client(instrumented(registry)) as http:
        response = await http.post("/metrics")

    assert response.status_code == 405


async def test_metrics_endpoint_function_serves_the_default_registry() -> None:
    """``metrics_endpoint`` is a plain Starlette endpoint over prometheus-client's registry."""
    Counter("perfmon_endpoint_probe", "probe").inc()
    app = Starlette(routes=[Route("/metrics", metrics_endpoint)])
    async with client(app) as http:
        response = await http.get("/metrics")

    assert "perfmon_endpoint_probe_total 1.0" in response.text


async def test_hidden_from_openapi(registry: CollectorRegistry) -> None:
    """On FastAPI, the metrics route does not appear in the OpenAPI schema."""
    app = FastAPI()

    @app.get("/items")
    async def items() -> list[int]:
        return []

    app.add_route("/metrics", metrics_app(registry))
    async with client(app) as http:
        schema = (await http.get("/openapi.json")).json()
        metrics = await http.get("/metrics")

    assert "/items" in schema["paths"]
    assert "/metrics" not in schema["paths"]
    assert metrics.status_code == 200


# --- the token: every refusal looks the same, and takes the same time ---------------------

TOKEN = "s3cret-token-0123456789"
REFUSED_AUTHORIZATIONS: dict[str, bytes | None] = {
    "missing": None,
    "empty": b"",
    "wrong": b"Bearer nope",
    "wrong scheme": f"Basic {TOKEN}".encode(),
    "no scheme": TOKEN.encode(),
    "prefix of the token": f"Bearer {TOKEN[:-1]}".encode(),
    "token plus one": f"Bearer {TOKEN}x".encode(),
    "64 kB": b"Bearer " + b"a" * 65536,
    "non-ASCII": "Bearer sécrét-tökén".encode(),
    "invalid UTF-8": b"Bearer \xff\xfe\x80",
}


async def test_every_refused_token_gets_the_same_401(registry: CollectorRegistry) -> None:
    """Missing, wrong, too long, non-ASCII or nearly right: byte-identical 401 responses, so
    a refusal tells nothing about what was wrong (not even whether the scheme was right)."""
    app = metrics_app(registry, token=TOKEN)  # no middleware: its request id differs per call
    responses = {}
    async with client(app) as http:
        for case, authorization in REFUSED_AUTHORIZATIONS.items():
            headers = {} if authorization is None else {b"authorization": authorization}
            responses[case] = await http.get("/metrics", headers=headers)
        accepted = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})

    seen = {(r.status_code, tuple(r.headers.raw), r.content) for r in responses.values()}
    assert len(seen) == 1, {case: r.headers.raw for case, r in responses.items()}
    status, _, body = seen.pop()
    assert (status, body) == (401, b"Unauthorized")
    assert accepted.status_code == 200


async def test_a_non_ascii_token_is_accepted_as_utf8(registry: CollectorRegistry) -> None:
    async with client(metrics_app(registry, token="sécrét")) as http:
        right = await http.get("/metrics", headers={b"authorization": "Bearer sécrét".encode()})
        latin1 = await http.get(
            "/metrics", headers={b"authorization": "Bearer sécrét".encode("latin-1")}
        )

    assert (right.status_code, latin1.status_code) == (200, 401)


async def test_the_token_comparison_never_depends_on_lengths(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``compare_digest`` returns early on a length mismatch; the endpoint only ever hands it
    two 32-byte digests, whatever the length of the token and of the header."""
    compared: list[tuple[int, int]] = []
    real_compare = hmac.compare_digest

    def recording_compare(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real_compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording_compare)
    long_token = TOKEN * 40
    sent = [value for value in REFUSED_AUTHORIZATIONS.values() if value is not None]
    sent.append(f"Bearer {long_token}".encode())
    async with client(metrics_app(registry, token=long_token)) as http:
        statuses = [
            (await http.get("/metrics", headers={b"authorization": value})).status_code
            for value in sent
        ]
        statuses.append((await http.get("/metrics")).status_code)

    assert statuses == [401] * (len(sent) - 1) + [200, 401]
    assert len(compared) == len(sent) + 1  # every request compared, once
    assert set(compared) == {(32, 32)}


async def test_the_bearer_scheme_is_case_insensitive(registry: CollectorRegistry) -> None:
    async with client(metrics_app(registry, token=TOKEN)) as http:
        statuses = [
            (await http.get("/metrics", headers={"Authorization": f"{scheme} {TOKEN}"})).status_code
            for scheme in ("Bearer", "bearer", "BEARER")
        ]

    assert [200, 200, 200] == statuses


# --- the middleware's own families are rendered on the event loop, in slices ---------------


def with_traffic(registry: CollectorRegistry, routes: int = 30) -> PerfMonMiddleware:
    middleware = PerfMonMiddleware(Starlette(), registry=registry, loop_monitor=False)
    metrics = middleware._metrics
    for number in range(routes):
        for status in (200, 404, 500):
            series = metrics.series("GET", f"/route{number}/{{id}}")
            series.active.inc()
            series.record(status, 0.02 * number, 0.001, 10, 2000, {"request_id": f"r{number}"})
    return middleware


@pytest.mark.parametrize("accept", ["text/plain", OPENMETRICS])
async def test_the_scrape_has_exactly_prometheus_clients_samples(
    registry: CollectorRegistry, accept: str
) -> None:
    """Rendered on the loop or collected in the thread: the same samples as prometheus-client
    gives for the same registry, in a valid exposition."""
    from prometheus_client import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
    from prometheus_client.parser import text_string_to_metric_families as text_parse

    with_traffic(registry)
    async with client(metrics_app(registry)) as http:
        scraped = (await http.get("/metrics", headers={"Accept": accept})).text
    reference = (openmetrics_latest if accept == OPENMETRICS else generate_latest)(registry)
    parse = om_parse if accept == OPENMETRICS else text_parse

    def samples(text: str) -> set[Any]:
        return {
            (s.name, tuple(sorted(s.labels.items())), s.value, repr(s.exemplar))
            for family in parse(text)
            for s in family.samples
        }

    assert samples(reference.decode()) == samples(scraped)
    assert sorted(reference.decode().splitlines()) == sorted(scraped.splitlines())


@pytest.mark.parametrize(("slice_seconds", "lets_the_loop_run"), [(0.0, True), (60.0, False)])
async def test_the_loop_families_are_rendered_in_slices_between_which_the_loop_runs(
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    slice_seconds: float,
    lets_the_loop_run: bool,
) -> None:
    """Each slice of rendering gives the loop back, so a big scrape cannot stall requests."""
    import asyncio

    from asgi_perfmon import _scrape

    monkeypatch.setattr(_scrape, "LOOP_SLICE_SECONDS", slice_seconds)
    with_traffic(registry, routes=200)
    ticks = 0
    rendering = True

    async def ticker() -> None:
        nonlocal ticks
        while rendering:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    ticks = 0
    failures = _scrape.scrape_failures(registry)
    pieces = await _scrape.loop_exposition(
        registry, failures, _scrape.LoopSlices(), openmetrics=False
    )
    rendering = False
    await task
    text = b"".join(pieces).decode()

    chunks = sum(
        len(list(family.exposition(openmetrics=False)))
        for family in _scrape.loop_families(registry)
    )
    assert text.count("http_server_request_duration_seconds_count") == 600
    if lets_the_loop_run:
        assert ticks >= chunks - 1
    else:
        assert ticks == 0
