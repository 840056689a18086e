"""Screenshots of the Prefect UI after one real ``process_scan`` run, with its artifacts.

Run:  python benchmarks/ui_screenshot.py [OUTDIR]      (default ./ui-screenshots)

What it does, all on 127.0.0.1 with throw-away state in a temp directory:

1. starts ``prefect server start`` (with the UI; PREFECT_HOME in the temp dir) on a free
   port and waits for ``/api/health``;
2. simulates the ``small`` preset scan and serves the product directory with
   ``python -m http.server`` so the overview image artifact (a URL) renders in the UI;
3. runs ``flows.facility.process_scan`` in a subprocess against that server, with
   ``XRDCT_PRODUCTS_URL`` pointing at the file server;
4. finds the flow run through the REST API and takes headless Chromium screenshots of the
   flow-run page (``flow-run.png``), its Artifacts tab (``flow-run-artifacts.png``; the
   UI resets ``?tab=Artifacts`` while the run loads, so the tab is clicked over the
   DevTools protocol), the artifacts list (``artifacts.png``) and each artifact's own page,
   where its content renders (``artifact-markdown.png``: the summary table,
   ``artifact-image.png``: the overview PNG);
5. prints the PNG paths and terminates every subprocess it started (also on error).

Needs ``chromium`` (Debian: ``apt-get install -y chromium``); the script does not install it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 10.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode() or "null")


def wait_for(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready at {url} after {timeout:.0f} s")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return None


def screenshot(chromium: str, url: str, png: Path, tmp: Path, budget_ms: int) -> None:
    profile = Path(tempfile.mkdtemp(prefix="chrome-", dir=tmp))
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--window-size=1600,1000", f"--virtual-time-budget={budget_ms}",
           f"--screenshot={png}", url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot for {url} (rc {r.returncode}):\n"
                           f"{r.stderr[-2000:]}")


def screenshot_after_click(chromium: str, url: str, text: str, png: Path, tmp: Path,
                           wait_ms: int) -> None:
    """Load ``url`` in headless Chromium, click the element whose text is ``text`` (a tab),
    and screenshot, driving Chromium over the DevTools protocol (``websockets``, a Prefect
    dependency)."""
    import base64

    from websockets.sync.client import connect

    profile = Path(tempfile.mkdtemp(prefix="chrome-", dir=tmp))
    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
         "--window-size=1600,1000", "--remote-debugging-port=0",
         "--remote-allow-origins=*", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        t0 = time.time()
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() - t0 > 30 or proc.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        targets = http_json(f"http://127.0.0.1:{port}/json/list")
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        with connect(ws_url, max_size=None, open_timeout=10) as ws:
            n = [0]

            def call(method, **params):
                n[0] += 1
                ws.send(json.dumps({"id": n[0], "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv(timeout=60))
                    if msg.get("id") == n[0]:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        return msg.get("result", {})

            call("Emulation.setDeviceMetricsOverride", width=1600, height=1000,
                 deviceScaleFactor=1, mobile=False)
            call("Page.navigate", url=url)
            js = ("(() => { const el = [...document.querySelectorAll('button, a, [role=tab], li')]"
                  f".find(e => e.textContent.trim() === {json.dumps(text)});"
                  " if (!el) return false; el.click(); return true; })()")
            t0 = time.time()
            while True:  # the tab appears once the app has loaded the run
                time.sleep(1)
                if call("Runtime.evaluate", expression=js, returnByValue=True)["result"].get("value"):
                    break
                if time.time() - t0 > wait_ms / 1000:
                    raise RuntimeError(f"no element {text!r} on {url}")
            time.sleep(max(3.0, wait_ms / 3000))  # let the tab's content load and render
            shot = call("Page.captureScreenshot", format="png")
            png.write_bytes(base64.b64decode(shot["data"]))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", nargs="?", default="ui-screenshots",
                    help="where the PNGs go (default ./ui-screenshots)")
    ap.add_argument("--budget-ms", type=int, default=15000,
                    help="Chromium --virtual-time-budget per page (default 15000)")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = ap.parse_args(argv)

    chromium = find_chromium()
    if chromium is None:
        print("error: chromium not found; install it (Debian: apt-get update && "
              "apt-get install -y chromium) and rerun", file=sys.stderr)
        return 2

    outdir = Path(args.outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="xrdct-ui-"))
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        port, port2 = free_port(), free_port()
        api = f"http://127.0.0.1:{port}/api"
        ui = f"http://127.0.0.1:{port}"
        env = dict(os.environ)
        for k in list(env):
            if k.startswith("PREFECT_"):
                env.pop(k)
        env.update(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_API_URL=api,
                   PREFECT_SERVER_UI_API_URL=api, PREFECT_UI_API_URL=api,
                   PREFECT_UI_URL=ui, PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
                   PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port))

        def spawn(cmd, name, **kw):
            log = open(tmp / f"{name}.log", "w")
            logs.append(log)
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True, **kw)
            procs.append(p)
            return p

        print(f"prefect server on {ui} (state in {tmp})", flush=True)
        server = spawn(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                       "server")

        from tasks.simulate import preset, simulate_scan

        print("simulating the 'small' scan ...", flush=True)
        sim = simulate_scan(tmp / "scan", preset("small"))
        out = tmp / "products"
        out.mkdir()
        files = spawn([sys.executable, "-m", "http.server", str(port2), "--bind", "127.0.0.1",
                       "--directory", str(out)], "files")
        wait_for(f"{api}/health", server, 120, "prefect server")
        wait_for(f"http://127.0.0.1:{port2}/", files, 30, "file server")

        print("running process_scan against the server ...", flush=True)
        env_flow = dict(env, XRDCT_PRODUCTS_URL=f"http://127.0.0.1:{port2}/")
        code = ("from flows.facility import process_scan; "
                f"print(process_scan(scan={str(sim.nexus_path)!r}, poni={str(sim.poni_path)!r}, "
                f"pipeline='demo', out={str(out)!r}))")
        r = subprocess.run([sys.executable, "-c", code], env=env_flow, cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
        (tmp / "flow.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            raise RuntimeError(f"process_scan failed (rc {r.returncode}):\n{r.stderr[-3000:]}")

        runs = http_json(f"{api}/flow_runs/filter",
                         {"limit": 5, "offset": 0, "sort": "START_TIME_DESC"})
        runs = [fr for fr in runs if fr.get("parent_task_run_id") is None] or runs
        if not runs:
            raise RuntimeError("the server has no flow run")
        fr = runs[0]
        print(f"flow run {fr['name']} ({fr['id']}): {fr['state_type']}", flush=True)
        arts = http_json(f"{api}/artifacts/filter", {"limit": 20, "offset": 0,
                                                     "sort": "CREATED_DESC"})
        print("artifacts: " + ", ".join(f"{a['type']}:{a.get('key')}" for a in arts), flush=True)

        pages = [("flow-run", f"{ui}/runs/flow-run/{fr['id']}"),
                 ("flow-run-artifacts", f"{ui}/runs/flow-run/{fr['id']}?tab=Artifacts"),
                 ("artifacts", f"{ui}/artifacts")]
        for a in arts:
            pages.append((f"artifact-{a['type']}", f"{ui}/artifacts/artifact/{a['id']}"))
        for name, url in pages:
            png = outdir / f"{name}.png"
            png.unlink(missing_ok=True)
            if name == "flow-run-artifacts":
                # the UI resets ?tab=Artifacts to Logs while the run loads: click the tab
                screenshot_after_click(chromium, url, "Artifacts", png, tmp, args.budget_ms)
            else:
                screenshot(chromium, url, png, tmp, args.budget_ms)
            print(f"{png}  <- {url}", flush=True)
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
