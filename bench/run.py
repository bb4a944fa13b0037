"""Benchmarks: the product's CLIs side by side with the standard library's limit.

    python bench/run.py                      # full: 1,000 instances, 1 GiB (about 15 minutes)
    python bench/run.py --quick              # small: 100 instances, 64 MiB (about a minute)
    python bench/run.py --instances 300 --size-gib 0.5 --workdir /work/benchdata --keep

Every product figure is a real subprocess (`python database_migration.py ...`);
every reference is `bench/reference.py` (one Python process, plain SQL, a plain
page copy as the backup) or `cp` + `sqlite3 COPY 'PRAGMA integrity_check'`.
Standard library only; not part of the test run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fixtures  # noqa: E402
from fixtures import BACKUP_CLI, MIGRATE_CLI, ROOT  # noqa: E402
from measure import Run, run, run_all  # noqa: E402

PY = sys.executable
REFERENCE = str(Path(__file__).resolve().parent / "reference.py")
LATEST_VERSION = fixtures.BASE_VERSION + len(fixtures.EXTRA_MIGRATIONS)
SQLITE_SHELL = shutil.which("sqlite3")


# --- Machine -----------------------------------------------------------------

def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    mem_kib = next(int(line.split()[1]) for line in open("/proc/meminfo")
                   if line.startswith("MemTotal"))
    return {"cpus": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem_kib / 1024 ** 2, 1),
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "os": f"{platform.system()} {platform.release()}",
            "sqlite3 shell": subprocess.run([SQLITE_SHELL, "--version"], capture_output=True,
                                            text=True).stdout.split()[0] if SQLITE_SHELL else None,
            "bytecode cache": "off (PYTHONDONTWRITEBYTECODE is set: both modules are compiled "
                              "at every start)" if os.environ.get("PYTHONDONTWRITEBYTECODE")
                              else "on", "load average (1, 5 min)": "%.2f, %.2f" % os.getloadavg()[:2]}


def disk_of(folder: Path) -> str:
    df = subprocess.run(["df", "-hT", str(folder)], capture_output=True, text=True).stdout
    fields = df.splitlines()[-1].split()
    return f"{fields[0]} ({fields[1]}, {fields[2]}, {fields[4]} free)"


# --- Fleet: migrate-all and status -------------------------------------------

def fleet_ini(workdir: Path, fleet: Path, migrations: Path) -> Path:
    return fixtures.write_ini(workdir / f"{fleet.name}.ini", {"tenants": f"{fleet}/*.db"},
                              migrations, keep=30)


def product(cli: Path, ini: Path, *argv: str) -> list[str]:
    return [PY, str(cli), "--config", str(ini), *argv]


def fresh_fleet(workdir: Path, name: str, template: Path, count: int) -> Path:
    shutil.rmtree(workdir / "backups", ignore_errors=True)
    return fixtures.build_fleet(workdir / name, template, count)


def versions_of(fleet: Path) -> list[int]:
    out = run([PY, REFERENCE, "status", str(fleet)]).check("reading versions").stdout
    return json.loads(out)["versions"]


def measure_fleet(workdir: Path, migrations: Path, template: Path, count: int,
                  jobs: bool, old_code: Path | None = None) -> dict:
    """migrate-all (sequential, optionally --jobs 2) and status, each beside its limit;
    old_code: also the status of that checkout's database_migration.py, in the same round."""
    reference_fleet = fresh_fleet(workdir, "ref_fleet", template, count)
    ref = run([PY, REFERENCE, "migrate", str(reference_fleet), str(migrations),
               str(workdir / "ref_backups")]).check("reference migrate")
    shutil.rmtree(workdir / "ref_backups")
    fleet = fresh_fleet(workdir, "fleet", template, count)
    ini = fleet_ini(workdir, fleet, migrations)
    seq = run(product(MIGRATE_CLI, ini, "migrate-all", "--quiet")).check("migrate-all")
    assert versions_of(fleet) == [LATEST_VERSION], "migrate-all did not reach the latest version"
    status = run(product(MIGRATE_CLI, ini, "status")).check("status")
    status_ref = run([PY, REFERENCE, "status", str(fleet)]).check("reference status")
    checked_ref = run([PY, REFERENCE, "status-checked", str(fleet)]).check("reference status-checked")
    old = run(product(old_code / MIGRATE_CLI.name, ini, "status")).check("status (old code)") \
        if old_code else None
    assert all("up to date" in line for line in status.stdout.splitlines()[1:]), \
        f"the migrated fleet is not up to date: {status.stdout[-300:]}"
    fixtures.add_own_table(fleet)               # the second figure: every tenant in drift
    drift = run(product(MIGRATE_CLI, ini, "status")).check("status (drift)")
    drift_ref = run([PY, REFERENCE, "status", str(fleet)]).check("reference status (drift)")
    result = {"instances": count, "migrate": seq, "migrate_ref": ref, "status": status,
              "status_ref": status_ref, "status_checked_ref": checked_ref,
              "status_drift": drift, "status_drift_ref": drift_ref,
              **({"status_old": old} if old else {})}
    if jobs:
        fleet = fresh_fleet(workdir, "fleet", template, count)
        result["migrate_jobs2"] = run(product(MIGRATE_CLI, ini, "migrate-all", "--jobs", "2",
                                              "--quiet")).check("migrate-all --jobs 2")
        assert versions_of(fleet) == [LATEST_VERSION]
    shutil.rmtree(reference_fleet)
    return result


# --- Start-up ----------------------------------------------------------------

def measure_startup(workdir: Path, repeat: int) -> dict:
    """status on the shipped three-instance example vs a bare `import sqlite3`."""
    example = workdir / "example"
    shutil.rmtree(example, ignore_errors=True)
    example.mkdir(parents=True)
    shutil.copyfile(ROOT / "instances.ini", example / "instances.ini")
    shutil.copytree(ROOT / "migrations", example / "migrations")
    ini = example / "instances.ini"
    run(product(MIGRATE_CLI, ini, "migrate-all", "--create", "--quiet")).check("example set-up")
    bare, status = [], []
    for _ in range(repeat):                 # interleaved, so drifts hit both alike
        bare.append(run([PY, "-c", "import sqlite3"]).check("python -c"))
        status.append(run(product(MIGRATE_CLI, ini, "status")).check("status (example)"))
    return {"status": median_run(status), "bare": median_run(bare)}


def median_fleet(rounds: list[dict]) -> dict:
    """Each measure's median over rounds (each round runs product and limit side by side)."""
    return {key: median_run([r[key] for r in rounds]) if isinstance(value, Run) else value
            for key, value in rounds[0].items()}


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]


# --- Big database: backup and dry run ----------------------------------------

def big_ini(workdir: Path, db: Path, migrations: Path) -> Path:
    return fixtures.write_ini(workdir / f"{db.stem}.ini", {"big": str(db)}, migrations, keep=0)


def reference_copy(db: Path, copy: Path) -> Run:
    """`cp DB COPY && sqlite3 COPY 'PRAGMA integrity_check'` (python stand-in without the shell)."""
    check = [SQLITE_SHELL, str(copy), "PRAGMA integrity_check"] if SQLITE_SHELL \
        else [PY, REFERENCE, "integrity", str(copy)]
    result = run_all([["cp", str(db), str(copy)], check]).check("cp + integrity_check")
    copy.unlink()
    return result


def backup_json(result: Run) -> dict:
    return json.loads(result.stdout)


def remove_backup(result: Run) -> None:
    """Outside the timing (keep_backups = 0), so neither side pays for deleting a GiB."""
    path = Path(backup_json(result)["path"])
    path.unlink()
    Path(f"{path}.json").unlink()


def measure_backup(workdir: Path, db: Path, ini: Path, repeat: int) -> dict:
    """Interleaved pairs, each started with no dirty pages waiting; the medians."""
    refs, backups = [], []
    for _ in range(repeat):
        os.sync()
        refs.append(reference_copy(db, workdir / "cp_copy.db"))
        os.sync()
        backups.append(run(product(BACKUP_CLI, ini, "backup", "big", "--json")).check("backup"))
        assert backup_json(backups[-1])["verified"] is True
        remove_backup(backups[-1])
    return {"backup": median_run(backups), "backup_ref": median_run(refs)}


def measure_dry_run(db: Path, ini: Path) -> dict:
    before = (db.stat().st_mtime_ns, db.stat().st_size)
    dry = run(product(MIGRATE_CLI, ini, "migrate", "big", "--dry-run")).check("dry run")
    assert (db.stat().st_mtime_ns, db.stat().st_size) == before, "the dry run changed the database"
    return {"dry_run": dry}


def measure_size(workdir: Path, migrations: Path, size_mib: float, repeat: int) -> dict:
    db = fixtures.build_big(workdir, migrations, workdir / f"big-{size_mib:g}MiB.db", size_mib)
    ini = big_ini(workdir, db, migrations)
    result = {"size_mib": db.stat().st_size / 2 ** 20, "db": db, "ini": ini}
    result.update(measure_backup(workdir, db, ini, repeat))
    result.update(measure_dry_run(db, ini))
    return result


# --- Backup under a concurrent writer ----------------------------------------

def count_written(db: Path, first_id: int) -> int:
    with sqlite3.connect(db, timeout=60) as conn:
        count = conn.execute("SELECT count(*) FROM payment WHERE id >= ?", (first_id,)).fetchone()[0]
    conn.close()
    return count


def check_snapshot(copy: Path, first_id: int) -> dict:
    """integrity_check passes, and the copy's rows match its tally (one single snapshot)."""
    conn = sqlite3.connect(f"{copy.resolve().as_uri()}?mode=ro", uri=True)
    integrity = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    rows = conn.execute("SELECT count(*) FROM payment WHERE id >= ?", (first_id,)).fetchone()[0]
    tally = conn.execute("SELECT n FROM bench_tally WHERE id = 1").fetchone()[0]
    conn.close()
    return {"integrity": integrity == ["ok"], "rows": rows, "tally": tally,
            "consistent": rows == tally}


def backup_under_writer(workdir: Path, db: Path, ini: Path, mode: str, rate: int) -> dict:
    """Back up while another process commits `rate` rows a second; check the copy."""
    fixtures.set_journal_mode(db, mode)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE bench_tally SET n = 0 WHERE id = 1")
    conn.close()
    stop = workdir / "writer.stop"
    stop.unlink(missing_ok=True)
    writer = subprocess.Popen([PY, REFERENCE, "writer", str(db), "3600", str(rate), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        first_id = json.loads(writer.stdout.readline())["first_id"]
        time.sleep(1.0)
        written_before = count_written(db, first_id)
        result = run(product(BACKUP_CLI, ini, "backup", "big", "--json"))
        written_after = count_written(db, first_id)
    finally:
        stop.touch()
        writer_report = json.loads(writer.stdout.readline() or "{}")
        writer.wait()
        stop.unlink(missing_ok=True)
    outcome = {"mode": mode, "rate": rate, "run": result, "finished": result.returncode == 0,
               "commits_during": written_after - written_before, "writer": writer_report}
    if result.returncode == 0:
        outcome.update(check_snapshot(Path(backup_json(result)["path"]), first_id))
        remove_backup(result)
    fixtures.set_journal_mode(db, "delete")
    return outcome


# --- Report ------------------------------------------------------------------

def ratio(measured: Run, limit: Run) -> float:
    return measured.seconds / limit.seconds


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main_rows(fleet: dict, startup: dict, big: dict, writers: list[dict]) -> list[list[str]]:
    """One row per target: what, product, limit, ratio, peak memory, target, verdict."""
    rows = []
    n, gib = fleet["instances"], f"{big['size_mib']:.0f} MiB" if big else ""
    r = ratio(fleet["migrate"], fleet["migrate_ref"])
    rows.append([f"migrate-all, {n} instances x 10 migrations", secs(fleet["migrate"]),
                 secs(fleet["migrate_ref"]), f"{r:.2f}x", mib(fleet["migrate"]), "<= 1.5x",
                 verdict(r <= 1.5)])
    if "migrate_jobs2" in fleet:
        j = fleet["migrate_jobs2"]
        rows.append([f"migrate-all --jobs 2, {n} instances", secs(j), secs(fleet["migrate"]) +
                     " (sequential)", f"{ratio(j, fleet['migrate']):.2f}x", mib(j),
                     "<= 0.7x sequential", verdict(j.seconds <= 0.7 * fleet["migrate"].seconds)])
    r = ratio(fleet["status"], fleet["status_ref"])
    rows.append([f"status, {n} instances (up to date)", secs(fleet["status"]),
                 secs(fleet["status_ref"]), f"{r:.2f}x", mib(fleet["status"]), "<= 2x",
                 verdict(r <= 2)])
    r = ratio(fleet["status_checked_ref"], fleet["status_ref"])
    rows.append([f"  the limit plus `PRAGMA quick_check` of each ({n} instances)",
                 secs(fleet["status_checked_ref"]), secs(fleet["status_ref"]), f"{r:.2f}x",
                 mib(fleet["status_checked_ref"]), "-", "-"])
    if "status_old" in fleet:
        r = ratio(fleet["status_old"], fleet["status_ref"])
        rows.append([f"  status, {n} instances (up to date), the code in --old-code",
                     secs(fleet["status_old"]), secs(fleet["status_ref"]), f"{r:.2f}x",
                     mib(fleet["status_old"]), "-", "-"])
    r = ratio(fleet["status_drift"], fleet["status_drift_ref"])
    rows.append([f"status, {n} instances, each with a table of its own (drift)",
                 secs(fleet["status_drift"]), secs(fleet["status_drift_ref"]), f"{r:.2f}x",
                 mib(fleet["status_drift"]), "-", "-"])
    if big is None:
        r = ratio(startup["status"], startup["bare"])
        rows.append(["start-up: status, shipped example", secs(startup["status"]),
                     secs(startup["bare"]) + " (python -c 'import sqlite3')", f"{r:.2f}x",
                     mib(startup["status"]), "<= 3x", verdict(r <= 3)])
        return rows
    r = ratio(big["backup"], big["backup_ref"])
    rows.append([f"backup {gib} (verified), idle", secs(big["backup"]),
                 secs(big["backup_ref"]) + " (cp + integrity_check)", f"{r:.2f}x",
                 mib(big["backup"]), "<= 1.3x, < 100 MiB",
                 verdict(r <= 1.3 and big["backup"].peak_mib < 100)])
    for w in writers:
        ok = w["finished"] and w.get("integrity") and w.get("consistent")
        rows.append([f"backup {gib} while a writer commits {w['rate']}/s ({w['mode']} mode)",
                     secs(w["run"]), "-", f"{ratio(w['run'], big['backup_ref']):.2f}x",
                     mib(w["run"]), "finishes, consistent", verdict(bool(ok))])
    rows.append([f"dry run on {gib}", secs(big["dry_run"]), "-", "-", mib(big["dry_run"]),
                 "< 150 MiB", verdict(big["dry_run"].peak_mib < 150)])
    r = ratio(startup["status"], startup["bare"])
    rows.append(["start-up: status, shipped example", secs(startup["status"]),
                 secs(startup["bare"]) + " (python -c 'import sqlite3')", f"{r:.2f}x",
                 mib(startup["status"]), "<= 3x", verdict(r <= 3)])
    return rows


def secs(result: Run) -> str:
    return f"{result.seconds:.2f} s" if result.seconds < 100 else f"{result.seconds:.0f} s"


def mib(result: Run) -> str:
    return f"{result.peak_mib:.0f} MiB"


def growth_rows(fleets: list[dict], sizes: list[dict]) -> list[list[str]]:
    """Cost per instance / per MiB at each scale; 'growth' = per-unit cost, largest / smallest."""
    rows = []
    for label, key in (("migrate-all", "migrate"), ("  limit (reference.py migrate)", "migrate_ref"),
                       ("status (up to date)", "status"),
                       ("  limit (reference.py status)", "status_ref")):
        per = [f["instances"] and f[key].seconds / f["instances"] * 1000 for f in fleets]
        cells = [f"{f['instances']}: {secs(f[key])} ({p:.1f} ms each)" for f, p in zip(fleets, per)]
        rows.append([label] + cells + [f"{per[-1] / per[0]:.2f}"])
    for label, key in (("backup (verified)", "backup"), ("  limit (cp + integrity_check)",
                                                         "backup_ref"), ("dry run", "dry_run")) if sizes else ():
        per = [s[key].seconds / s["size_mib"] * 1000 for s in sizes]
        cells = [f"{s['size_mib']:.0f} MiB: {secs(s[key])}, {mib(s[key])}" for s in sizes]
        rows.append([label] + cells + [f"{per[-1] / per[0]:.2f}"])
    return rows


def report(info: dict, command: str, fleets: list[dict], startup: dict, sizes: list[dict],
           writers: list[dict]) -> str:
    parts = ["## Machine", "", table(["item", "value"], [[k, str(v)] for k, v in info.items()]),
             "", f"Command: `{command}`", "", "## Targets", "",
             table(["measure", "product", "limit", "ratio", "peak memory", "target", "result"],
                   main_rows(fleets[-1], startup, sizes[-1] if sizes else None, writers)), ""]
    for w in writers:
        parts.append(f"- writer, {w['mode']} mode: backup {'finished' if w['finished'] else 'FAILED'}"
                     f" in {secs(w['run'])}; {w['commits_during']} commits landed while it ran; "
                     f"copy integrity_check {'ok' if w.get('integrity') else 'FAILED'}; snapshot "
                     f"{w.get('rows')} rows = tally {w.get('tally')}: "
                     f"{'consistent' if w.get('consistent') else 'INCONSISTENT'}; writer's "
                     f"longest commit {w['writer'].get('longest_commit_s')} s")
    if not SQLITE_SHELL:
        parts.append("- the sqlite3 shell is not installed: the integrity_check half of the backup "
                     "limit ran in a separate python process instead")
    scale = ["", "## Growth", "", "Growth = cost per instance (or per MiB) at the largest scale "
             "divided by that at the smallest: 1 or less is linear or better.", "",
             table(["measure"] + [f"scale {i + 1}" for i in range(max(len(fleets), len(sizes)))]
                   + ["growth"], pad(growth_rows(fleets, sizes)))]
    return "\n".join(parts + scale)


def pad(rows: list[list[str]]) -> list[list[str]]:
    width = max(len(r) for r in rows)
    return [r[:-1] + ["-"] * (width - len(r)) + r[-1:] for r in rows]


# --- Main --------------------------------------------------------------------

def scales(top: float, integer: bool) -> list:
    values = [top / 100, top / 10, top]
    values = [max(1, round(v)) for v in values] if integer else values
    return sorted(set(values))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 instances, 64 MiB")
    parser.add_argument("--instances", type=int, help="largest fleet (default 1000)")
    parser.add_argument("--size-gib", type=float, help="largest database (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="backup runs per size (median)")
    parser.add_argument("--startup-repeat", type=int, default=11)
    parser.add_argument("--writer-rate", type=int, default=1000, help="commits per second")
    parser.add_argument("--workdir", type=Path, help="keep data here (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="do not delete the workdir")
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--fleet-only", action="store_true",
                        help="only migrate-all, --jobs 2, status and start-up (no big database)")
    parser.add_argument("--old-code", type=Path,
                        help="a checkout of older code: its status is timed in the same rounds")
    parser.add_argument("--fleet-repeat", type=int, default=1,
                        help="rounds of the largest fleet (interleaved; medians)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    instances = args.instances or (100 if args.quick else 1000)
    size_mib = (args.size_gib or (1 / 16 if args.quick else 1)) * 1024
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sqlite-bench-", dir="/work"
                                                    if os.path.isdir("/work") else None))
    workdir.mkdir(parents=True, exist_ok=True)
    command = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        return run_benchmarks(args, workdir.resolve(), instances, size_mib, command.strip())
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def run_benchmarks(args, workdir: Path, instances: int, size_mib: float, command: str) -> int:
    info = {**machine(), "disk": disk_of(workdir)}
    progress(f"workdir {workdir}; fleet up to {instances}, database up to {size_mib:g} MiB")
    migrations = fixtures.write_migrations(workdir / "migrations")
    template = fixtures.build_template(workdir, migrations)
    fleets = []
    for count in scales(instances, integer=True):
        rounds = args.fleet_repeat if count == instances else 1
        progress(f"fleet of {count}: migrate-all, status ({rounds} round(s))")
        fleets.append(median_fleet([measure_fleet(workdir, migrations, template, count,
                                                  count == instances, args.old_code)
                                    for _ in range(rounds)]))
    progress("start-up")
    startup = measure_startup(workdir, args.startup_repeat)
    sizes = []
    for size in [] if args.fleet_only else scales(size_mib, integer=False):
        progress(f"database of {size:g} MiB: build, backup, dry run")
        sizes.append(measure_size(workdir, migrations, size, args.repeat))
    writers = []
    for mode in () if args.fleet_only else ("delete", "wal"):
        progress(f"backup of {size_mib:g} MiB under a writer ({mode})")
        writers.append(backup_under_writer(workdir, sizes[-1]["db"], sizes[-1]["ini"], mode,
                                           args.writer_rate))
    text = report(info, command, fleets, startup, sizes, writers)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    return 0


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
