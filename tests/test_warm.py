"""Start-up overlap of Prefect runs (flows.warm): the ephemeral API server is started in the
background while the science stack is imported, and the flow call then uses that server;
a configured server is left alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import subprocess_env

_SCRIPT = r"""
import sys, time
from flows.warm import import_science_stack, prefect_api_started_meanwhile
t0 = time.perf_counter()
with prefect_api_started_meanwhile() as errors:
    import_science_stack()
    body = time.perf_counter() - t0
print("BODY_S", body, "ERRORS", errors, "SCIENCE", "pyFAI" in sys.modules and "distributed" in sys.modules)
from prefect.server.api.server import SubprocessASGIServer
servers = dict(SubprocessASGIServer._instances)
print("SERVERS", len(servers), "RUNNING", [s.running for s in servers.values()])
if servers:
    import httpx
    srv = next(iter(servers.values()))
    print("HEALTH", httpx.get(srv.api_url + "/health").status_code)
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow
    def f():
        with get_client(sync_client=True) as c:
            return c.api_url
    print("FLOW_API", str(f()).rstrip("/") == srv.api_url.rstrip("/"),
          "SERVERS_AFTER", len(SubprocessASGIServer._instances))
"""


def _run(tmp_path, **env):
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300,
                       env=subprocess_env(PREFECT_HOME=str(tmp_path / "ph"), PREFECT_LOGGING_LEVEL="ERROR",
                                          PREFECT_SERVER_ANALYTICS_ENABLED="false", **env))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow  # ~40 s on a loaded 2-core machine (server boot + a flow run)
def test_ephemeral_api_starts_while_importing_and_the_flow_uses_it(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    out = _run(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    assert "ERRORS [] SCIENCE True" in out, out
    assert "SERVERS 1 RUNNING [True]" in out and "HEALTH 200" in out, out
    assert "FLOW_API True SERVERS_AFTER 1" in out, out  # the flow reused the started server


def test_configured_api_is_not_replaced(tmp_path):
    # nothing listens there: the context manager must not start or contact a server
    out = _run(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api")
    assert "ERRORS [] SCIENCE True" in out and "SERVERS 0" in out, out
