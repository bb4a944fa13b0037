"""Benchmark data: the migrations, the fleet of loan-app databases, the big databases."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIGRATE_CLI = ROOT / "database_migration.py"
BACKUP_CLI = ROOT / "safe_db_update.py"
BASE_VERSION = 3                        # the fleet starts at the shipped example's history

# Ten more migrations (0004-0013), pending on every benchmark database: new tables,
# columns, indexes, a trigger, a view and a data update, the mix a loan app grows by.
EXTRA_MIGRATIONS = {
    "0004_create_loan_note": "CREATE TABLE loan_note (\n    id INTEGER PRIMARY KEY,\n"
        "    loan_id INTEGER NOT NULL REFERENCES loan (id) ON DELETE CASCADE,\n"
        "    body TEXT NOT NULL,\n    created_at DATETIME DEFAULT CURRENT_TIMESTAMP\n);\n"
        "CREATE INDEX ix_loan_note_loan_id ON loan_note (loan_id);",
    "0005_add_user_phone": "ALTER TABLE user ADD COLUMN phone VARCHAR(30);",
    "0006_add_loan_due_date": "ALTER TABLE loan ADD COLUMN due_date DATE;",
    "0007_index_loan_status": "CREATE INDEX ix_loan_status ON loan (status);",
    "0008_create_audit_log": "CREATE TABLE audit_log (\n    id INTEGER PRIMARY KEY,\n"
        "    table_name TEXT NOT NULL,\n    row_id INTEGER NOT NULL,\n"
        "    action TEXT NOT NULL,\n    at DATETIME DEFAULT CURRENT_TIMESTAMP\n);",
    "0009_audit_loan_status": "CREATE TRIGGER loan_status_audit AFTER UPDATE OF status ON loan\n"
        "BEGIN\n    INSERT INTO audit_log (table_name, row_id, action)\n"
        "    VALUES ('loan', NEW.id, 'status ' || OLD.status || ' -> ' || NEW.status);\nEND;",
    "0010_fill_due_dates": "UPDATE loan SET due_date = date(created_at, '+30 days')\n"
        "WHERE due_date IS NULL;",
    "0011_view_open_loans": "CREATE VIEW open_loans AS\nSELECT loan.id, user.email, loan.amount, "
        "loan.due_date\nFROM loan JOIN user ON user.id = loan.user_id\nWHERE loan.status = 'open';",
    "0012_add_payment_method": "ALTER TABLE payment ADD COLUMN method VARCHAR(20) "
        "DEFAULT 'transfer';",
    "0013_index_user_name": "CREATE INDEX ix_user_name ON user (name);",
}

FILL_USERS = """
INSERT INTO user (id, email, name, password_hash, created_at)
WITH RECURSIVE n(x) AS (SELECT :first UNION ALL SELECT x + 1 FROM n WHERE x < :last)
SELECT x, 'user' || x || '@example.com', 'User ' || x, hex(randomblob(32)),
       datetime('2024-01-01', '+' || (x % 50000) || ' minutes') FROM n
"""
FILL_LOANS = """
INSERT INTO loan (id, user_id, amount, interest, status, created_at, new_field)
WITH RECURSIVE n(x) AS (SELECT :first UNION ALL SELECT x + 1 FROM n WHERE x < :last)
SELECT x, (x - 1) / 3 + 1, (x * 7919 % 1000000) / 100.0, (x % 900) / 100.0,
       CASE x % 4 WHEN 0 THEN 'closed' ELSE 'open' END,
       datetime('2024-01-01', '+' || (x % 50000) || ' minutes'), 'ref-' || x FROM n
"""
FILL_PAYMENTS = """
INSERT INTO payment (id, loan_id, amount, paid_at, new_field)
WITH RECURSIVE n(x) AS (SELECT :first UNION ALL SELECT x + 1 FROM n WHERE x < :last)
SELECT x, (x - 1) / 3 + 1, (x * 104729 % 100000) / 100.0,
       datetime('2024-02-01', '+' || (x % 90000) || ' minutes'), x % 3 FROM n
"""
WRITER_TABLE = "CREATE TABLE IF NOT EXISTS bench_tally (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"


def write_migrations(folder: Path) -> Path:
    """The shipped 0001-0003 plus the ten benchmark migrations."""
    folder.mkdir(parents=True, exist_ok=True)
    for sql in sorted((ROOT / "migrations").glob("*.sql")):
        shutil.copyfile(sql, folder / sql.name)
    for stem, up in EXTRA_MIGRATIONS.items():
        (folder / f"{stem}.sql").write_text(f"-- migrate:up\n{up}\n", encoding="utf-8")
    return folder


def write_ini(path: Path, sections: dict[str, str], migrations: Path, keep: int = 0) -> Path:
    lines = ["[DEFAULT]", "backup_dir = backups", f"migrations_dir = {migrations}",
             f"keep_backups = {keep}", "busy_timeout = 60", ""]
    for name, db_path in sections.items():
        lines += [f"[{name}]", f"path = {db_path}", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def create_at_base_version(workdir: Path, db_path: Path, migrations: Path) -> None:
    """A new database at version 3, made by the product itself (so checksums match)."""
    ini = write_ini(workdir / "template.ini", {"template": str(db_path)}, migrations)
    subprocess.run([sys.executable, str(MIGRATE_CLI), "--config", str(ini), "--quiet",
                    "migrate", "template", "--create", "--to", str(BASE_VERSION)], check=True)
    ini.unlink()
    # Its audit trail would make the next --create of 'template' look like a lost database.
    shutil.rmtree(workdir / "backups" / "template", ignore_errors=True)


def fill(conn: sqlite3.Connection, users: int, first_user: int = 1) -> None:
    """Add users, three loans per user and three payments per loan, in one transaction."""
    last_user = first_user + users - 1
    loans = (3 * (first_user - 1) + 1, 3 * last_user)
    payments = (3 * (loans[0] - 1) + 1, 3 * loans[1])
    with conn:
        conn.execute(FILL_USERS, {"first": first_user, "last": last_user})
        conn.execute(FILL_LOANS, {"first": loans[0], "last": loans[1]})
        conn.execute(FILL_PAYMENTS, {"first": payments[0], "last": payments[1]})


def build_template(workdir: Path, migrations: Path, users: int = 100) -> Path:
    """One small instance: 100 users, 300 loans, 900 payments (a few hundred rows per table).

    Made by the migrations alone, as a real tenant is: after migrate-all, status shows it
    'up to date'. (Until 2026-11-29 it also held bench_tally, a table no migration made,
    so every benchmark tenant showed as 'drift'; add_own_table() measures that case.)
    """
    template = workdir / "template.db"
    if not template.exists():
        create_at_base_version(workdir, template, migrations)
        with sqlite3.connect(template) as conn:
            fill(conn, users)
        conn.close()
    return template


def add_own_table(fleet: Path) -> None:
    """Give every database in the fleet a table no migration made (bench_tally): status
    then shows it as 'drift' and compares that table's columns, the slower path."""
    for db in sorted(fleet.glob("*.db")):
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute(WRITER_TABLE)
        conn.close()


def build_fleet(folder: Path, template: Path, count: int) -> Path:
    """count copies of the template as folder/tNNNN.db; anything there before is removed."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for index in range(count):
        shutil.copyfile(template, folder / f"t{index:05d}.db")
    return folder


def build_big(workdir: Path, migrations: Path, path: Path, size_mib: float) -> Path:
    """A loan-app database of about size_mib MiB at version 3 (kept between runs)."""
    if path.exists():
        return path
    draft = path.with_name(f"{path.name}.building")
    for leftover in (draft, Path(f"{draft}-journal")):
        if leftover.exists():
            leftover.unlink()
    create_at_base_version(workdir, draft, migrations)
    conn = sqlite3.connect(draft)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute(WRITER_TABLE)
    with conn:
        conn.execute("INSERT INTO bench_tally (id, n) VALUES (1, 0)")
    target, users = size_mib * 1024 * 1024, 0
    batch = int(max(100, min(20000, target // 9000)))   # about ten batches, 900 bytes a user
    while os.path.getsize(draft) < target:
        fill(conn, batch, users + 1)
        users += batch
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.close()
    os.replace(draft, path)
    return path


def set_journal_mode(path: Path, mode: str) -> None:
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute(f"PRAGMA journal_mode = {mode}")
    conn.close()
