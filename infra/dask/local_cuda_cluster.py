"""Start a Dask-CUDA cluster on this GPU host and keep it running until Ctrl-C.

One worker per visible GPU (``dask_cuda.LocalCUDACluster``), each with an RMM memory pool,
so device allocations inside xrdct's stages come from a pre-reserved pool instead of
cudaMalloc per chunk. Flows attach to it by address::

    python infra/dask/local_cuda_cluster.py --port 8786 --rmm-pool-size 0.8
    xrdct process scan.nxs --dask-address tcp://gpu-host:8786 ...
    # or the process_scan deployment's `dask_address` parameter in the Prefect UI

Needs the ``gpu`` extra (``pip install -e ".[gpu]"``: cupy, dask-cuda); dask_cuda is
imported only when the cluster is started, so this file imports on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def _pool_size(text: str | None):
    """``"0.8"`` -> 0.8 (fraction of each GPU's memory), ``"24GB"`` -> ``"24GB"``, none -> None."""
    if text is None or text.lower() in ("", "none", "0"):
        return None
    try:
        return float(text)
    except ValueError:
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="0.0.0.0", help="scheduler interface address (default: all)")
    p.add_argument("--port", type=int, default=8786, help="scheduler port (default 8786)")
    p.add_argument("--dashboard-address", default=":8787", help="dashboard (default :8787; '' for none)")
    p.add_argument("--devices", default=None,
                   help="GPUs to use, e.g. '0,1' (default: CUDA_VISIBLE_DEVICES, else all)")
    p.add_argument("--rmm-pool-size", default="0.8",
                   help="RMM pool per worker: fraction of GPU memory (0.8) or size ('24GB'); 'none' for no pool")
    p.add_argument("--threads-per-worker", type=int, default=1)
    p.add_argument("--protocol", default="tcp", choices=["tcp", "ucx"],
                   help="ucx needs ucx-py and NVLink/InfiniBand to pay off")
    return p


def start(args: argparse.Namespace):
    """Start the cluster; returns (cluster, client). Imports dask_cuda lazily."""
    try:
        from dask_cuda import LocalCUDACluster  # noqa: PLC0415 - lazy: optional GPU extra
    except ImportError as exc:  # pragma: no cover - depends on the machine
        sys.exit(f"local_cuda_cluster.py: dask_cuda is not installed ({exc}); "
                 "install the gpu extra: pip install -e '.[gpu]'")
    from distributed import Client  # noqa: PLC0415

    cluster = LocalCUDACluster(
        host=args.host,
        scheduler_port=args.port,
        dashboard_address=args.dashboard_address or None,
        CUDA_VISIBLE_DEVICES=args.devices,
        rmm_pool_size=_pool_size(args.rmm_pool_size),
        threads_per_worker=args.threads_per_worker,
        protocol=args.protocol,
    )
    return cluster, Client(cluster)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cluster, client = start(args)
    n = len(client.scheduler_info()["workers"])
    print(f"Dask-CUDA scheduler at {cluster.scheduler_address} ({n} GPU worker(s)); "
          f"dashboard {cluster.dashboard_link}", flush=True)
    print("attach: xrdct process ... --dask-address " + cluster.scheduler_address, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    client.close()
    cluster.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
