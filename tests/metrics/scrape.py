"""Reading GET /metrics and GET /v1/status of a test daemon."""

from __future__ import annotations

import base64
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from signerd.testing import SignerdProcess

from ..support.rawhttp import Reply, request

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(d: SignerdProcess, path: str) -> Reply:
    return request(str(d.socket_path), "GET", path, timeout=20)


def scrape(d: SignerdProcess) -> tuple[str, Samples]:
    """The exposition's text and its samples by (name, labels)."""
    reply = get(d, "/metrics")
    assert reply.status == 200, reply.body[:500]
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = reply.body.decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0.0 when the series does not exist yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(k)[label] for (n, k) in samples if n == name and label in dict(k)}


def status(d: SignerdProcess) -> dict[str, Any]:
    reply = get(d, "/v1/status")
    assert reply.status == 200, reply.body[:500]
    doc: dict[str, Any] = reply.json
    return doc


def sign(d: SignerdProcess, key: str, data: bytes = b"x") -> Reply:
    body = {"key": key, "data": base64.b64encode(data).decode()}
    return request(str(d.socket_path), "POST", "/v1/sign", body, timeout=20)
