"""The "physical limit" side of each benchmark, and the concurrent writer.

    python bench/reference.py migrate FLEET_DIR MIGRATIONS_DIR BACKUP_DIR
    python bench/reference.py status FLEET_DIR
    python bench/reference.py status-checked FLEET_DIR      # status plus quick_check
    python bench/reference.py integrity DB
    python bench/reference.py writer DB SECONDS RATE STOP_FILE

One Python process applying the same SQL to the same databases, with a plain
page copy (the backup API in one step, nothing else) as the backup.
"""
from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path

UP_MARKER, DOWN_MARKER = "-- migrate:up", "-- migrate:down"


def up_statements(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if UP_MARKER in text:
        text = text.split(UP_MARKER, 1)[1]
    text = text.split(DOWN_MARKER, 1)[0]
    statements, pending = [], ""
    for piece in text.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    return [s for s in statements if s.strip(";").strip()]


def load_migrations(folder: Path) -> list[tuple[int, str, list[str]]]:
    migrations = []
    for path in sorted(folder.glob("*.sql")):
        number, _, description = path.stem.partition("_")
        migrations.append((int(number), description.replace("_", " "), up_statements(path)))
    return migrations


def migrate_one(db: Path, migrations, backup_dir: Path) -> int:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        target = sqlite3.connect(backup_dir / db.name)
        conn.backup(target)
        target.close()
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        pending = [m for m in migrations if m[0] not in done]
        conn.execute("BEGIN IMMEDIATE")
        for version, description, statements in pending:
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version, description) VALUES (?, ?)",
                         (version, description))
        conn.execute("COMMIT")
        return len(pending)
    finally:
        conn.close()


def cmd_migrate(fleet: str, migrations_dir: str, backup_dir: str) -> None:
    migrations = load_migrations(Path(migrations_dir))
    Path(backup_dir).mkdir(parents=True, exist_ok=True)
    applied = sum(migrate_one(db, migrations, Path(backup_dir))
                  for db in sorted(Path(fleet).glob("*.db")))
    print(json.dumps({"applied": applied}))


def cmd_status(fleet: str) -> None:
    versions = {}
    for db in sorted(Path(fleet).glob("*.db")):
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        versions[db.stem] = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
        conn.close()
    print(json.dumps({"instances": len(versions), "versions": sorted(set(versions.values()))}))


def cmd_status_checked(fleet: str) -> None:
    """status's limit with the check status must run: max(version) and `PRAGMA quick_check`
    of every database (what 2x the limit leaves for everything else)."""
    versions, damaged = {}, []
    for db in sorted(Path(fleet).glob("*.db")):
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        if conn.execute("PRAGMA quick_check").fetchall() != [("ok",)]:
            damaged.append(db.stem)
        versions[db.stem] = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
        conn.close()
    print(json.dumps({"instances": len(versions), "versions": sorted(set(versions.values())),
                      "damaged": damaged}))


def cmd_integrity(db: str) -> None:
    """Stand-in for `sqlite3 DB 'PRAGMA integrity_check'` when the shell is not installed."""
    conn = sqlite3.connect(f"{Path(db).resolve().as_uri()}?mode=ro", uri=True)
    print("\n".join(row[0] for row in conn.execute("PRAGMA integrity_check")))


def cmd_writer(db: str, seconds: str, rate: str, stop_file: str) -> None:
    """Commit one payment row plus the tally, `rate` times a second, until stop_file exists."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=120)
    interval, deadline = 1 / float(rate), time.monotonic() + float(seconds)
    commits, longest, next_at = 0, 0.0, time.monotonic()
    first_id = conn.execute("SELECT coalesce(max(id), 0) FROM payment").fetchone()[0] + 1
    print(json.dumps({"ready": True, "first_id": first_id}), flush=True)
    while time.monotonic() < deadline and not os.path.exists(stop_file):
        started = time.monotonic()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO payment (loan_id, amount, new_field) VALUES (1, 1.0, 7)")
        conn.execute("UPDATE bench_tally SET n = n + 1 WHERE id = 1")
        conn.execute("COMMIT")
        commits += 1
        longest = max(longest, time.monotonic() - started)
        next_at = max(next_at + interval, time.monotonic() - 0.1)   # no long catch-up bursts
        time.sleep(max(0.0, next_at - time.monotonic()))
    print(json.dumps({"commits": commits, "longest_commit_s": round(longest, 3)}), flush=True)


if __name__ == "__main__":
    commands = {"migrate": cmd_migrate, "status": cmd_status, "status-checked": cmd_status_checked,
                "integrity": cmd_integrity,
                "writer": cmd_writer}
    commands[sys.argv[1]](*sys.argv[2:])
