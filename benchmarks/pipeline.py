"""The default `saema run` on the embedded model: cold wall time, warm (fully cached) wall time, peak memory.

    python benchmarks/pipeline.py [--out DIR] [--warm-repeats 3] [--keep]

Cold: `saema run` into an empty output folder (extraction, SAE training, every analysis stage,
report). Warm: the same command again, `--warm-repeats` times — every stage is served from the
stores and the content-keyed cache. Each run is a child process timed from start to exit; peak memory
is the largest resident set of the child and its Dask workers (RUSAGE_CHILDREN). The ratio warm /
cold is what the issue bounds (≤ 10 %, and warm < 30 s).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def saema_run(out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one `saema run --out out` in a child process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "saema.cli", "run", "--out", str(out)]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` failed ({result.returncode}):\n{result.stderr[-3000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, peak_kib / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("--warm-repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the output folder")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="saema-bench-"))
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; the cold run needs an empty output folder")
    try:
        cold, cold_peak = saema_run(out)
        print(f"cold: {cold:7.1f} s  (peak RSS so far {cold_peak:.2f} GiB)", flush=True)
        warm = []
        for i in range(args.warm_repeats):
            seconds, _ = saema_run(out)
            warm.append(seconds)
            print(f"warm {i + 1}: {seconds:5.1f} s", flush=True)
        median = statistics.median(warm)
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
        print(f"cold {cold:.1f} s | warm median {median:.1f} s | warm/cold {median / cold:.3f} "
              f"(target <= 0.10 and < 30 s) | peak RSS {cold_peak:.2f} GiB")
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
