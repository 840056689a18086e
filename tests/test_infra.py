"""infra/: the Prefect project file, the compose stack, credentials and the Dask scripts.

Fast, structural checks (no Docker, GPU or SLURM here): the files parse, say what the
facility page says they say, keep every credential out of the repository, and point at
flows that exist.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import inspect
import os
import py_compile
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
NAMES = ("process_scan", "discover_and_process", "reprocess")
ENV_REF = re.compile(r"\$\{[A-Z][A-Z0-9_]*(:?[?-][^}]*)?\}")  # ${VAR}, ${VAR:?msg}, ${VAR:-x}


def _prefect_yaml() -> dict:
    return yaml.safe_load((INFRA / "prefect.yaml").read_text())


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _deployments() -> dict[str, dict]:
    return {d["name"]: d for d in _prefect_yaml()["deployments"]}


# ---------------------------------------------------------------- prefect.yaml


def test_prefect_yaml_validates_with_prefects_own_model():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(_prefect_yaml())
    assert len(model.deployments) == 3
    assert sorted(d.name for d in model.deployments) == sorted(NAMES)


def test_entrypoints_name_facility_flows():
    deps = _deployments()
    assert set(deps) == set(NAMES)
    for name, d in deps.items():
        assert d["entrypoint"] == f"flows/facility.py:{name}"
        assert d["tags"] and "xrdct" in d["tags"], name


def test_pull_step_sets_working_directory_without_clone(monkeypatch):
    cfg = _prefect_yaml()
    assert cfg.get("build") is None and cfg.get("push") is None
    assert len(cfg["pull"]) == 1
    (step,) = cfg["pull"]
    assert list(step) == ["prefect.deployments.steps.set_working_directory"]
    directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
    assert directory == "{{ $XRDCT_PROJECT_DIR }}"
    # the placeholder resolves from the (worker's) environment, as the step runner does
    from prefect.utilities.templating import apply_values

    monkeypatch.setenv("XRDCT_PROJECT_DIR", str(ROOT))
    assert Path(apply_values({"d": directory}, os.environ)["d"]) == ROOT
    assert "git_clone" not in (INFRA / "prefect.yaml").read_text()


def test_discovery_cron_is_every_ten_minutes():
    from cronsim import CronSim
    from prefect.client.schemas.schedules import CronSchedule

    deps = _deployments()
    (sched,) = deps["discover_and_process"]["schedules"]
    cron = CronSchedule(cron=sched["cron"], timezone=sched["timezone"])  # validates the string
    assert sched["active"] is True
    start = dt.datetime(2026, 1, 1, 0, 3, tzinfo=dt.timezone.utc)
    it = CronSim(cron.cron, start)
    fires = [next(it) for _ in range(7)]
    assert fires[0] == dt.datetime(2026, 1, 1, 0, 10, tzinfo=dt.timezone.utc)
    assert {(b - a).total_seconds() for a, b in zip(fires, fires[1:])} == {600.0}
    # the on-demand deployments have no schedule
    assert not deps["process_scan"].get("schedules")
    assert not deps["reprocess"].get("schedules")


def test_concurrency_limits():
    deps = _deployments()
    ps = deps["process_scan"]["concurrency_limit"]
    assert ps["limit"] >= 1 and ps["collision_strategy"] == "ENQUEUE"
    disc = deps["discover_and_process"]["concurrency_limit"]
    assert disc == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    for d in deps.values():
        ConcurrencyLimitStrategy(d["concurrency_limit"]["collision_strategy"])


def test_work_pools_cpu_and_gpu():
    deps = _deployments()
    pools = {name: d["work_pool"]["name"] for name, d in deps.items()}
    assert pools == {"process_scan": "xrdct-cpu", "discover_and_process": "xrdct-cpu",
                     "reprocess": "xrdct-gpu"}
    gpu_env = deps["reprocess"]["work_pool"]["job_variables"]["env"]
    assert "XRDCT_DASK_ADDRESS" in gpu_env
    assert "XRDCT_DASK_ADDRESS" not in deps["process_scan"]["work_pool"]["job_variables"]["env"]
    # compose starts one process worker per pool
    cmds = {s: " ".join(c["command"]) for s, c in _compose()["services"].items()
            if s.startswith("worker-")}
    assert cmds == {
        "worker-cpu": "prefect worker start --pool xrdct-cpu --type process",
        "worker-gpu": "prefect worker start --pool xrdct-gpu --type process",
    }


def test_example_paths_are_marked():
    text = (INFRA / "prefect.yaml").read_text()
    for line in text.splitlines():
        if re.search(r":\s*/data/", line):
            assert "EXAMPLE" in line, line


def _facility():
    if not (ROOT / "flows" / "facility.py").exists():
        pytest.skip("flows/facility.py not written yet")
    import flows.facility as facility

    return facility


def test_entrypoints_are_prefect_flows_and_parameters_fit():
    facility = _facility()
    import prefect

    for name, d in _deployments().items():
        path, attr = d["entrypoint"].split(":")
        assert (ROOT / path).exists()
        obj = getattr(facility, attr)
        assert isinstance(obj, prefect.Flow), f"{attr} is {type(obj)}"
        assert obj.name == name
        sig = inspect.signature(obj.fn)
        params = d.get("parameters") or {}
        unknown = set(params) - set(sig.parameters)
        assert not unknown, f"{name}: parameters the flow does not take: {unknown}"
        required = {p for p, v in sig.parameters.items() if v.default is inspect.Parameter.empty}
        if name != "process_scan":  # process_scan's scan is given per run in the UI form
            assert required <= set(params), f"{name}: required parameters without a value"


# ---------------------------------------------------------------- compose.yaml


def _env_items(compose: dict):
    for sname, svc in compose["services"].items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{sname}: environment as a mapping"
        for k, v in env.items():
            yield sname, k, str(v)


SECRET_KEY = re.compile(r"PASSWORD|AUTH_STRING|SECRET|TOKEN|API_KEY")


def test_compose_has_no_literal_credentials():
    compose = _compose()
    n_secret = n_url = 0
    for sname, key, value in _env_items(compose):
        if SECRET_KEY.search(key):
            assert ENV_REF.fullmatch(value), f"{sname}.{key} = {value!r} is not an env reference"
            n_secret += 1
        m = re.search(r"://([^:/@]+):(.*)@", value)
        if m:  # user:password@ in a URL: the password is an env reference
            assert ENV_REF.fullmatch(m.group(2)), f"{sname}.{key}: literal password in URL"
            n_url += 1
    assert n_secret >= 6 and n_url >= 3
    text = "\n".join(line for line in (INFRA / "compose.yaml").read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    assert "change-me" not in text and "admin:" not in text
    # every required variable is one make_env.sh writes
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert required == {"POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD", "XRDCT_DB_PASSWORD",
                        "PREFECT_AUTH_STRING"}


def test_compose_server_auth_and_databases():
    svcs = _compose()["services"]
    assert {"postgres", "prefect-server", "worker-cpu", "worker-gpu"} <= set(svcs)
    server = svcs["prefect-server"]["environment"]
    assert server["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING:?")
    db_url = server["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url.startswith("postgresql+asyncpg://prefect:") and db_url.endswith("@postgres:5432/prefect")
    for w in ("worker-cpu", "worker-gpu"):
        env = svcs[w]["environment"]
        assert env["PREFECT_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING:?")
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        cat = env["XRDCT_CATALOG_URL"]
        assert cat.startswith("postgresql+psycopg://xrdct:") and cat.endswith("@postgres:5432/xrdct")
        assert env["XRDCT_PROJECT_DIR"] == "/opt/xrdct"
        assert "/data/xrdct/raw:ro" in " ".join(svcs[w]["volumes"])  # see test_security
    # the settings names exist in the installed Prefect
    import prefect.settings as ps

    assert hasattr(ps, "PREFECT_SERVER_API_AUTH_STRING") and hasattr(ps, "PREFECT_API_AUTH_STRING")
    assert hasattr(ps, "PREFECT_API_DATABASE_CONNECTION_URL")
    init = (INFRA / "postgres" / "init-databases.sh").read_text()
    assert "CREATE DATABASE prefect" in init and "CREATE DATABASE xrdct" in init
    mounted = " ".join(svcs["postgres"]["volumes"])
    assert "./postgres/init-databases.sh:/docker-entrypoint-initdb.d/" in mounted


def test_compose_healthchecks_and_gpu_reservation():
    svcs = _compose()["services"]
    for s in ("postgres", "prefect-server", "worker-cpu", "worker-gpu", "products"):
        assert svcs[s]["healthcheck"]["test"], s
    assert "/api/health" in " ".join(svcs["prefect-server"]["healthcheck"]["test"])
    assert svcs["worker-cpu"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    devices = svcs["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "deploy" not in svcs["worker-cpu"]
    # the server and file server bind to localhost unless the operator says otherwise
    assert svcs["prefect-server"]["ports"] == ["${PREFECT_BIND:-127.0.0.1}:4200:4200"]
    assert "postgres" in svcs and "ports" not in svcs["postgres"]


def test_env_example_holds_placeholders_only():
    keys, values = [], []
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, v = line.split("=", 1)
            keys.append(k)
            values.append(v)
    assert sorted(keys) == sorted(["POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD",
                                   "XRDCT_DB_PASSWORD", "PREFECT_AUTH_STRING"])
    assert all("change-me" in v for v in values)


def test_dotenv_is_ignored_by_git():
    assert ".env" in (INFRA / ".gitignore").read_text().split()
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=ROOT)
    assert r.returncode == 0, "infra/.env would be committed"
    r = subprocess.run(["git", "check-ignore", "-q", "infra/.env.example"], cwd=ROOT)
    assert r.returncode == 1, "infra/.env.example must stay tracked"


# ---------------------------------------------------------------- make_env.sh


def _read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v
    return out


def _secrets(env: dict[str, str]) -> list[str]:
    vals = [v for k, v in env.items() if k.endswith("PASSWORD")]
    user, pw = env["PREFECT_AUTH_STRING"].split(":", 1)
    assert user
    return vals + [pw]


def test_make_env_writes_random_private_secrets(tmp_path):
    script = INFRA / "make_env.sh"
    a, b = tmp_path / "a.env", tmp_path / "b.env"
    r = subprocess.run(["sh", str(script), str(a)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["sh", str(script)], capture_output=True, text=True,
                       env={**os.environ, "XRDCT_ENV_FILE": str(b)})
    assert r.returncode == 0, r.stderr
    assert not (INFRA / ".env.tmp").exists()
    seen = []
    for p in (a, b):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        env = _read_env(p)
        assert set(env) == {"POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD", "XRDCT_DB_PASSWORD",
                            "PREFECT_AUTH_STRING"}
        s = _secrets(env)
        assert len(s) == 4
        assert all(len(x) >= 24 and re.fullmatch(r"[0-9a-f]+", x) for x in s), s
        seen += s
    assert len(set(seen)) == len(seen) == 8  # distinct within and across runs
    # no overwrite without FORCE=1
    before = a.read_text()
    r = subprocess.run(["sh", str(script), str(a)], capture_output=True, text=True)
    assert r.returncode != 0 and a.read_text() == before
    r = subprocess.run(["sh", str(script), str(a)], capture_output=True, text=True,
                       env={**os.environ, "FORCE": "1"})
    assert r.returncode == 0 and a.read_text() != before
    assert stat.S_IMODE(a.stat().st_mode) == 0o600
    assert not list(tmp_path.glob("*.tmp.*"))


# ---------------------------------------------------------------- Dask scripts


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dask_scripts_compile_and_import_without_gpu_packages():
    scripts = sorted((INFRA / "dask").glob("*.py"))
    assert {p.name for p in scripts} >= {"local_cuda_cluster.py", "slurm_cluster.py"}
    for p in scripts:
        py_compile.compile(str(p), doraise=True)
    before = set(sys.modules)
    cuda = _load(INFRA / "dask" / "local_cuda_cluster.py")
    assert "dask_cuda" not in set(sys.modules) - before  # imported lazily
    args = cuda.build_parser().parse_args(["--port", "9786", "--rmm-pool-size", "24GB"])
    assert args.port == 9786
    assert cuda._pool_size("0.8") == 0.8 and cuda._pool_size("24GB") == "24GB"
    assert cuda._pool_size("none") is None


def test_slurm_job_script():
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue not installed (pip install -e .[dev])")
    slurm = _load(INFRA / "dask" / "slurm_cluster.py")
    args = slurm.build_parser().parse_args(["--account", "p123", "--port", "0"])
    cluster = slurm.make_cluster(args)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p gpu" in script and "#SBATCH -A p123" in script
    assert "#SBATCH --gres=gpu:1" in script and "--resources GPU=1" in script
    assert "module load cuda" in script


def test_slurm_job_script_starts_a_worker_that_joins(tmp_path):
    """No SLURM here: run the body of the generated sbatch script with bash (the #SBATCH
    lines are comments to bash) and check that the worker it starts joins the cluster's
    scheduler and computes (the part of a SLURM job that is ours, not SLURM's)."""
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue not installed (pip install -e .[dev])")
    from distributed import Client

    slurm = _load(INFRA / "dask" / "slurm_cluster.py")
    args = slurm.build_parser().parse_args(["--gpus", "0", "--cores", "1", "--memory", "2GB",
                                            "--port", "0", "--interface", "lo"])
    cluster = slurm.make_cluster(args)
    job = tmp_path / "job.sh"
    job.write_text(cluster.job_script())
    root = str(Path(__file__).parents[1])
    worker = subprocess.Popen(["bash", str(job)], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONPATH": root})
    try:
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=120)
            from tasks.reconstruct import circle_mask
            assert int(client.submit(lambda n: int(circle_mask(n).sum()), 9).result(timeout=60)) == \
                int(circle_mask(9).sum())
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        cluster.close()
