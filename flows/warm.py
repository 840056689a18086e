"""Start-up work of a Prefect run that can overlap.

Without a configured Prefect API (``PREFECT_API_URL`` unset) the first flow call starts
Prefect's ephemeral API server (``prefect.server.api.server.SubprocessASGIServer``: a
uvicorn subprocess that imports the server and migrates its database) and waits for it:
4-5 s on 2 idle cores, up to 20 s under load, while this process does nothing. The stages
then import pyFAI, dask, distributed, zarr and xarray (3-6 s) one after the other.
:func:`prefect_api_started_meanwhile` starts the server from a background thread and lets
the caller import the science stack in the meantime, so the two overlap; the flow call
after it finds the server running (``SubprocessASGIServer`` is one instance per process).
A configured server is reused as it is: nothing is started.
"""

from __future__ import annotations

import contextlib
import threading

#: what every process run imports before its first stage finishes (seconds on 2 cores)
SCIENCE_MODULES = ("pyFAI.integrator.azimuthal", "dask.array", "distributed", "zarr", "xarray")


def _start_api(errors: list) -> None:
    try:
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            return  # a configured server (or none allowed): the flow call handles it
        from prefect.server.api.server import SubprocessASGIServer

        SubprocessASGIServer().start()
    except Exception as err:  # noqa: BLE001 - the flow call starts it again and reports
        errors.append(err)


def import_science_stack() -> None:
    """Import :data:`SCIENCE_MODULES` (what the stages would import later anyway)."""
    import importlib

    for name in SCIENCE_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


@contextlib.contextmanager
def prefect_api_started_meanwhile():
    """Context manager: start Prefect's ephemeral API server in a background thread (when
    no ``PREFECT_API_URL`` is configured) while the ``with`` body runs; on exit wait until
    the server answers its health check (or the thread gave up: the flow call then starts
    the server itself and raises Prefect's own error).

    Yields
    ------
    list
        Exceptions the background start raised (empty when it worked or was not needed).
    """
    import numpy  # noqa: F401 - imported once here, not by both threads at the same time
    import pydantic  # noqa: F401

    errors: list = []
    t = threading.Thread(target=_start_api, args=(errors,), name="xrdct-prefect-api", daemon=True)
    t.start()
    try:
        yield errors
    finally:
        t.join()
