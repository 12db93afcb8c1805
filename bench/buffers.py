"""What ``reuse_freed_memory_mb`` saves on one message buffer: CPU time to fill a fresh ``bytes``
the size of a model layer, with glibc's defaults and with the setting, in fresh processes.

Each process fills ``--count`` buffers of ``--mib`` MiB the way ``task/params.encode`` does
(``b"".join((header, array.data))``), keeping the last ``--keep`` alive as a round's messages
are, and prints the median CPU milliseconds per buffer. The default size is ``digit_cnn``'s
largest layer (51 MiB). Usage:

    .venv/bin/python bench/buffers.py [--mib 51] [--count 60] [--keep 11] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FILL = """
import sys, time
import numpy as np
from task.core.device import reuse_freed_memory
mib, count, keep, limit = (int(a) for a in sys.argv[1:5])
applied = reuse_freed_memory(limit)
layer = np.ones(mib << 18, np.float32)  # mib MiB of float32
header, alive, cpu = b"x" * 128, [], []
for _ in range(count):
    began = time.process_time()
    alive.append(b"".join((header, layer.data)))
    cpu.append(time.process_time() - began)
    alive = alive[-keep:]
print(int(applied), *cpu[keep:])  # the buffers filled once the process holds a round's worth
"""


def fill_ms(mib: int, count: int, keep: int, limit_mb: int) -> tuple[bool, float]:
    """(whether the setting was in effect, median CPU ms per buffer) in a fresh process."""
    out = subprocess.run([sys.executable, "-c", FILL, str(mib), str(count), str(keep), str(limit_mb)],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    return bool(int(out[0])), 1e3 * statistics.median(float(v) for v in out[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=51, help="buffer size (digit_cnn's largest layer)")
    parser.add_argument("--count", type=int, default=60, help="buffers filled per process")
    parser.add_argument("--keep", type=int, default=11, help="buffers kept alive (a round's messages)")
    parser.add_argument("--limit", type=int, default=1024, help="reuse_freed_memory_mb to compare with 0")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per setting")
    args = parser.parse_args()
    if args.count <= args.keep:
        parser.error("--count must exceed --keep")
    for limit in (0, args.limit):
        runs = [fill_ms(args.mib, args.count, args.keep, limit) for _ in range(args.repeats)]
        applied = all(a for a, _ in runs)
        times = ", ".join(f"{ms:.1f}" for _, ms in runs)
        label = f"reuse_freed_memory_mb={limit}" + ("" if applied or limit == 0 else " (not in effect)")
        print(f"{label:32s} {args.mib} MiB buffer: {statistics.median(ms for _, ms in runs):6.1f} ms CPU "
              f"(median of {args.repeats} processes: {times})", flush=True)


if __name__ == "__main__":
    main()
