"""End to end with real parts: a real `prefect server` on localhost, the flow served as a
deployment (`flow.serve`, as a facility worker would run it), a run triggered through the
REST API exactly as the UI's "Run" button does, then the product and the catalog checked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from catalog.db import Catalog
from tasks import store
from tasks.simulate import preset, simulate_scan


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        r = pred()
        if r:
            return r
        time.sleep(1.0)
    raise TimeoutError(f"{what} not ready after {timeout} s")


@pytest.mark.slow
def test_run_button_through_rest_api(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
           "XRDCT_PRODUCTS_URL": "http://127.0.0.1:8080/products"}
    env.pop("PREFECT_PROFILE", None)
    logs = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port), "--no-ui"], env=env, stdout=logs, stderr=subprocess.STDOUT)
    served = None
    try:
        def healthy():
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        _wait(healthy, 120, "prefect server")
        served = subprocess.Popen(
            [sys.executable, "-c", "from flows.facility import process_scan; "
             "process_scan.serve(name='e2e', limit=1, print_starting_message=False)"],
            env=env, stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)

        def deployment():
            r = httpx.get(f"{api}/deployments/name/process_scan/e2e", timeout=5)
            return r.json() if r.status_code == 200 else None
        dep = _wait(deployment, 120, "deployment process_scan/e2e")

        sim = simulate_scan(tmp_path / "scan", preset("small"))
        out = tmp_path / "products"
        r = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", timeout=10,
                       json={"parameters": {"scan": str(sim.nexus_path), "poni": str(sim.poni_path),
                                            "pipeline": "demo", "out": str(out)}})
        r.raise_for_status()
        run_id = r.json()["id"]

        def finished():
            st = httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()["state"]
            return st if st and st["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None
        state = _wait(finished, 420, "flow run")
        assert state["type"] == "COMPLETED", (state, (tmp_path / "serve.log").read_text()[-3000:])

        products = list(out.glob("*.zarr"))
        assert len(products) == 1
        ds = store.open_product(products[0])
        assert ds["weight_fraction"].sizes["phase"] == 3 and float(np.nanmedian(ds["rwp"].values)) < 0.5
        arts = httpx.post(f"{api}/artifacts/filter", timeout=10,
                          json={"limit": 50, "offset": 0, "sort": "CREATED_DESC"}).json()
        kinds = {a["type"]: a for a in arts if a.get("flow_run_id") == run_id}
        assert "median Rwp" in kinds["markdown"]["data"]
        assert kinds["image"]["data"] == "http://127.0.0.1:8080/products/" + products[0].with_suffix(".png").name
        runs = Catalog.for_products(out).runs()
        assert [str(x.flow_run_id) for x in runs] == [run_id]
        assert Catalog.for_products(out).product(store.provenance(products[0])["product_id"]) is not None
    finally:
        for p in (served, server):
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
