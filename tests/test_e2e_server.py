"""End to end with real parts: a real `prefect server` on localhost, the flow served as a
deployment (`flow.serve`, as a facility worker would run it), a run triggered through the
REST API exactly as the UI's "Run" button does, then the product and the catalog checked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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


sys.path.insert(0, str(Path(__file__).parents[1] / "infra"))
from local_stack import prepare_server, wait_for as _wait  # noqa: E402


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
        # the facility's deployments from infra/prefect.yaml (infra/deploy.py)
        prepare_server(api, env)
        deps = {x["name"]: x for x in httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()}
        assert sorted(deps) == ["discover_and_process", "process_scan", "reprocess"]
        assert deps["discover_and_process"]["schedules"][0]["schedule"]["cron"] == "*/10 * * * *"
        assert deps["reprocess"]["work_pool_name"] == "xrdct-gpu"
        assert deps["process_scan"]["global_concurrency_limit"]["limit"] == 4
        served = subprocess.Popen(
            [sys.executable, "-c", "import asyncio; from prefect.runner import Runner; "
             "from flows.facility import process_scan, discover_and_process as d; "
             "r = Runner(limit=3); r.add_flow(process_scan, name='e2e'); r.add_flow(d, name='e2e'); "
             "asyncio.run(r.start())"],
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

        def finished_run(i):
            st = httpx.get(f"{api}/flow_runs/{i}", timeout=5).json()["state"]
            return st if st and st["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None
        state = _wait(lambda: finished_run(run_id), 420, "flow run")
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

        # Two discovery runs back to back (a schedule tick while the last one's runs are
        # still queued) submit keyed process_scan runs: one flow run per scan, one product.
        raw = tmp_path / "raw"
        simulate_scan(raw / "a", preset("small").model_copy(update={"seed": 5}))
        out2 = tmp_path / "products2"
        disc = _wait(lambda: (lambda r: r.json() if r.status_code == 200 else None)(
            httpx.get(f"{api}/deployments/name/discover_and_process/e2e", timeout=5)), 60, "discovery")
        params = {"root": str(raw), "pipeline": "demo", "poni": str(raw / "a" / "scan.poni"),
                  "out": str(out2), "deployment": "process_scan/e2e"}
        ids = [httpx.post(f"{api}/deployments/{disc['id']}/create_flow_run", timeout=10,
                          json={"parameters": params}).json()["id"] for _ in range(2)]
        for i in ids:
            st = _wait(lambda: finished_run(i), 300, "discovery run")
            assert st["type"] == "COMPLETED", st

        def process_runs():
            r = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
                "deployments": {"id": {"any_": [dep["id"]]}}, "limit": 50})
            return [x for x in r.json() if x["id"] != run_id]
        keyed = process_runs()
        assert len(keyed) == 1 and keyed[0]["idempotency_key"].startswith("xrdct-"), keyed
        st = _wait(lambda: finished_run(keyed[0]["id"]), 420, "keyed process_scan run")
        assert st["type"] == "COMPLETED", (st, (tmp_path / "serve.log").read_text()[-3000:])
        made = list(out2.glob("*.zarr"))
        assert len(made) == 1 and keyed[0]["idempotency_key"] == "xrdct-" + made[0].stem
        # a later submission of the same product gets that flow run back, not a new one
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from flows.facility import submit
        with temporary_settings({PREFECT_API_URL: api}):
            again = submit("process_scan/e2e", keyed[0]["parameters"]["scan"], "demo", str(out2),
                           keyed[0]["parameters"]["poni"], made[0].stem)
        assert again == keyed[0]["id"] and len(process_runs()) == 1
    finally:
        for p in (served, server):
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
