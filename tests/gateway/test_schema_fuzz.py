"""Schemathesis against the gateway's own OpenAPI schema (a canned upstream behind it): no request
it generates, valid or not, may get a 5xx. Bounded to a few dozen examples per operation."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.gateway.conftest import ADMIN_KEY, serve_gateway


@pytest.fixture(scope="module")
def fuzz_target(canned):
    # the client key is off here, so the OpenAI endpoints are fuzzed past auth; admin gets its key
    with serve_gateway(canned.url, api_keys="", stream_idle_timeout_s=2, read_timeout_s=2) as server:
        yield server


def test_no_generated_request_gets_a_server_error(fuzz_target):
    schema = schemathesis.openapi.from_url(fuzz_target.url + "/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 10
    failures: list[str] = []
    for op in operations:
        @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case):
            resp = case.call(base_url=fuzz_target.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
            if resp.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r} -> {resp.status_code} {resp.text[:200]}")

        run()
    assert failures == []
