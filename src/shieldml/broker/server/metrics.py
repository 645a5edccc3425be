"""What an operator watches: Prometheus metrics and one structured access-log line per request.

``GET /metrics`` (Prometheus text format, no token: counts only, never key names, digests or
addresses) serves, per worker process:

- ``shieldml_releases_total{outcome, reason}``: releases decided (``allowed`` / ``denied``, and
  for a denial the refusal's kind: ``nonce``, ``not_genuine``, ``binding``, ``unknown_key``,
  ``policy_denied``, ``integrity``, ``other``);
- ``shieldml_request_seconds{route}``: request latency histogram by route template;
- ``shieldml_nonces``: rows in the nonce table (read from the database at scrape time).

Each request is one JSON line on the ``shieldml.broker.access`` logger (method, route, status,
milliseconds, client address); each denied release one more line with its reason and audit
sequence number. ``broker serve`` sends that logger to stderr.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shieldml.errors import (
    BindingError,
    IntegrityError,
    NonceError,
    NotGenuineError,
    ReleaseDenied,
    ShieldError,
    UnknownKeyError,
)

access_log = logging.getLogger("shieldml.broker.access")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_REASONS: tuple[tuple[type[ShieldError], str], ...] = (
    (NonceError, "nonce"),
    (NotGenuineError, "not_genuine"),
    (BindingError, "binding"),
    (UnknownKeyError, "unknown_key"),
    (ReleaseDenied, "policy_denied"),
    (IntegrityError, "integrity"),
)


def refusal_kind(e: BaseException) -> str:
    return next((kind for cls, kind in _REASONS if isinstance(e, cls)), "other")


class BrokerMetrics:
    """One registry per app (tests build many apps in one process)."""

    def __init__(self, nonce_count: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.releases = Counter(
            "shieldml_releases",
            "Releases decided, by outcome and refusal kind.",
            ["outcome", "reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "shieldml_request_seconds",
            "Request latency by route.",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        nonces = Gauge("shieldml_nonces", "Rows in the nonce table.", registry=self.registry)
        nonces.set_function(lambda: float(nonce_count()))

    def allowed(self) -> None:
        self.releases.labels("allowed", "").inc()

    def denied(self, e: BaseException, audit_seq: Any = None) -> None:
        kind = refusal_kind(e)
        self.releases.labels("denied", kind).inc()
        access_log.info(
            json.dumps(
                {
                    "event": "release_denied",
                    "reason": kind,
                    "detail": _short(e),
                    "audit_seq": audit_seq,
                },
                sort_keys=True,
            )
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _short(e: BaseException) -> str:
    text = e.message if isinstance(e, ShieldError) else str(e)
    if isinstance(e, ReleaseDenied):
        text += ": " + "; ".join(e.failures())
    elif isinstance(e, ShieldError) and e.hint:
        text += f" ({e.hint})"
    text = " ".join(text.split())  # one line
    return text if len(text) <= 2000 else text[:1999] + "…"


class AccessLog:
    """Pure ASGI middleware: time each HTTP request, observe it, log one JSON line."""

    def __init__(self, app: ASGIApp, metrics: BrokerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            took = time.perf_counter() - t0
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.latency.labels(template).observe(took)
            client = scope.get("client")
            access_log.info(
                json.dumps(
                    {
                        "method": scope.get("method"),
                        "route": template,
                        "status": status,
                        "ms": round(took * 1000, 2),
                        "client": client[0] if client else None,
                    },
                    sort_keys=True,
                )
            )
