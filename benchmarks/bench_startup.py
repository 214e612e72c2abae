"""Wall time of ``ncen --help`` (and ``--version``) for two source trees, interleaved.

    python benchmarks/bench_startup.py --before OLD_SRC --after src --repeats 10

OLD_SRC is the ``src`` folder of another checkout (e.g. ``git worktree add /tmp/old v0.1``).
Each repeat runs ``ncen --help`` once per tree, alternating, in a fresh process with
that tree first on ``sys.path``; the report gives the medians and their ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

# the console script's code, with ``src`` first on sys.path (an editable install's .pth file
# would otherwise win over PYTHONPATH)
RUN = "import sys; sys.path.insert(0, sys.argv.pop(1)); from ncen_cli.launcher import main; main()"


def one_run(src: str, args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", RUN, src, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if done.returncode not in (0, 2):
        raise SystemExit(f"ncen {' '.join(args)} failed in {src} (exit {done.returncode})")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="src folder of the older tree")
    parser.add_argument("--after", required=True, help="src folder of the newer tree")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--args", default="--help", help="ncen arguments (space separated)")
    opts = parser.parse_args()
    args = opts.args.split()
    one_run(opts.before, args), one_run(opts.after, args)  # warm the file cache
    times: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(opts.repeats):
        times["before"].append(one_run(opts.before, args))
        times["after"].append(one_run(opts.after, args))
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    lines = [
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"python {platform.python_version()}",
        f"ncen {' '.join(args)}: {opts.repeats} interleaved runs each",
        f"before: median {before:.3f} s (min {min(times['before']):.3f})",
        f"after:  median {after:.3f} s (min {min(times['after']):.3f})",
        f"ratio before/after: {before / after:.1f}x",
    ]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
