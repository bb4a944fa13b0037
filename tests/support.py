"""Shared helpers for the tests: a project in a temporary folder, and ways to run the CLIs."""

from __future__ import annotations

import gc
import hashlib
import io
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import unittest
from contextlib import closing, redirect_stderr, redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import database_migration  # noqa: E402
import safe_db_update  # noqa: E402

LOAN_APP = {
    "0001_create_tables.sql": """-- migrate:up
CREATE TABLE user (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT NOT NULL);
CREATE TABLE loan (id INTEGER PRIMARY KEY,
                   user_id INTEGER NOT NULL REFERENCES user (id) ON DELETE CASCADE,
                   amount NUMERIC NOT NULL);
CREATE TABLE payment (id INTEGER PRIMARY KEY,
                      loan_id INTEGER NOT NULL REFERENCES loan (id) ON DELETE CASCADE,
                      amount NUMERIC NOT NULL);
-- migrate:down
DROP TABLE payment;
DROP TABLE loan;
DROP TABLE user;
""",
    "0002_add_reset_fields.sql": """-- migrate:up
ALTER TABLE user ADD COLUMN reset_token VARCHAR(100);
ALTER TABLE user ADD COLUMN reset_token_expires DATETIME;
-- migrate:down
ALTER TABLE user DROP COLUMN reset_token_expires;
ALTER TABLE user DROP COLUMN reset_token;
""",
}

INI = """[DEFAULT]
keep_backups = 30
busy_timeout = 2

[dev]
path = instance/dev.db

[prod]
path = instance/prod.db
protected = yes
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def query(path: Path, sql: str, params=()) -> list[tuple]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


def schema(path: Path) -> list[tuple]:
    return query(path, "SELECT type, name, sql FROM sqlite_master ORDER BY type, name")


def dump(path: Path) -> list[str]:
    """Every schema object and row, for 'exactly as before' comparisons."""
    with closing(sqlite3.connect(path)) as conn:
        return list(conn.iterdump())


_heap_frozen: list[bool] = []


def collect_garbage() -> None:
    """A full collection, over what the tests made since the first call. At that call (the
    test modules are imported by then) the heap is frozen (gc.freeze): modules, classes,
    the test cases, which every full collection would otherwise walk again (4 ms a call,
    some 2,500 calls in the suite). What was alive then and becomes cyclic garbage later
    is never collected: a few test-case objects, no more than the suite's memory."""
    if not _heap_frozen:
        gc.collect()
        gc.freeze()
        _heap_frozen.append(True)
    gc.collect()


class ProjectTestCase(unittest.TestCase):
    """A project folder with instances.ini, migrations/ and the loan-app history."""

    migrations = LOAN_APP
    ini = INI

    def setUp(self) -> None:
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.root = Path(folder.name)
        self.config = self.root / "instances.ini"
        self.config.write_text(self.ini, encoding="utf-8")
        self.migrations_dir = self.root / "migrations"
        self.migrations_dir.mkdir()
        for name, text in self.migrations.items():
            self.write_migration(name, text)
        (self.root / "instance").mkdir()
        database_migration._loaded.clear()
        database_migration._expected_schemas.clear()

    def write_migration(self, name: str, text: str) -> Path:
        path = self.migrations_dir / name
        path.write_text(text, encoding="utf-8")
        database_migration._loaded.clear()
        return path

    def db(self, name: str = "dev") -> Path:
        return self.root / "instance" / f"{name}.db"

    def backups(self, name: str = "dev") -> list[Path]:
        folder = self.root / "backups" / name / "database"
        return sorted(folder.glob("*.db")) if folder.is_dir() else []

    def instance(self, name: str = "dev") -> safe_db_update.Instance:
        instances = safe_db_update.load_instances(self.config)
        return safe_db_update.select_instances(instances, name, self.config)[0]

    def migrate(self, *argv: str) -> tuple[int, str, str]:
        return self.run_cli(database_migration, "migrate", *argv)

    def run_cli(self, module, *argv: str) -> tuple[int, str, str]:
        """Run a CLI's main() in this process, stdin not a terminal."""
        database_migration._loaded.clear()
        collect_garbage()   # earlier tests' garbage warns now (ResourceWarning), not into err
        out, err = io.StringIO(), io.StringIO()
        stdin = sys.stdin
        sys.stdin = io.StringIO("")
        try:
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    code = module.main(["--config", str(self.config), *argv])
                except SystemExit as exc:       # argparse usage errors and --version
                    code = exc.code
        finally:
            sys.stdin = stdin
        return code, out.getvalue(), err.getvalue()

    def run_script(self, script: str, *argv: str, env: dict | None = None,
                   cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a CLI as a real subprocess with stdin closed (no terminal)."""
        return subprocess.run([sys.executable, str(ROOT / script), "--config", str(self.config),
                               *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env={**os.environ, **(env or {})}, cwd=cwd or self.root,
                              timeout=timeout)

    def create(self, name: str = "dev") -> Path:
        """Migrate a new instance to the latest version and add a few rows."""
        code, _, err = self.migrate(name, "--create")
        self.assertEqual(code, 0, err)
        with closing(sqlite3.connect(self.db(name))) as conn:
            conn.execute("INSERT INTO user (id, email, name) VALUES (1, 'a@x', 'Ann'), (2, 'b@x', 'Bob')")
            conn.execute("INSERT INTO loan (id, user_id, amount) VALUES (1, 1, 100), (2, 2, 250)")
            conn.execute("INSERT INTO payment (id, loan_id, amount) VALUES (1, 1, 10), (2, 2, 20)")
            conn.commit()
        return self.db(name)

    def assertNoTraceback(self, text: str) -> None:
        self.assertNotIn("Traceback", text)


def damage_a_page(live: Path) -> None:
    """Garbage over one page in the middle of a database file (grown first); the header stays."""
    with closing(sqlite3.connect(live)) as conn:
        conn.executemany("INSERT INTO user (id, email, name) VALUES (?, ?, ?)",
                         [(i, f"bulk{i}@x", "n" * 300) for i in range(10_000, 12_000)])
        conn.commit()
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = live.stat().st_size // page_size
    with open(live, "r+b") as handle:
        handle.seek(page_size * (pages // 2))
        handle.write(random.Random(9).randbytes(page_size))
