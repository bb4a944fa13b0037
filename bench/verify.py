"""A verified backup of a big database, taken apart: what each check costs and proves;
the pre-migrate cost; how long the application's writes wait during a table rebuild.

    python bench/verify.py --workdir /work/benchdata --keep             # 1 GiB
    python bench/verify.py --size-gib 0.25 --repeat 3

Every figure is a real subprocess, measured in interleaved rounds (medians), so that
the load of a shared machine hits every method alike. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import os
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
from fixtures import BACKUP_CLI, MIGRATE_CLI  # noqa: E402
from measure import Run, run  # noqa: E402

PY = sys.executable
HERE = Path(__file__).resolve()
SQLITE_SHELL = shutil.which("sqlite3")

# --- The checks, each run in its own process: python bench/verify.py check METHOD DB ---

def readonly(db: str) -> sqlite3.Connection:
    return sqlite3.connect(f"{Path(db).resolve().as_uri()}?mode=ro", uri=True)


def check_pragma(db: str, pragma: str) -> list[str]:
    with readonly(db) as conn:
        return [row[0] for row in conn.execute(f"PRAGMA {pragma}")]


def check_table(args: tuple[str, str]) -> list[str]:
    db, table = args
    quoted = '"' + table.replace('"', '""') + '"'
    return check_pragma(db, f"integrity_check({quoted})")


def check_tables_in_parallel(db: str, jobs: int) -> list[str]:
    """PRAGMA integrity_check(T) for every table (with its indexes) and for sqlite_schema
    (which adds the freelist), spread over `jobs` processes."""
    import multiprocessing
    with readonly(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    # Biggest first, so that the longest check starts at once.
    sizes = {}
    with readonly(db) as conn:
        for table in tables:
            sizes[table] = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
    work = [(db, t) for t in sorted(tables, key=lambda t: -sizes[t])] + [(db, "sqlite_schema")]
    with multiprocessing.Pool(jobs) as pool:
        results = pool.map(check_table, work, chunksize=1)
    return sorted({line for lines in results for line in lines})


def sha256_file(db: str) -> list[str]:
    import hashlib
    digest = hashlib.sha256()
    with open(db, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return [digest.hexdigest()]


def cmd_check(method: str, db: str) -> None:
    if method == "integrity_check":
        result = check_pragma(db, "integrity_check")
    elif method == "quick_check":
        result = check_pragma(db, "quick_check")
    elif method.startswith("tables-"):
        result = check_tables_in_parallel(db, int(method.split("-", 1)[1]))
    elif method == "sha256":
        result = sha256_file(db)
    else:
        raise SystemExit(f"unknown method {method}")
    print(json.dumps(result))


# --- Measuring ---------------------------------------------------------------

def median(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def big_ini(workdir: Path, name: str, db: Path, migrations: Path, extra: str = "") -> Path:
    ini = fixtures.write_ini(workdir / f"{name}.ini", {"big": str(db)}, migrations, keep=0)
    if extra:
        ini.write_text(ini.read_text(encoding="utf-8") + extra, encoding="utf-8")
    return ini


def remove_backups(workdir: Path) -> None:
    shutil.rmtree(workdir / "backups" / "big", ignore_errors=True)


def measure_checks(workdir: Path, db: Path, repeat: int, jobs: int) -> dict:
    """The copy's checks, and the product's whole backup (default and verify = quick)."""
    migrations = fixtures.write_migrations(workdir / "migrations")
    ini = big_ini(workdir, "verify-full", db, migrations)
    ini_quick = big_ini(workdir, "verify-quick", db, migrations, "verify = quick\n")
    copy = workdir / "verify-copy.db"
    subprocess.run(["cp", str(db), str(copy)], check=True)
    methods = ["integrity_check", "quick_check", f"tables-{jobs}", "sha256"]
    times: dict[str, list[Run]] = {m: [] for m in methods + ["cp", "backup", "backup quick"]}
    for _ in range(repeat):
        os.sync()
        target = workdir / "cp-target.db"
        times["cp"].append(run(["cp", str(db), str(target)]).check("cp"))
        target.unlink()
        for method in methods:
            times[method].append(run([PY, str(HERE), "check", method, str(copy)]).check(method))
        for label, config in (("backup", ini), ("backup quick", ini_quick)):
            os.sync()
            result = run([PY, str(BACKUP_CLI), "--config", str(config), "backup", "big",
                          "--json"]).check(label)
            assert json.loads(result.stdout)["verified"] is True
            times[label].append(result)
            remove_backups(workdir)
    copy.unlink()
    verdicts = {m: json.loads(median(times[m]).stdout) for m in methods}
    assert verdicts["integrity_check"] == ["ok"] and verdicts["quick_check"] == ["ok"]
    assert verdicts[f"tables-{jobs}"] == ["ok"], verdicts[f"tables-{jobs}"]
    return {k: median(v) for k, v in times.items()}


def next_version(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        version = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
    conn.close()
    return max(100, version + 1)


def pre_migrate_migrations(workdir: Path, db: Path, name: str = "premigrate") -> Path:
    """0001-0003 and the cheap migrations earlier rounds applied (an O(1) CREATE TABLE each)."""
    folder = workdir / f"{name}-migrations"
    folder.mkdir(exist_ok=True)
    for sql in sorted((fixtures.ROOT / "migrations").glob("*.sql")):
        shutil.copyfile(sql, folder / sql.name)
    with sqlite3.connect(db) as conn:
        applied = [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
    conn.close()
    for version in applied:
        if version >= 100:
            add_cheap_migration(folder, version)
    return folder


def add_cheap_migration(folder: Path, version: int) -> None:
    (folder / f"{version:04d}_note_{version}.sql").write_text(
        f"-- migrate:up\nCREATE TABLE bench_note_{version} (id INTEGER PRIMARY KEY);\n",
        encoding="utf-8")


def measure_pre_migrate(workdir: Path, big: Path, repeat: int, old_code: Path | None) -> dict:
    """migrate with one O(1) migration pending: all of its time is the pre-migrate cost.
    The limit: one copy (cp) plus one integrity_check of it (the sqlite3 shell)."""
    db = workdir / "premigrate.db"
    if not db.exists():
        subprocess.run(["cp", str(big), str(db)], check=True)
    folder = pre_migrate_migrations(workdir, db)
    ini = big_ini(workdir, "premigrate", db, folder)
    times: dict[str, list[Run]] = {"migrate": [], "limit": [], "old": []}
    for _ in range(repeat):
        copy = workdir / "premigrate-cp.db"
        os.sync()
        check = [SQLITE_SHELL, str(copy), "PRAGMA integrity_check"] if SQLITE_SHELL \
            else [PY, str(HERE), "check", "integrity_check", str(copy)]
        cp = run(["cp", str(db), str(copy)]).check("cp")
        ic = run(check).check("integrity_check")
        times["limit"].append(Run(cp.seconds + ic.seconds, max(cp.peak_mib, ic.peak_mib), 0,
                                  ic.stdout, ""))
        copy.unlink()
        codes = [("migrate", MIGRATE_CLI)] + ([("old", old_code / "database_migration.py")]
                                              if old_code else [])
        for label, cli in codes:
            add_cheap_migration(folder, next_version(db))
            os.sync()
            result = run([PY, str(cli), "--config", str(ini), "migrate", "big", "--json"])
            times[label].append(result.check(f"migrate ({label})"))
            remove_backups(workdir)
    return {k: median(v) for k, v in times.items() if v}


# --- The application's view: writes during a table rebuild -------------------

REBUILD = """-- migrate:up
CREATE TABLE payment_new (
    id INTEGER PRIMARY KEY,
    loan_id INTEGER NOT NULL REFERENCES loan (id) ON DELETE CASCADE,
    amount NUMERIC NOT NULL,
    paid_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    new_field INTEGER,
    CHECK (amount >= 0)
);
INSERT INTO payment_new (id, loan_id, amount, paid_at, new_field)
    SELECT id, loan_id, amount, paid_at, new_field FROM payment;
DROP TABLE payment;
ALTER TABLE payment_new RENAME TO payment;
CREATE INDEX ix_payment_loan_id ON payment (loan_id);
"""


def measure_rebuild_under_writer(workdir: Path, big: Path, rate: int, mode: str) -> dict:
    """migrate rebuilds the payment table (the 12-step way) while a writer commits `rate`
    rows a second: the writer's longest wait and the gap in its commits."""
    db = workdir / f"rebuild-{mode}.db"
    subprocess.run(["cp", str(big), str(db)], check=True)
    fixtures.set_journal_mode(db, mode)
    folder = pre_migrate_migrations(workdir, db, "rebuild")
    (folder / "0099_rebuild_payment.sql").write_text(REBUILD, encoding="utf-8")
    ini = big_ini(workdir, "rebuild", db, folder)
    stop = workdir / "writer.stop"
    stop.unlink(missing_ok=True)
    log = workdir / "writer-commits.log"
    writer = subprocess.Popen([PY, str(HERE), "writer", str(db), str(rate), str(stop), str(log)],
                              stdout=subprocess.PIPE, text=True)
    try:
        json.loads(writer.stdout.readline())
        time.sleep(2.0)
        migrate = run([PY, str(MIGRATE_CLI), "--config", str(ini), "migrate", "big", "--json",
                       "--yes"])
        time.sleep(2.0)
    finally:
        stop.touch()
        report = json.loads(writer.stdout.readline() or "{}")
        writer.wait()
        stop.unlink(missing_ok=True)
    migrate.check("migrate (rebuild)")
    outcome = json.loads(migrate.stdout)
    remove_backups(workdir)
    db.unlink()
    for sidecar in ("-wal", "-shm", "-journal"):
        Path(f"{db}{sidecar}").unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    return {"mode": mode, "migrate": migrate, "transaction_s": outcome.get("seconds"),
            "writer": report}


def cmd_writer(db: str, rate: str, stop_file: str, log: str) -> None:
    """Commit one row `rate` times a second until stop_file exists; report the longest
    wait for a commit, the longest gap between two commits, and when it happened."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=600)
    interval = 1 / float(rate)
    commits, longest, gaps, last = 0, 0.0, [], time.monotonic()
    print(json.dumps({"ready": True}), flush=True)
    next_at = time.monotonic()
    while not os.path.exists(stop_file):
        started = time.monotonic()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO bench_tally (n) VALUES (1)")
        conn.execute("COMMIT")
        done = time.monotonic()
        commits += 1
        longest = max(longest, done - started)
        gaps.append(done - last)
        last = done
        next_at = max(next_at + interval, time.monotonic() - 0.1)
        time.sleep(max(0.0, next_at - time.monotonic()))
    waits_over_1s = sum(1 for g in gaps if g > 1.0)
    print(json.dumps({"commits": commits, "longest_commit_s": round(longest, 3),
                      "longest_gap_s": round(max(gaps, default=0), 3),
                      "gaps_over_1s": waits_over_1s}), flush=True)


# --- Report ------------------------------------------------------------------

def secs(r: Run | float) -> str:
    value = r.seconds if isinstance(r, Run) else r
    return f"{value:.2f} s"


def report(args, info: dict, checks: dict | None, pre: dict | None, rebuilds: list[dict]) -> str:
    lines = [f"Database: {info['size_mib']:.0f} MiB ({info['rows']}); {info['machine']}; "
             f"load before: {info['load_before']}, after: {info['load_after']}",
             f"Command: `{info['command']}`", ""]
    if checks:
        integrity = checks["integrity_check"].seconds
        lines += ["| step or method | seconds | peak memory | vs integrity_check |",
                  "| --- | --- | --- | --- |"]
        for key in ("cp", "integrity_check", "quick_check", f"tables-{args.jobs}", "sha256",
                    "backup", "backup quick"):
            r = checks[key]
            lines.append(f"| {key} | {secs(r)} | {r.peak_mib:.0f} MiB | "
                         f"{r.seconds / integrity:.2f}x |")
        lines.append("")
    if pre:
        limit = pre["limit"].seconds
        lines += ["| pre-migrate (one O(1) migration) | seconds | vs cp + integrity_check |",
                  "| --- | --- | --- |",
                  f"| limit: cp + integrity_check | {secs(pre['limit'])} | 1.00x |",
                  f"| migrate (this code) | {secs(pre['migrate'])} | "
                  f"{pre['migrate'].seconds / limit:.2f}x |"]
        if "old" in pre:
            lines.append(f"| migrate ({args.old_code}) | {secs(pre['old'])} | "
                         f"{pre['old'].seconds / limit:.2f}x |")
        lines.append("")
    for r in rebuilds:
        w = r["writer"]
        lines.append(f"- rebuild of payment, {r['mode']} mode: migrate took {secs(r['migrate'])} "
                     f"(its JSON seconds {r['transaction_s']:.2f} s); the writer made "
                     f"{w.get('commits')} commits, its longest wait for a commit "
                     f"{w.get('longest_commit_s')} s, longest gap between commits "
                     f"{w.get('longest_gap_s')} s, gaps over 1 s: {w.get('gaps_over_1s')}")
    return "\n".join(lines)


def rows_of(db: Path) -> str:
    with readonly(str(db)) as conn:
        counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in ("user", "loan", "payment")}
    return ", ".join(f"{n:,} {t} rows" for t, n in counts.items())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "check":
        cmd_check(argv[1], argv[2])
        return 0
    if argv and argv[0] == "writer":
        cmd_writer(*argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2,
                        help="processes for the per-table check")
    parser.add_argument("--writer-rate", type=int, default=100, help="commits per second")
    parser.add_argument("--only", choices=("checks", "pre-migrate", "rebuild"), action="append")
    parser.add_argument("--old-code", type=Path, help="a checkout of older code to compare")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="sqlite-verify-", dir="/work"
                                                     if os.path.isdir("/work") else None)))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    only = set(args.only or ("checks", "pre-migrate", "rebuild"))
    try:
        migrations = fixtures.write_migrations(workdir / "migrations")
        fixtures.build_template(workdir, migrations)
        size_mib = args.size_gib * 1024
        big = fixtures.build_big(workdir, migrations, workdir / f"big-{size_mib:g}MiB.db", size_mib)
        info = {"size_mib": big.stat().st_size / 2 ** 20, "rows": rows_of(big),
                "machine": f"{os.cpu_count()} cpus, python {sys.version.split()[0]}, "
                           f"sqlite {sqlite3.sqlite_version}",
                "load_before": load(), "command": "python bench/verify.py " + " ".join(argv)}
        checks = measure_checks(workdir, big, args.repeat, args.jobs) if "checks" in only else None
        pre = measure_pre_migrate(workdir, big, args.repeat, args.old_code) \
            if "pre-migrate" in only else None
        rebuilds = [measure_rebuild_under_writer(workdir, big, args.writer_rate, mode)
                    for mode in ("delete", "wal")] if "rebuild" in only else []
        info["load_after"] = load()
        text = report(args, info, checks, pre, rebuilds)
        print(text)
        if args.markdown:
            args.markdown.write_text(text + "\n", encoding="utf-8")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
