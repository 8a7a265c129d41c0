"""loadtest/bench.py's CPU accounting: a process tree's CPU, children included."""

from __future__ import annotations

import subprocess
import sys
import time

from loadtest.bench import tree_cpu_s

# A parent that starts a child burning about 0.5 s of CPU, then waits for it.
_TREE = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", '''
import time
end = time.process_time() + 0.5
while time.process_time() < end:
    pass
print("done", flush=True)
import sys; sys.stdin.read()
'''], stdout=subprocess.PIPE, stdin=subprocess.PIPE)
print(child.stdout.readline().decode().strip(), flush=True)
sys.stdin.read()
"""


def test_a_trees_cpu_includes_its_childrens() -> None:
    """The parent itself is idle: what is counted is its child's burnt CPU (and startup)."""
    with subprocess.Popen(
        [sys.executable, "-c", _TREE], stdout=subprocess.PIPE, stdin=subprocess.PIPE
    ) as parent:
        _measure(parent)


def _measure(parent: subprocess.Popen[bytes]) -> None:
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == b"done"  # the child has burnt its CPU
        used = tree_cpu_s(parent.pid)
        assert used >= 0.5  # the child's loop alone, counted while it is still alive
        time.sleep(0.05)
        assert tree_cpu_s(parent.pid) - used < 0.05  # both idle now
    finally:
        parent.kill()
        parent.wait()
