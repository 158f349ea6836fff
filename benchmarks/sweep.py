#!/usr/bin/env python3
"""N concurrent sub-flows, each with its own Dask cluster: askap_flows against the seed's pattern.

For every N (default 10, 35, 80, 140, 200), in a fresh subprocess (so that its peak RSS is that
N's), against a PostgreSQL-backed Prefect server:

* askap: a parent flow runs N ``array_subflow`` calls through ``run_subflows(max_concurrent=N)``
  (local backend: each builds a threaded LocalCluster; slurm backend: each a one-node SLURM job).
* seed: the hand-written pattern this library replaces: an async parent flow that gives each of
  its N child flows ``DaskTaskRunner(cluster_class=LocalCluster (SLURMCluster on the test bed),
  dashboard_address=f"127.0.0.1:{32120 + count}")`` and starts them all with ``asyncio.gather``;
  no bound, Prefect's default database pool. Each child runs the same tasks as array_subflow.

Recorded per N: failures, wall time, sub-flows per minute, peak RSS of the pipeline process (and
of its process tree, sampled), RSS per sub-flow above the process's RSS before the first
sub-flow, and the first error texts. A run that exceeds its time budget or memory guard is killed
and recorded as broken with what it had finished; the seed is not run at larger N after it broke.
Writes JSON and a PNG plot (failures and wall time against N).

    .venvs/prefect3/bin/python benchmarks/sweep.py --out benchmarks/results/sweep.json
    .venvs/prefect3/bin/python benchmarks/sweep.py --backend slurm --n 3,6   # on the test bed
    .venvs/prefect3/bin/python benchmarks/sweep.py --quick                   # smoke test

Uses PREFECT_API_URL if set (both patterns then share that server); else starts PostgreSQL and a
server per pattern on loopback (askap: pools sized by askap_flows.database.size_pool; seed:
Prefect's defaults). Dask's worker profiler is disabled in both patterns (CPython 3.11.7 can
deadlock with it, cpython#106883); --dask-profile leaves it on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

DEFAULT_N = (10, 35, 80, 140, 200)
SEED_PORT_BASE = 32120
ARRAYS, SIZE = 2, 1000
PREFIX = "askapbench"
PROGRESS = "SWEEP-DONE"


# --------------------------------------------------------------------------- child: one N
def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class TreeSampler(threading.Thread):
    """Peak summed RSS of this process and its descendants (Dask worker processes), every 0.5 s;
    kills the run (SIGKILL to itself) above the memory guard, to protect the shared machine."""

    def __init__(self, guard_mb: float) -> None:
        super().__init__(daemon=True)
        self.guard_mb, self.peak_mb, self.peak_procs = guard_mb, 0.0, 0

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while True:
            try:
                procs = [me] + me.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_mb = max(self.peak_mb, total / 2**20)
                self.peak_procs = max(self.peak_procs, len(procs))
                if self.peak_mb > self.guard_mb:
                    print(f"MEMORY-GUARD {self.peak_mb:.0f} MB > {self.guard_mb:.0f} MB in "
                          f"{len(procs)} processes", file=sys.stderr, flush=True)
                    for p in procs[1:]:
                        try:
                            p.kill()
                        except psutil.Error:
                            pass
                    os.kill(os.getpid(), signal.SIGKILL)
            except Exception:  # noqa: BLE001 - a sampler must not break the run
                pass
            time.sleep(0.5)


def child_askap(n: int, backend: str) -> list[str | None]:
    from functools import partial

    from prefect import flow

    from askap_flows.composition import run_subflows
    from askap_flows.flows import array_subflow

    profile = "testbed" if backend == "slurm" else None
    alloc = {"job_name_prefix": PREFIX} if backend == "slurm" else None

    def done(outcome) -> None:
        print(PROGRESS, outcome.index, "ok" if outcome.ok else "failed", file=sys.stderr,
              flush=True)

    @flow(name="sweep-askap", validate_parameters=False)
    def parent(count: int):
        calls = [partial(array_subflow, ARRAYS, SIZE, seed=i, backend=backend, profile=profile,
                         allocation=alloc, name=f"sweep-{i}") for i in range(count)]
        return run_subflows(calls, max_concurrent=count, on_done=done)

    return [None if o.ok else f"{type(o.error).__name__}: {o.error}" for o in parent(n)]


def child_seed(n: int, backend: str) -> list[str | None]:
    """The seed's hand-written pattern (see the module docstring), as a user would write it."""
    import asyncio

    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    @task
    def make_array(seed: int, size: int):
        import numpy as np

        return np.random.default_rng(seed).random(size)

    @task
    def add_arrays(a, b):
        return a + b

    @task
    def mean_of(x) -> float:
        return float(x.mean())

    @flow
    async def child(count: int) -> float:
        total = make_array.submit(count, SIZE)
        for i in range(1, ARRAYS):
            total = add_arrays.submit(total, make_array.submit(count + i, SIZE))
        return mean_of.submit(total).result()

    def runner(count: int) -> DaskTaskRunner:
        dashboard = f"127.0.0.1:{SEED_PORT_BASE + count}"  # the seed's f':{32120+count}', loopback
        if backend == "slurm":
            from askap_flows import mpi, slurm
            from askap_flows.resolve import resolve

            alloc = resolve("testbed", step=False, allocation={
                "nodes": 1, "ntasks_per_node": 1, "job_name_prefix": PREFIX}).allocation_spec()
            kwargs = slurm.cluster_kwargs(alloc, job_name=f"{PREFIX}-seed-{count}",
                                          log_directory=str(mpi.askap_home() / "logs"),
                                          env=slurm.job_env(), dashboard_address=dashboard)
            return DaskTaskRunner(cluster_class="dask_jobqueue.SLURMCluster", cluster_kwargs=kwargs)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"dashboard_address": dashboard})

    async def one(count: int):
        try:
            await child.with_options(task_runner=runner(count), name=f"seed-child-{count}")(count)
            print(PROGRESS, count, "ok", file=sys.stderr, flush=True)
            return None
        except Exception as exc:  # noqa: BLE001 - counted, as gather(return_exceptions=True) would
            print(PROGRESS, count, "failed", file=sys.stderr, flush=True)
            return f"{type(exc).__name__}: {exc}"

    @flow
    async def parent(count: int):
        return await asyncio.gather(*(one(i) for i in range(count)))

    return asyncio.run(parent(n))


def child_main(args) -> int:
    if args.backend == "slurm":
        (Path(os.environ["ASKAP_FLOWS_HOME"]) / "logs").mkdir(parents=True, exist_ok=True)
    if args.child == "askap":
        import askap_flows.flows  # noqa: F401 - imports (and Prefect) before the baseline
    else:
        import prefect  # noqa: F401
        import prefect_dask  # noqa: F401
    _bench.quiet_logs()
    baseline = rss_mb()
    sampler = TreeSampler(args.memory_guard_mb)
    sampler.start()
    started = time.monotonic()
    errors = (child_askap if args.child == "askap" else child_seed)(args.child_n, args.backend)
    wall = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"errors": errors, "wall_seconds": round(wall, 2),
                      "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(peak, 1),
                      "peak_tree_rss_mb": round(sampler.peak_mb, 1),
                      "peak_processes": sampler.peak_procs}), flush=True)
    return 0


# --------------------------------------------------------------------------- parent: all N
def first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


def run_one(pattern: str, n: int, args, work: Path) -> dict:
    env = dict(os.environ)
    if not args.dask_profile:
        env["DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"] = "False"
    argv = [sys.executable, __file__, "--child", pattern, "--child-n", str(n), "--backend",
            args.backend, "--memory-guard-mb", str(args.memory_guard_mb)]
    budget = args.budget_base + args.budget_per_subflow * n
    _bench.say(f"{pattern} N={n} (budget {budget:g} s, load {_bench.load()})")
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=work, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=budget)
        code, timed_out = proc.returncode, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the child and its Dask workers
        out, err = proc.communicate()
        code, timed_out = None, True
    wall = time.monotonic() - started
    (work / f"{pattern}-{n}.stderr").write_text(err)
    done = Counter(line.split()[2] for line in err.splitlines()
                   if line.startswith(PROGRESS) and len(line.split()) == 3)
    row = {"pattern": pattern, "n": n, "backend": args.backend, "exit_code": code,
           "timed_out": timed_out, "budget_seconds": budget,
           "memory_guard": "MEMORY-GUARD" in err}
    try:
        data = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        data = None
    if data is not None:
        errs = [e for e in data.pop("errors") if e]
        row.update(data)
        row["completed"], row["failures"] = n - len(errs), len(errs)
        row["error_examples"] = [f"{k} (x{v})" for k, v in
                                 Counter(first_line(e) for e in errs).most_common(5)]
    else:  # killed, hung or crashed: what it finished before
        row["completed"] = done.get("ok", 0)
        row["failures"] = n - row["completed"]
        row["wall_seconds"] = round(wall, 2)
        tail = [line for line in err.splitlines() if line.strip()][-3:]
        why = ("timed out (no progress to the end) after " f"{budget:g} s" if timed_out else
               "killed by the memory guard" if row["memory_guard"] else f"exit code {code}")
        row["error_examples"] = [why] + [t[:300] for t in tail]
    row["broke"] = bool(row["failures"]) or timed_out or data is None
    row["subflows_per_minute"] = (round(row["completed"] / row["wall_seconds"] * 60, 1)
                                  if row["wall_seconds"] else None)
    if data is not None:
        row["rss_per_subflow_mb"] = round((data["peak_rss_mb"] - data["baseline_rss_mb"]) / n, 1)
    row["log_errors"] = log_errors(err)
    _bench.say(json.dumps({k: row.get(k) for k in ("pattern", "n", "completed", "failures",
                                                    "wall_seconds", "peak_rss_mb", "broke")}))
    return row


ERROR_PATTERNS = [r"QueuePool limit[^\n]*", r"TimeoutError[^\n]*", r"503 Service Unavailable",
                  r"Cluster failed to start[^\n]*", r"Address already in use", r"Errno 98",
                  r"Too many open files", r"Port \d+ is already in use",
                  r"Event loop was unresponsive[^\n]*", r"CancelledError", r"Crash detected"]


def log_errors(text: str) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for pattern in ERROR_PATTERNS:
        hits = re.findall(pattern, text)
        if hits:
            counts[pattern.split("[")[0].replace("\\d+", "N").replace("\\", "")] = len(hits)
    return dict(counts)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for pattern, style in (("askap", "o-"), ("seed", "s--")):
        pts = sorted((r["n"], r) for r in rows if r["pattern"] == pattern)
        if not pts:
            continue
        ns = [n for n, _ in pts]
        label = "askap_flows" if pattern == "askap" else "seed pattern"
        ax1.plot(ns, [r["failures"] for _, r in pts], style, label=label)
        ax2.plot(ns, [r["wall_seconds"] for _, r in pts], style, label=label)
        for n, r in pts:
            if r.get("timed_out") or r.get("memory_guard"):
                ax2.annotate("killed", (n, r["wall_seconds"]), fontsize=8)
    ax1.set(xlabel="concurrent sub-flows N", ylabel="failed or unfinished sub-flows",
            title="failures")
    ax2.set(xlabel="concurrent sub-flows N", ylabel="wall time [s]", title="wall time")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default=",".join(map(str, DEFAULT_N)), help="comma list of N")
    p.add_argument("--backend", choices=("local", "slurm"), default="local")
    p.add_argument("--patterns", default="askap,seed", help="comma list: askap, seed")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: N = 2 (the seed: N = 1)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--plot", help="PNG path (default: next to --out, else none)")
    p.add_argument("--budget-base", type=float, default=300, help="seconds per N: base ...")
    p.add_argument("--budget-per-subflow", type=float, default=4, help="... plus this per sub-flow")
    p.add_argument("--memory-guard-mb", type=float, default=8192,
                   help="kill a run whose process tree exceeds this (default 8192)")
    p.add_argument("--dask-profile", action="store_true", help="leave Dask's worker profiler on")
    p.add_argument("--replot", metavar="JSON", help="only redraw the PNG of an earlier run's JSON")
    p.add_argument("--child", choices=("askap", "seed"), help=argparse.SUPPRESS)
    p.add_argument("--child-n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args)
    if args.replot:
        data = json.loads(Path(args.replot).read_text())
        plot([r for r in data["results"] if "skipped" not in r], Path(data["plot"]),
             f"{data['backend']} backend, Prefect {data['versions']['prefect']}, "
             f"{data['date_utc']} UTC, {data['versions']['machine_cpus']} cores")
        return 0
    ns = [2] if args.quick else [int(x) for x in args.n.split(",")]
    patterns = [x.strip() for x in args.patterns.split(",") if x.strip()]
    if args.backend == "slurm" and not os.environ.get("SLURM_CONF"):
        raise SystemExit("SLURM_CONF is not set: run `scripts/slurm_testbed.sh up` and "
                         "`source /tmp/askap_testbed/env.sh` first.")

    work = _bench.work_dir("askap_sweep_")
    _bench.bench_environment(work)
    load_before = _bench.load()
    rows: list[dict] = []
    servers = {}
    own_server = not os.environ.get("PREFECT_API_URL")
    try:
        for pattern in patterns:
            pdir = work / pattern
            pdir.mkdir()
            os.environ["PREFECT_HOME"] = str(pdir / "prefect") if own_server else \
                os.environ["PREFECT_HOME"]
            sized = max(ns) if pattern == "askap" else 0
            with _bench.prefect_server(pdir, sized, default_pools=(pattern == "seed")) as server:
                servers[pattern] = server
                for n in ([1] if args.quick and pattern == "seed" else ns):
                    row = run_one(pattern, n, args, pdir)
                    rows.append(row)
                    if row["broke"] and pattern == "seed":
                        rows.extend({"pattern": pattern, "n": m, "backend": args.backend,
                                     "skipped": f"broke at N={n}"} for m in ns if m > n)
                        break
    finally:
        if args.backend == "slurm":
            _cancel_own_jobs()
    ran = [r for r in rows if "skipped" not in r]
    result = {
        "benchmark": "sweep",
        "quick": args.quick,
        "backend": args.backend,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "versions": _bench.versions(),
        "load_average_before": load_before,
        "load_average_after": _bench.load(),
        "prefect_servers": servers,
        "workload": {"subflow": f"array_subflow({ARRAYS} arrays of {SIZE}) / the same tasks in "
                                "the seed's child flow", "n": ns,
                     "dask_worker_profile": args.dask_profile},
        "targets": {"failures_at_max_n": 0, "rss_per_subflow_mb": 25},
        "results": rows,
        "summary": {
            pattern: {
                "max_n_without_failure": max([r["n"] for r in ran if r["pattern"] == pattern
                                              and not r["broke"]], default=0),
                "total_failures": sum(r["failures"] for r in ran if r["pattern"] == pattern),
                "first_break": next(({"n": r["n"], "errors": r["error_examples"]} for r in ran
                                     if r["pattern"] == pattern and r["broke"]), None),
            } for pattern in patterns},
    }
    plot_path = Path(args.plot) if args.plot else (
        Path(args.out).with_suffix(".png") if args.out else None)
    if plot_path:
        plot(ran, plot_path, f"{args.backend} backend, Prefect {result['versions']['prefect']}, "
             f"{result['date_utc']} UTC, {os.cpu_count()} cores")
        result["plot"] = str(plot_path)
    _bench.write_json(result, args.out)
    _bench.drop_work(work)
    return 0


def _cancel_own_jobs() -> None:
    from askap_flows import slurm_query

    for job_id, *_ in slurm_query.jobs_with_prefix(PREFIX):
        subprocess.run(["scancel", job_id], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
