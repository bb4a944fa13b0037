"""Ten thousand tenants: status, backup and migrate --jobs 2 over fleets of growing size.

    python bench/tenants.py                                  # 100, 1,000 and 10,000 tenants
    python bench/tenants.py --sizes 100 1000 3000 --workdir /work/benchdata --keep

Per fleet size: the wall time of each command (a real subprocess), the time per tenant,
the peak memory (ru_maxrss of the command and its worker processes) and the most file
descriptors open at once across the command and its workers (sampled from /proc every
20 ms). Standard library only; Linux (/proc) for the descriptor count.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fixtures  # noqa: E402
from fixtures import BACKUP_CLI, MIGRATE_CLI  # noqa: E402

PY = sys.executable
REFERENCE = str(Path(__file__).resolve().parent / "reference.py")


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            with open(f"/proc/{current}/task/{current}/children") as handle:
                todo += [int(c) for c in handle.read().split()]
        except OSError:
            pass
    return found


def open_files(pid: int) -> int:
    total = 0
    for each in descendants(pid):
        try:
            total += len(os.listdir(f"/proc/{each}/fd"))
        except OSError:
            pass
    return total


def run(argv: list[str]) -> dict:
    """Run argv; its time, exit code, peak memory (with its children) and most open files."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                   stdin=subprocess.DEVNULL)
        most, done = 0, threading.Event()

        def sample() -> None:
            nonlocal most
            while not done.wait(0.02):
                most = max(most, open_files(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        err.seek(0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"bench: {argv[2:]} failed ({code}): {err.read().decode()[-2000:]}")
    return {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024, "open_files": most}


def measure(workdir: Path, template: Path, migrations: Path, count: int, jobs: int) -> dict:
    shutil.rmtree(workdir / "backups", ignore_errors=True)
    fleet = fixtures.build_fleet(workdir / "tenants", template, count)
    ini = fixtures.write_ini(workdir / "tenants.ini", {"tenants": f"{fleet}/*.db"}, migrations,
                             keep=30)
    base = [PY, str(MIGRATE_CLI), "--config", str(ini)]
    os.sync()
    result = {"tenants": count,
              "status": run(base + ["status"]),
              "status limit": run([PY, REFERENCE, "status", str(fleet)]),
              "backup": run([PY, str(BACKUP_CLI), "--config", str(ini), "backup", "tenants",
                             "--quiet"])}
    os.sync()
    result["migrate"] = run(base + ["migrate", "tenants", "--jobs", str(jobs), "--quiet"])
    result["status after"] = run(base + ["status"])
    fixtures.add_own_table(fleet)
    result["status drift"] = run(base + ["status"])
    return result


def report(results: list[dict], jobs: int, command: str) -> str:
    one, five, _ = os.getloadavg()
    lines = [f"Command: `{command}`; {os.cpu_count()} cpus; load after: {one:.2f} (1 min), "
             f"{five:.2f} (5 min)", "",
             "| command | " + " | ".join(f"{r['tenants']:,} tenants" for r in results)
             + " | growth per tenant | peak memory | most open files |",
             "| --- |" + " --- |" * (len(results) + 3)]
    for key, label in (("status", "`status` (pending)"), ("status limit", "limit: reference.py status"),
                       ("backup", "`backup tenants`"),
                       ("migrate", f"`migrate tenants --jobs {jobs}`"),
                       ("status after", "`status` (up to date)"),
                       ("status drift", "`status` (drift: a table of its own in each)")):
        per = [r[key]["seconds"] / r["tenants"] * 1000 for r in results]
        cells = [f"{r[key]['seconds']:.2f} s ({p:.2f} ms each)" for r, p in zip(results, per)]
        peak = max(r[key]["peak_mib"] for r in results)
        files = " / ".join(str(r[key]["open_files"]) for r in results)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {per[-1] / per[0]:.2f} | "
                     f"{peak:.0f} MiB | {files} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    top = args.workdir or Path(tempfile.mkdtemp(prefix="sqlite-tenants-", dir="/work"
                                                if os.path.isdir("/work") else None))
    workdir = top.resolve() / "tenants-bench"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        migrations = fixtures.write_migrations(workdir / "migrations")
        template = fixtures.build_template(workdir, migrations)
        results = []
        for count in args.sizes:
            print(f"[{time.strftime('%H:%M:%S')}] {count} tenants", file=sys.stderr, flush=True)
            results.append(measure(workdir, template, migrations, count, args.jobs))
        text = report(results, args.jobs, "python bench/tenants.py " + " ".join(argv))
        print(text)
        if args.markdown:
            args.markdown.write_text(text + "\n", encoding="utf-8")
    finally:
        if not args.keep:
            shutil.rmtree(workdir if args.workdir else top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
