"""A Prefect server on localhost made ready for the facility's deployments: wait until its
API answers, create the work pools and deploy ``infra/prefect.yaml`` (``infra/deploy.py``).
Shared by the end-to-end test (tests/test_e2e_server.py) and the soak benchmark
(benchmarks/soak.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POOLS = ("xrdct-cpu", "xrdct-gpu")


def wait_for(pred, timeout: float, what: str):
    """Call ``pred`` every second until it returns something true (returned); TimeoutError
    naming ``what`` after ``timeout`` seconds."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        r = pred()
        if r:
            return r
        time.sleep(1.0)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def healthy(api: str) -> bool:
    """Whether the Prefect API at ``api`` answers its health check."""
    import httpx

    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def prepare_server(api: str, env: dict, *, names: list[str] | None = None,
                   startup_timeout: float = 180) -> subprocess.CompletedProcess:
    """Wait for the server, create the process work pools, deploy (all of infra/prefect.yaml,
    or the deployments ``names``). Raises RuntimeError with the deploy output on failure."""
    wait_for(lambda: healthy(api), startup_timeout, "prefect server")
    for pool in POOLS:
        subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", pool, "--type",
                        "process"], env=env, check=True, capture_output=True, timeout=180)
    cmd = [sys.executable, "infra/deploy.py"] + [a for n in (names or []) for a in ("--name", n)]
    d = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if d.returncode != 0:
        raise RuntimeError("infra/deploy.py failed:\n" + d.stdout[-2000:] + d.stderr[-2000:])
    return d
