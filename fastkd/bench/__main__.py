"""``python -m fastkd.bench --memory-worker PAYLOAD``: the CPU peak-RSS worker subprocess.

Started by :func:`fastkd.bench.memory.cpu_memory_points`; users run ``fastkd bench``.
"""

import json
import sys

from fastkd.bench.memory import _memory_worker

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        sys.exit(_memory_worker(json.loads(sys.argv[2])))
    sys.exit("usage: fastkd bench [...] (this module is run by the fastkd command)")
