"""Run one command as a real subprocess: wall time, exit code and its peak memory."""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_mib: float                 # ru_maxrss of the process (and its waited-for children)
    returncode: int
    stdout: str
    stderr: str

    def check(self, what: str) -> "Run":
        if self.returncode != 0:
            raise SystemExit(f"bench: {what} failed (exit {self.returncode}):\n"
                             f"{self.stderr[-2000:]}")
        return self


def run(argv: list[str], cwd: str | None = None) -> Run:
    """Start argv, wait for it with wait4 so its own rusage is known, never through a shell."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err,
                                   stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(seconds, usage.ru_maxrss / 1024, process.returncode,
                   out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def run_all(commands: list[list[str]], cwd: str | None = None) -> Run:
    """Commands one after another (like `a && b`): times add up, peak is the largest."""
    runs = [run(argv, cwd) for argv in commands]
    failed = [r for r in runs if r.returncode != 0]
    last = failed[0] if failed else runs[-1]
    return Run(sum(r.seconds for r in runs), max(r.peak_mib for r in runs), last.returncode,
               "".join(r.stdout for r in runs), "".join(r.stderr for r in runs))


def drop_page_cache() -> bool:
    """Only for --cold: needs root; returns False when it cannot."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False
