"""Start a Dask cluster whose workers are SLURM jobs (dask-jobqueue), GPU partition example.

Run it on a login/submit node that the compute nodes can reach; it prints the scheduler
address for the flows (``--dask-address`` of ``xrdct process``, or the ``dask_address``
parameter of the process_scan deployment) and keeps the cluster up until Ctrl-C::

    pip install dask-jobqueue                 # not a runtime dependency (in the dev extra)
    python infra/dask/slurm_cluster.py --partition gpu --account proposal123 --jobs 2
    python infra/dask/slurm_cluster.py --print-job-script     # inspect the sbatch script only

The values below (partition ``gpu``, 16 cores, 120 GB per job, the ``module load`` line)
are EXAMPLES: take them from the facility's SLURM documentation. Each GPU job holds one
GPU and one ``dask worker`` (no RMM pool on SLURM workers yet: planned); ``--gpus 0``
gives CPU workers. The job's Python environment needs xrdct (and the gpu extra on GPU
nodes) installed, the same version as the flows.
"""

from __future__ import annotations

import argparse
import signal
import threading


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--partition", default="gpu", help="SLURM partition (EXAMPLE: gpu)")
    p.add_argument("--account", default=None, help="SLURM account / proposal to charge")
    p.add_argument("--gpus", type=int, default=1, choices=[0, 1],
                   help="1: one GPU and one worker per job (default); 0: CPU workers")
    p.add_argument("--cores", type=int, default=16, help="cores per job")
    p.add_argument("--memory", default="120GB", help="host memory per job")
    p.add_argument("--walltime", default="04:00:00")
    p.add_argument("--jobs", type=int, default=1, help="jobs to start (fixed size)")
    p.add_argument("--adapt-max", type=int, default=0,
                   help="instead of --jobs: adapt between 0 and this many jobs to the load")
    p.add_argument("--port", type=int, default=8786, help="scheduler port")
    p.add_argument("--interface", default=None, help="network interface the workers reach (e.g. ib0)")
    p.add_argument("--prologue", action="append",
                   default=None, help="shell line run before the worker (repeatable); "
                   "default: 'module load cuda' when --gpus > 0 (EXAMPLE)")
    p.add_argument("--print-job-script", action="store_true", help="print the sbatch script and exit")
    return p


def make_cluster(args: argparse.Namespace):
    """The SLURMCluster (no jobs submitted yet). Imports dask_jobqueue lazily.

    A GPU job holds ONE GPU and runs ONE worker process: SLURM's ``--gres=gpu:1`` sets
    CUDA_VISIBLE_DEVICES for the job, so the worker uses its own device without dask-cuda's
    pinning, with any dask-jobqueue version. Scale by jobs (one per GPU). The worker carries
    the Dask resource ``GPU=1``.
    """
    from dask_jobqueue import SLURMCluster  # noqa: PLC0415 - optional, facility-side

    gpu = args.gpus > 0
    prologue = args.prologue if args.prologue is not None else (["module load cuda"] if gpu else [])
    return SLURMCluster(
        queue=args.partition,
        account=args.account,
        cores=args.cores,
        processes=1 if gpu else max(1, args.cores // 4),
        memory=args.memory,
        walltime=args.walltime,
        interface=args.interface,
        job_extra_directives=["--gres=gpu:1"] if gpu else [],
        job_script_prologue=prologue,
        worker_extra_args=["--resources", "GPU=1"] if gpu else [],
        scheduler_options={"port": args.port, "dashboard_address": ":8787"},
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cluster = make_cluster(args)
    if args.print_job_script:
        print(cluster.job_script())
        cluster.close()
        return 0
    if args.adapt_max > 0:
        cluster.adapt(minimum_jobs=0, maximum_jobs=args.adapt_max)
    else:
        cluster.scale(jobs=args.jobs)
    print(f"Dask scheduler at {cluster.scheduler_address}; dashboard {cluster.dashboard_link}", flush=True)
    print("attach: xrdct process ... --dask-address " + cluster.scheduler_address, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    cluster.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
