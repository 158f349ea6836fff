#!/usr/bin/env python3
"""What an askap_flows sub-flow costs on top of bare SLURM, on the project's SLURM test bed.

Workload W: RUNS MPI runs of the hello program, each on 2 nodes with 4 ranks (2 per node).

* subflows: one parent Prefect flow runs the RUNS ``mpi_subflow(backend="slurm",
  profile="testbed")`` calls at once through ``run_subflows`` (each builds its own SLURMCluster:
  one 2-node job whose Dask worker runs the ``srun`` line).
* floor: the same job scripts (the library's rendered sbatch header and environment) with the Dask
  worker line replaced by the same ``srun`` line, all submitted with ``sbatch --parsable``;
  completion is when ``squeue`` stops listing a job as pending/running/completing (polled every
  0.1 s).

Repetitions are interleaved (floor and sub-flows alternate which goes first); each repetition also
runs one sub-flow alone and one bare job alone. Prints one JSON object (medians, the ratio, every
sample, and the sub-flows' phase breakdown from ``MPIRunResult.timings``).

    source /tmp/askap_testbed/env.sh
    .venvs/prefect3/bin/python benchmarks/overhead.py --out benchmarks/results/overhead.json

Uses PREFECT_API_URL if set; else starts PostgreSQL (scripts/postgres_database.sh) and a Prefect
server on loopback for the run. Its SLURM jobs are named askapbench-*; nothing else is touched.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _batch
import _bench
import _dask_floor
import _pool_bench

from askap_flows import mpi  # noqa: E402
from askap_flows.mpi import launch_command  # noqa: E402

PREFIX = "askapbench"
MPI = {"nodes": 2, "ntasks": 4, "ntasks_per_node": 2}
ALLOC = {"nodes": 2, "ntasks_per_node": 2, "job_name_prefix": PREFIX}
PHASES = ("checks", "prefect_start", "cluster_start", "worker_wait", "srun", "teardown", "total")


# --------------------------------------------------------------------------- the floor
def floor_script(alloc, spec, program: str, name: str, log_dir: Path) -> str:
    """The sub-flow's own job script (rendered by the library) running the srun line itself."""
    from askap_flows import slurm

    kwargs = slurm.run_cluster_kwargs(alloc, name, log_dir)
    lines = slurm.render_job_script(kwargs).splitlines()
    worker = [i for i, line in enumerate(lines) if "distributed.cli.dask_worker" in line]
    assert len(worker) == 1, "the rendered job script has no single Dask worker line"
    lines[worker[0]] = shlex.join(mpi.launch_command(spec, program))
    return "\n".join(lines) + "\n"


def run_floor(n: int, alloc, spec, program: str, work: Path, tag: str) -> dict:
    """Submit n job scripts with sbatch --parsable; poll squeue every 0.1 s until all are done."""
    log_dir = work / "floor"
    log_dir.mkdir(parents=True, exist_ok=True)
    scripts = []
    for i in range(n):
        name = f"{PREFIX}-floor-{tag}-{i}"
        path = log_dir / f"{name}.sh"
        path.write_text(floor_script(alloc, spec, program, name, log_dir))
        scripts.append((name, path))
    submitted: dict[str, float] = {}
    names: dict[str, str] = {}
    started, cpu = time.monotonic(), _bench.cpu_mark()
    for name, path in scripts:
        t = time.monotonic()
        out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True,
                             check=True).stdout.strip()
        job_id = out.split(";")[0]
        submitted[job_id], names[job_id] = t, name
    try:
        ended = _batch.wait_jobs_gone(list(submitted), 600)
    except RuntimeError as exc:
        raise SystemExit(f"floor: {exc}") from None
    wall, cpu_used = max(ended.values()) - started, _bench.cpu_used(cpu)
    failures = floor_failures(names, log_dir, spec)
    return {"n": n, "wall_seconds": round(wall, 3), **cpu_used, "failures": len(failures),
            "errors": failures[:3],
            "latencies": sorted(round(ended[j] - submitted[j], 3) for j in submitted)}


# --------------------------------------------------------------------------- the sub-flows
def floor_failures(names: dict[str, str], log_dir: Path, spec) -> list[str]:
    """The floor jobs (id -> name) whose ranks did not make the world ``spec`` asks for."""
    failures = []
    for job_id, name in names.items():
        text = (log_dir / f"{name}-{job_id}.out").read_text(errors="replace")
        try:
            mpi.check_world(mpi.parse_ranks(text), spec)
        except mpi.MPIError as exc:
            failures.append(f"job {job_id}: {exc}")
    return failures


def run_subflow_batch(n: int, program: str, tag: str) -> dict:
    """n mpi_subflow calls at once inside one parent flow; wall time around the parent call."""
    from askap_flows.flows import mpi_subflow

    parent, latencies = _batch.batch_flow("bench-overhead", lambda _held, i: mpi_subflow(
        MPI, ALLOC, backend="slurm", profile="testbed", program=program,
        name=f"{PREFIX}-{tag}-{i}"))
    result = _batch.timed_batch(parent, n, latencies, MPI["ntasks"])
    result["timings"] = [{k: round(v, 3) for k, v in o.value.timings.items()}
                         for o in result.pop("outcomes") if o.ok]
    return result


# --------------------------------------------------------------------------- summary
def summarize(samples: list[dict], key: str) -> dict:
    walls = [s["wall_seconds"] for s in samples]
    lat = [v for s in samples for v in s["latencies"]]
    busy = [s["cpu_seconds"] for s in samples if "cpu_seconds" in s]
    return {"median_wall_seconds": _bench.median(walls),
            "median_cpu_seconds": _bench.median(busy) if busy else None,
            "steal_seconds": (round(sum(s["steal_seconds"] for s in samples), 2)
                              if all("steal_seconds" in s for s in samples) else None),
            "median_latency_seconds": _bench.median(lat),
            "failures": sum(s["failures"] for s in samples), "runs": len(samples), "kind": key}


def breakdown(samples: list[dict]) -> dict:
    rows = [t for s in samples for t in s.get("timings", [])]
    return {p: _bench.median([r[p] for r in rows if p in r]) for p in PHASES}


def medians_by_key(samples: list[dict]) -> dict:
    rows = [t for s in samples for t in s.get("timings", [])]
    keys = sorted({k for r in rows for k in r})
    return {k: _bench.median([r[k] for r in rows if k in r]) for k in keys}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def over(summary: dict, kind: str, floor: str, field: str = "median_wall_seconds",
         floor_field: str = "median_wall_seconds") -> float | None:
    """``kind``'s figure over ``floor``'s (None when either was not measured)."""
    if kind not in summary or floor not in summary:
        return None
    return ratio(summary[kind][field], summary[floor][floor_field])


def cleanup_jobs() -> None:
    """Cancel this benchmark's jobs (askapbench-*) that are still queued, if any."""
    from askap_flows import slurm_query

    for job_id, *_ in slurm_query.jobs_with_prefix(PREFIX):
        subprocess.run(["scancel", job_id], capture_output=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=8, help="MPI runs in the workload (default 8)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 runs, 1 repetition, no warm-up or single-run comparison")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--pool", action="store_true",
                   help="also run W through a warm allocation pool and a cold one (pool.py)")
    p.add_argument("--dask", action="store_true",
                   help="also run W and one run alone through stock dask-jobqueue, no Prefect")
    args = p.parse_args()
    if args.quick:
        args.runs, args.reps = 2, 1
    work, alloc, spec, program = _bench.slurm_setup("askap_overhead_", MPI, ALLOC)
    load_before = _bench.load()
    reps: list[dict] = []
    tag = uuid.uuid4().hex[:6]
    try:
        with _bench.prefect_server(work, args.runs) as server:
            import prefect  # noqa: F401 - configures logging; then quiet Dask's

            _bench.quiet_logs()
            if not args.quick:
                _bench.say("warm-up: one bare job, one sub-flow (not counted)")
                run_floor(1, alloc, spec, program, work, f"{tag}-warm")
                run_subflow_batch(1, program, f"{tag}-warm")
            for r in range(args.reps):
                order = ("floor", "subflows") if r % 2 == 0 else ("subflows", "floor")
                rep: dict = {"order": list(order)}
                for kind in order:
                    _bench.say(f"repetition {r + 1}/{args.reps}: {kind} x {args.runs}")
                    rep[kind] = (run_floor(args.runs, alloc, spec, program, work, f"{tag}-{r}")
                                 if kind == "floor" else
                                 run_subflow_batch(args.runs, program, f"{tag}-{r}"))
                if not args.quick:
                    for kind in order:
                        rep[f"{kind}_single"] = (
                            run_floor(1, alloc, spec, program, work, f"{tag}-{r}-single")
                            if kind == "floor" else
                            run_subflow_batch(1, program, f"{tag}-{r}-single"))
                if args.dask:  # stock dask-jobqueue alone: a Dask cluster per run by hand, no Prefect
                    _bench.say(f"repetition {r + 1}/{args.reps}: stock dask-jobqueue x {args.runs}")
                    for kind, n in (("dask", args.runs), ("dask_single", 1)):
                        rep[kind] = _dask_floor.run_dask_floor(n, alloc, spec, program, work,
                                                               f"{tag}-{r}-{kind}", PREFIX)
                if args.pool:  # the pool holds every node: measured apart from the others
                    _bench.say(f"repetition {r + 1}/{args.reps}: pool (cold, warm) x {args.runs}")
                    rep.update(_pool_bench.run_pool_kinds(args.runs, MPI, program,
                                                          launch_command(spec, program),
                                                          f"{tag}-{r}"))
                reps.append(rep)
    finally:
        cleanup_jobs()
    summary = {k: summarize([r[k] for r in reps if k in r], k)
               for k in ("floor", "subflows", "floor_single", "subflows_single", "dask",
                         "dask_single", "prefect_w", "srun_w",
                         "srun_single", "pool_cold", "pool_warm", "pool_warm_single")
               if any(k in r for r in reps)}
    for kind in ("floor", "subflows"):
        summary[kind]["label"] = f"W = {args.runs} runs"
    result = {
        **_bench.run_header("overhead", args.quick, load_before, server),
        "workload": {"runs": args.runs, "mpi": MPI, "allocation": ALLOC, "profile": "testbed",
                     "srun": launch_command(spec, program), "reps": args.reps,
                     "cpus": os.cpu_count()},
        "summary": summary,
        "ratio_wall": over(summary, "subflows", "floor"),
        "ratio_latency": over(summary, "subflows", "floor", "median_latency_seconds",
                              "median_latency_seconds"),
        "ratio_single": over(summary, "subflows_single", "floor_single"),
        "ratio_dask_wall": over(summary, "dask", "floor"),
        "ratio_dask_single": over(summary, "dask_single", "floor_single"),
        "ratio_pool_warm": over(summary, "pool_warm", "floor"),
        "ratio_pool_cold": over(summary, "pool_cold", "floor"),
        # the mpi_subflow call itself (its latency): the wall time adds the parent flow run
        "ratio_pool_single_srun": over(summary, "pool_warm_single", "srun_single",
                                       "median_latency_seconds"),
        "ratio_srun_w": over(summary, "srun_w", "floor"),
        "ratio_prefect_w": over(summary, "prefect_w", "floor"),
        "pool_breakdown": ({k: medians_by_key([r[k] for r in reps])
                            for k in ("pool_cold", "pool_warm", "pool_warm_single")}
                           if "pool_warm" in summary else None),
        "dask_breakdown": ({k: medians_by_key([r[k] for r in reps]) for k in ("dask", "dask_single")}
                           if "dask" in summary else None),
        "subflow_breakdown": breakdown([r["subflows"] for r in reps]),
        "subflow_single_breakdown": (breakdown([r["subflows_single"] for r in reps])
                                     if "subflows_single" in summary else None),
        "target_ratio": 1.5,
        "repetitions": reps,
    }
    _bench.write_json(result, args.out)
    _bench.drop_work(work)
    return 0 if all(s["failures"] == 0 for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
