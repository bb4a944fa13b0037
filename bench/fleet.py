"""migrate-all over a fleet, side by side with the limit and, optionally, another checkout.

    python bench/fleet.py                                  # 300 instances, 5 interleaved rounds
    python bench/fleet.py --instances 1000 --rounds 3 --old-code ../main-checkout
    python bench/fleet.py --instances 200 --rounds 0 --syscalls   # strace -c -f counts per tenant
    python bench/fleet.py --warm                           # each member backed up once before

Each round runs, in a rotating order, `reference.py migrate` (the limit), this
checkout's `migrate-all` (sequential and --jobs 2) and, with --old-code, the other
checkout's, each on a fresh copy of the fleet with no backups yet, in a folder of
its own: nothing is deleted until the end, because on ext4 a file deleted in the last
minutes makes every new file slower to allocate (the kernel skips its inode), which
would charge each command for what the one before it removed. The medians are
compared. CPU is the command's user + system time (os.wait4), steadier than wall
time on a shared machine. --syscalls counts each command's system calls per tenant
(needs strace). --warm runs `backup tenants` before each product run, outside the
timing: the fleet has been backed up before, so each member's folders, lock and audit
trail exist (a later deploy), where by default every member is new to the tool.
Standard library only; not part of the test run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fixtures  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "reference.py"
COUNTED = ("fsync", "fdatasync", "openat", "mkdir", "newfstatat", "rename", "unlink", "pread64",
           "pwrite64", "fcntl")


def fleet_copy(workdir: Path, name: str, template: Path, count: int, migrations: Path) -> tuple:
    fleet = fixtures.build_fleet(workdir / name, template, count)
    ini = fixtures.write_ini(workdir / f"{name}.ini", {"tenants": f"{fleet}/*.db"}, migrations,
                             keep=30)
    ini.write_text(ini.read_text().replace("backup_dir = backups", f"backup_dir = {name}_backups"))
    return fleet, ini


def command(kind: str, code: dict[str, Path], fleet: Path, ini: Path, migrations: Path,
            workdir: Path) -> list[str]:
    if kind == "limit":
        return [sys.executable, str(REFERENCE), "migrate", str(fleet), str(migrations),
                str(fleet.with_name(f"{fleet.name}_limit_backups"))]
    checkout, _, jobs = kind.partition(" --jobs ")
    return [sys.executable, str(code[checkout] / "database_migration.py"), "--config", str(ini),
            "migrate-all", "--quiet", *(["--jobs", jobs] if jobs else [])]


def timed(argv: list[str]) -> tuple[float, float]:
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if status:
        raise SystemExit(f"bench: {' '.join(argv)} failed:\n{process.stderr.read().decode()[-2000:]}")
    process.stderr.close()
    return seconds, usage.ru_utime + usage.ru_stime


def syscalls(argv: list[str], count: int, log: Path) -> dict[str, float]:
    subprocess.run(["strace", "-c", "-f", "-o", str(log), *argv], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    found = {}
    for line in log.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1].isidentifier():
            found[fields[-1]] = int(fields[3]) / count
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--old-code", type=Path, help="another checkout, measured alike")
    parser.add_argument("--syscalls", action="store_true", help="strace -c -f counts per tenant")
    parser.add_argument("--warm", action="store_true", help="back each member up first")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    report = run_rounds(args)
    print(report)
    if args.markdown:
        args.markdown.write_text(report + "\n", encoding="utf-8")


def run_rounds(args: argparse.Namespace) -> str:
    lines: list[str] = []
    out = lines.append              # the report, printed (and written) at the end
    code = {"new": fixtures.ROOT, **({"old": args.old_code.resolve()} if args.old_code else {})}
    kinds = ["limit"] + [f"{name}{jobs}" for name in code for jobs in ("", " --jobs 2")]
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        workdir = Path(folder)
        migrations = fixtures.write_migrations(workdir / "migrations")
        template = fixtures.build_template(workdir, migrations)
        wall: dict[str, list[float]] = {kind: [] for kind in kinds}
        cpu: dict[str, list[float]] = {kind: [] for kind in kinds}
        for index in range(args.rounds):
            for kind in kinds[index % len(kinds):] + kinds[:index % len(kinds)]:
                fleet, ini = fleet_copy(workdir, f"fleet{len(wall[kind])}_{kinds.index(kind)}",
                                        template, args.instances, migrations)
                if args.warm and kind != "limit":
                    checkout = code[kind.partition(" --jobs ")[0]]
                    subprocess.run([sys.executable, str(checkout / "safe_db_update.py"), "--config",
                                    str(ini), "--quiet", "backup", "tenants"], check=True)
                os.sync()
                seconds, used = timed(command(kind, code, fleet, ini, migrations, workdir))
                wall[kind].append(seconds)
                cpu[kind].append(used)
        n, limit = args.instances, statistics.median(wall["limit"]) if args.rounds else 0
        out(f"{n} instances x {len(fixtures.EXTRA_MIGRATIONS)} migrations, {args.rounds} rounds, "
            f"{'backed up before (--warm), ' if args.warm else 'new to the tool, '}"
            f"load average {os.getloadavg()[0]:.2f}\n")
        out("| command | wall (median) | per tenant | ratio to the limit | CPU per tenant | rounds |")
        out("| --- | --- | --- | --- | --- | --- |")
        for kind in kinds if args.rounds else ():
            median = statistics.median(wall[kind])
            out(f"| {kind} | {median:.2f} s | {1000 * median / n:.2f} ms | {median / limit:.2f}x "
                f"| {1000 * statistics.median(cpu[kind]) / n:.2f} ms | "
                f"{', '.join(f'{s:.2f}' for s in wall[kind])} |")
        if args.syscalls and shutil.which("strace"):
            out("\n| command | " + " | ".join(COUNTED) + " | all |")
            out("| --- |" + " --- |" * (len(COUNTED) + 1))
            for kind in [k for k in kinds if "--jobs" not in k]:
                fleet, ini = fleet_copy(workdir, f"strace_{kinds.index(kind)}", template, n,
                                        migrations)
                counts = syscalls(command(kind, code, fleet, ini, migrations, workdir), n,
                                  workdir / "strace.log")
                out(f"| {kind} | " + " | ".join(f"{counts.get(c, 0):.1f}" for c in COUNTED)
                    + f" | {sum(counts.values()):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
