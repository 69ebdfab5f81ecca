"""Trace-reader throughput and peak memory on synthetic traces of >= 1M rows.

Writes a synthetic trace (Azure CSV, Mooncake JSONL with shared prefix blocks, or BurstGPT CSV with sessions)
of ``--rows`` rows to a temporary folder, then reads it with ``kvtune.profile.read_trace`` in a fresh child
process that reports rows/s and its peak resident memory (``ru_maxrss``) next to its resident memory just
before reading, so the reader's own footprint is the difference. Lengths are drawn from a log-normal close
to the Azure conversation trace, so the exact value counts see a realistic number of distinct lengths. Prints a
table and writes the rows as JSON (``--json``, default ``benchmarks/results/trace_reader.json``) with the machine.

    python benchmarks/trace_reader.py                      # 1M rows, every format
    python benchmarks/trace_reader.py --rows 10000000 --formats azure
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMATS = ("azure", "mooncake", "burstgpt")


def _rss_mib_now() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_trace(fmt: str, rows: int, folder: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lognorm = rng.lognormvariate
    if fmt == "azure":
        path = folder / "synthetic-azure.csv"
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
            t = 1_700_000_000.0
            buf = []
            for i in range(rows):
                t += rng.expovariate(5.0)
                sec = int(t)
                frac = int((t - sec) * 1e7)
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(sec))
                buf.append(f"{stamp}.{frac:07d},{int(lognorm(6.9, 1.1)) + 1},{int(lognorm(4.8, 0.9)) + 1}\n")
                if len(buf) >= 50_000:
                    fh.write("".join(buf))
                    buf.clear()
            fh.write("".join(buf))
    elif fmt == "mooncake":
        path = folder / "synthetic-mooncake.jsonl"
        next_block = 1_000_000
        prefixes = [[p * 100 + k for k in range(rng.randint(1, 8))] for p in range(2_000)]
        with open(path, "w", encoding="utf-8") as fh:
            buf = []
            for i in range(rows):
                inp = int(lognorm(8.5, 1.0)) + 1
                blocks = list(prefixes[int(rng.paretovariate(1.2)) % len(prefixes)])
                need = max(0, -(-inp // 512) - len(blocks))
                blocks += range(next_block, next_block + need)
                next_block += need
                buf.append(json.dumps({"timestamp": i * 300, "input_length": inp,
                                       "output_length": int(lognorm(5.5, 0.8)) + 1, "hash_ids": blocks}) + "\n")
                if len(buf) >= 20_000:
                    fh.write("".join(buf))
                    buf.clear()
            fh.write("".join(buf))
    elif fmt == "burstgpt":
        path = folder / "synthetic-burstgpt.csv"
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type,Session ID\n")
            buf = []
            for i in range(rows):
                a, b = int(lognorm(6.5, 1.2)) + 1, int(lognorm(5.0, 1.0))
                buf.append(f"{i * 0.2:.1f},ChatGPT,{a},{b},{a + b},Conversation log,s{rng.randrange(rows // 8 + 1)}\n")
                if len(buf) >= 50_000:
                    fh.write("".join(buf))
                    buf.clear()
            fh.write("".join(buf))
    else:
        raise SystemExit(f"unknown format {fmt}")
    return path


def child(path: str) -> None:
    from kvtune.profile.workload import read_trace

    before = _rss_mib_now()
    t0, c0 = time.perf_counter(), time.process_time()
    w = read_trace(path)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"rows": w.requests, "malformed_rows": w.malformed_rows, "seconds": secs, "cpu_seconds": cpu,
                      "rss_before_mib": before, "peak_rss_mib": peak, "p50": w.input_tokens.p50, "p99": w.input_tokens.p99,
                      "prefix_reuse": w.prefix_reuse_ratio, "sessions": w.sessions}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "trace_reader.json",
                    help="where to write the results (default: benchmarks/results/trace_reader.json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    print(f"{'format':<10} {'rows':>11} {'MB':>8} {'seconds':>8} {'rows/s':>10} {'rows/cpu-s':>10} {'RSS before':>11} "
          f"{'peak RSS':>9} {'reader':>8}")
    results = []
    with tempfile.TemporaryDirectory(prefix="kvtune-bench-") as tmp:
        for fmt in args.formats.split(","):
            t0 = time.perf_counter()
            path = write_trace(fmt, args.rows, Path(tmp))
            gen = time.perf_counter() - t0
            res = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                                 check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            mb = os.path.getsize(path) / 1e6
            print(f"{fmt:<10} {r['rows']:>11,} {mb:>8,.0f} {r['seconds']:>8.2f} {r['rows'] / r['seconds']:>10,.0f} "
                  f"{r['rows'] / r['cpu_seconds']:>10,.0f} "
                  f"{r['rss_before_mib']:>9.0f}Mi {r['peak_rss_mib']:>7.0f}Mi "
                  f"{r['peak_rss_mib'] - r['rss_before_mib']:>6.0f}Mi"
                  f"   (generated in {gen:.0f} s; p50 {r['p50']}, p99 {r['p99']}, reuse {r['prefix_reuse']}, "
                  f"sessions {r['sessions']})")
            path.unlink()
            results.append({"format": fmt, "file_mb": round(mb, 1), "rows_per_s": round(r["rows"] / r["seconds"]),
                            "rows_per_cpu_s": round(r["rows"] / r["cpu_seconds"]),
                            "reader_mib": round(r["peak_rss_mib"] - r["rss_before_mib"], 1), **r})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "trace_reader", "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(),
                                                     "python": platform.python_version()},
           "measured": "read_trace in a fresh child process: wall time (perf_counter) and CPU time (process_time, "
                       "robust to other processes on the machine); peak RSS from ru_maxrss",
           "load_average_1m": os.getloadavg()[0],
           "results": results}
    tmp = args.json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
