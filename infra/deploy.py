"""Create the deployments of ``infra/prefect.yaml`` on the Prefect server.

Usage (any directory; the server is the one ``PREFECT_API_URL`` names)::

    python infra/deploy.py                      # all three deployments
    python infra/deploy.py --name reprocess     # one of them (any `prefect deploy` option)

It is ``prefect --no-prompt deploy --all --prefect-file infra/prefect.yaml`` run from the
repository root, with one workaround. Prefect 3.8.8's client asks the server for a work
pool's online workers with ``"limit": null, "offset": null`` in the body, and the server
(on the FastAPI these pins allow, ``fastapi<0.155``) answers ``422 Unprocessable Entity``:
``prefect deploy --all`` creates the first deployment and stops. Here the client sends the
server's own defaults (offset 0, limit ``PREFECT_API_DEFAULT_LIMIT``) instead. The patch
lives only in this process; remove it when Prefect sends defaults itself.

The work pools must exist (``prefect work-pool create xrdct-cpu --type process``, same for
``xrdct-gpu``; the compose workers create them on first start). ``XRDCT_PROJECT_DIR``
(the directory holding ``flows/``, where flow runs start) defaults to this checkout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _patch_read_workers() -> None:
    """Make ``read_workers_for_work_pool`` send numbers, not nulls (see module docstring)."""
    from prefect.client.orchestration import PrefectClient
    from prefect.settings import PREFECT_API_DEFAULT_LIMIT

    original = PrefectClient.read_workers_for_work_pool
    if getattr(original, "_xrdct_patched", False):
        return

    async def read_workers_for_work_pool(self, work_pool_name, worker_filter=None, offset=None,
                                         limit=None):
        return await original(self, work_pool_name, worker_filter=worker_filter,
                              offset=0 if offset is None else offset,
                              limit=PREFECT_API_DEFAULT_LIMIT.value() if limit is None else limit)

    read_workers_for_work_pool._xrdct_patched = True
    PrefectClient.read_workers_for_work_pool = read_workers_for_work_pool


def main(argv: list[str] | None = None) -> int:
    """Run ``prefect deploy`` on ``infra/prefect.yaml`` (``--all`` unless ``--name`` given).

    Returns
    -------
    int
        The CLI's exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    os.chdir(ROOT)  # prefect deploy resolves the entrypoints against the current directory
    os.environ.setdefault("XRDCT_PROJECT_DIR", str(ROOT))
    _patch_read_workers()
    from prefect.cli import app

    which = [] if any(a in ("--name", "-n") or a.startswith("--name=") for a in argv) else ["--all"]
    sys.argv = ["prefect", "--no-prompt", "deploy", *which, "--prefect-file", "infra/prefect.yaml", *argv]
    try:
        app()
    except SystemExit as done:
        return int(done.code or 0) if not isinstance(done.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
