"""Raw data on a genuinely read-only mount, as compose mounts it (``infra/compose.yaml``:
the raw and calibration directories ``:ro``, only the products writable).

The pipeline runs in a child process inside its own mount namespace (``unshare -m``), where
the raw directory is bind-mounted onto itself read-only: any attempt to create, truncate or
write a file there fails with EROFS, even as root (whom mode 0444 does not stop: see
``test_security.test_read_only_scan_processes_and_is_left_unchanged``). An audit hook in
the child also records every Python-level open of a path under the raw directory with a
write mode or flag, so that an attempt that some code swallowed would still be seen.
Skipped where mount namespaces are not allowed (not root, no CAP_SYS_ADMIN)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import subprocess_env, tree_digest

# mount the directory "$1" read-only onto itself, in this namespace only, then run the rest
MOUNT_RO = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'

CHILD = textwrap.dedent('''
    import errno, json, os, sys

    raw, prod, scan, poni = sys.argv[1:5]
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    writes = []

    def hook(event, args):
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(args[0]))
        mode, flags = args[1] or "", args[2] or 0
        if path.startswith(raw + os.sep) and (any(c in mode for c in "wax+") or flags & WRITE):
            writes.append([path, mode, flags])

    sys.addaudithook(hook)
    try:  # the mount is in force: this must fail
        open(os.path.join(raw, "probe"), "w").close()
        probe = "written"
    except OSError as err:
        probe = errno.errorcode.get(err.errno, str(err.errno))
    writes.clear()
    os.environ["XRDCT_DATA_ROOTS"] = os.pathsep.join([raw, prod])
    from flows.process import run_pipeline
    from pipelines.spec import load_spec

    # everything that reads the raw data (ingest, integration), then publish: reconstruction
    # and mapping read only the product's own work store
    spec = load_spec("demo")
    spec.reconstruction.enabled = spec.mapping.enabled = False
    product = run_pipeline(scan, poni=poni, pipeline=spec, out=prod)
    print("RESULT " + json.dumps({"probe": probe, "writes": writes, "product": product}))
''')


def _ro_mount_allowed(tmp: Path) -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    tmp.mkdir()
    r = subprocess.run(["unshare", "-m", "sh", "-c", MOUNT_RO, "sh", str(tmp), "sh", "-c",
                        'touch "$0/x" 2>/dev/null && exit 3 || exit 0', str(tmp)],
                       capture_output=True, timeout=30)
    return r.returncode == 0 and not (tmp / "x").exists()


def test_scan_on_a_read_only_mount_processes(tmp_path):
    if not _ro_mount_allowed(tmp_path / "probe"):
        pytest.skip("read-only bind mounts need a mount namespace (unshare -m as root)")
    from tasks.simulate import SimConfig, simulate_scan

    raw, prod = tmp_path / "raw", tmp_path / "products"
    sim = simulate_scan(raw / "p1", SimConfig(n_translations=16, n_angles=12, seed=3))
    before = (tree_digest(raw), sorted(str(p) for p in raw.rglob("*")))
    (tmp_path / "child.py").write_text(CHILD)
    r = subprocess.run(["unshare", "-m", "sh", "-c", MOUNT_RO, "sh", str(raw), sys.executable,
                        str(tmp_path / "child.py"), str(raw), str(prod), str(sim.nexus_path),
                        str(sim.poni_path)],
                       capture_output=True, text=True, timeout=600, env=subprocess_env(),
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert res["probe"] == "EROFS"          # the raw directory really was read-only
    assert res["writes"] == []              # and nothing even tried to open a raw file writable
    product = Path(res["product"])
    assert product.parent == prod.resolve() and (product / "zarr.json").is_file()
    assert (tree_digest(raw), sorted(str(p) for p in raw.rglob("*"))) == before
    # outside the namespace the directory is writable as before (the mount was private)
    (raw / "after").write_text("x")
    assert os.access(raw, os.W_OK)
