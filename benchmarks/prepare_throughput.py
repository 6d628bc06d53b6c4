"""Sequence-building throughput: the Spark job (local[2]) beside the single-process pandas version.

For each size, the built-in synthetic log is generated once (cached under benchmarks/results/tmp/),
then each implementation runs as its own process while the RSS of its whole process tree (Python,
the JVM, Python workers) is sampled. Both get the same prepare config (the demo defaults) and must
agree on the counts. Results go to benchmarks/results/prepare_throughput.json and a table.

    .venv/bin/python benchmarks/prepare_throughput.py --sizes 1e6,1e7
    .venv/bin/python benchmarks/prepare_throughput.py            # 1M, 10M, 50M (pandas skipped
                                                                 # where it would not fit in memory)

`seconds` is the wall time of the whole command (Spark: including JVM start); `job_seconds` is the
time the implementation itself reports (Spark: the manifest's `elapsed_s`, session start included).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TMP = RESULTS / "tmp"
log = logging.getLogger("prepare_throughput")
PANDAS_GIB_PER_MILLION = 0.6
"""Peak RSS of benchmarks/pandas_prepare.py per million events (measured: 0.76 GiB at 1M, 5.7 at 10M)."""


class PeakRss:
    """Samples the summed RSS of a process and all its descendants until stopped."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.root, self.every_s, self.peak = psutil.Process(pid), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        total = 0
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._sample())
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.every_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _run(cmd: list[str], name: str) -> tuple[float, int, str]:
    """Run `cmd`, return (wall seconds, peak tree RSS bytes, stdout); raise on failure."""
    env = {
        **os.environ,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    }
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = PeakRss(proc.pid)
    out, err = proc.communicate()
    seconds, peak = time.perf_counter() - t0, rss.stop()
    if proc.returncode:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, peak, out


def _generate(events: int) -> Path:
    sys.path.insert(0, str(REPO))
    from seqrec.config import GenerateConfig
    from seqrec.data.synthetic import generate

    out = TMP / f"log-{events}"
    result = generate(GenerateConfig(num_events=events, output=str(out)))
    log.info(
        "log %s: %s events (%s)",
        out,
        f"{result.num_events:,}",
        "cached" if result.skipped else f"{result.seconds:.0f} s",
    )
    return out


def _overrides(log_dir: Path, args: argparse.Namespace) -> list[str]:
    return [
        f"prepare.input.path='{log_dir / 'events'}'",
        f"prepare.input.item_features_path='{log_dir / 'items.parquet'}'",
        f"prepare.spark_master='{args.master}'",
        f"prepare.spark_driver_memory='{args.driver_memory}'",
        f"prepare.shuffle_partitions={args.shuffle_partitions}",
    ]


def run_spark(log_dir: Path, events: int, args: argparse.Namespace) -> dict[str, Any]:
    out = TMP / f"spark-{events}"
    sets = [x for o in _overrides(log_dir, args) for x in ("--set", o)]
    cmd = [
        sys.executable,
        "-m",
        "seqrec",
        "--log-level",
        "WARNING",
        "prepare",
        "--force",
        "--output",
        str(out),
        *sets,
    ]
    seconds, peak, _ = _run(cmd, "spark")
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "impl": "spark",
        "seconds": seconds,
        "job_seconds": manifest["elapsed_s"],
        "peak_rss_bytes": peak,
        "stats": manifest["stats"],
    }


def run_pandas(log_dir: Path, events: int, args: argparse.Namespace) -> dict[str, Any]:
    out = TMP / f"pandas-{events}"
    sets = [x for o in _overrides(log_dir, args) for x in ("--set", o)]
    cmd = [sys.executable, str(REPO / "benchmarks" / "pandas_prepare.py"), "--output", str(out), *sets]
    seconds, peak, stdout = _run(cmd, "pandas")
    report = json.loads(stdout.strip().splitlines()[-1])
    return {
        "impl": "pandas",
        "seconds": seconds,
        "job_seconds": report.pop("seconds"),
        "peak_rss_bytes": peak,
        "stats": report,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'events':>12} {'impl':<7} {'seconds':>8} {'job s':>7} {'events/s':>11} {'peak RSS GiB':>13} {'speedup':>8}"
    ]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
        lines.append(
            f"{r['events']:>12,} {r['impl']:<7} {r['seconds']:>8.1f} {r['job_seconds']:>7.1f} "
            f"{r['events_per_s']:>11,.0f} {r['peak_rss_bytes'] / 2**30:>13.2f} {speedup:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7,5e7", help="comma-separated event counts (e.g. 1e6,1e7)")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="4g")
    parser.add_argument("--shuffle-partitions", type=int, default=8)
    parser.add_argument("--skip-pandas", action="store_true", help="Spark only")
    parser.add_argument(
        "--pandas-max-gib",
        type=float,
        default=round(0.8 * psutil.virtual_memory().total / 2**30, 1),
        help=f"skip pandas where its estimated peak ({PANDAS_GIB_PER_MILLION} GiB per 1M events, measured) exceeds this",
    )
    parser.add_argument("--output", default=str(RESULTS / "prepare_throughput.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for events in (int(float(s)) for s in args.sizes.split(",")):
        log_dir = _generate(events)
        pandas_gib = PANDAS_GIB_PER_MILLION * events / 1e6
        skip = args.skip_pandas or pandas_gib > args.pandas_max_gib
        if skip:
            reason = (
                "--skip-pandas"
                if args.skip_pandas
                else f"estimated peak {pandas_gib:.0f} GiB > {args.pandas_max_gib:.0f} GiB"
            )
            skipped.append({"events": events, "impl": "pandas", "reason": reason})
            log.warning("pandas skipped at %s events: %s", f"{events:,}", reason)
        runners = [run_spark] + ([] if skip else [run_pandas])
        results = []
        for runner in runners:
            load = os.getloadavg()[0]  # the machine may be shared: record how busy it was
            r = runner(log_dir, events, args)
            r.update(events=events, events_per_s=events / r["seconds"], load_avg_1m_before=round(load, 2))
            log.info(
                "%s %s events: %.1f s, peak %.2f GiB",
                r["impl"],
                f"{events:,}",
                r["seconds"],
                r["peak_rss_bytes"] / 2**30,
            )
            results.append(r)
        if len(results) == 2:
            spark, pandas = results
            if spark["stats"] != pandas["stats"]:
                raise RuntimeError(
                    f"spark and pandas disagree at {events:,} events: {spark['stats']} vs {pandas['stats']}"
                )
            spark["speedup"] = pandas["seconds"] / spark["seconds"]
        rows.extend(results)
    report = {
        "benchmark": "prepare_throughput",
        "machine": {
            "cpus": psutil.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
        },
        "settings": {
            "master": args.master,
            "driver_memory": args.driver_memory,
            "shuffle_partitions": args.shuffle_partitions,
            "config": "demo defaults",
        },
        "results": rows,
        "skipped": skipped,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(_table(rows))
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
