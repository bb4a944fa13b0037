"""Waiting is bounded by busy_timeout: the application holding a read transaction.

A real second process holds a read transaction on a rollback-journal database (as
an application serving a slow page does) while migrate, rollback and restore run;
a third process keeps reading with its own busy timeout, as the application's
other requests do. Each command gives up after busy_timeout with one line saying
what holds the database, changes nothing, and never makes the readers fail.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from contextlib import closing

from tests.support import INI, ProjectTestCase, query, safe_db_update, sha256

BUSY_TIMEOUT = 0.3                  # the instances' busy_timeout in these tests, seconds
READER_TIMEOUT = 3                  # the application's own busy timeout
SLACK = 6.0                         # start-up, the backup, the migration's own work
SAFETY_TIMEOUT = 60

HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=0)
conn.execute("BEGIN")
conn.execute("SELECT COUNT(*) FROM user").fetchone()
print("holding", flush=True)
sys.stdin.read()
conn.execute("COMMIT")
"""

READER = """
import json, os, sqlite3, sys, time
reads = failures = 0
errors = []
while not os.path.exists(sys.argv[2]):
    try:
        with sqlite3.connect(sys.argv[1], timeout=float(sys.argv[3])) as conn:
            conn.execute("SELECT COUNT(*) FROM user").fetchone()
        reads += 1
    except sqlite3.Error as exc:
        failures += 1
        errors.append(str(exc))
    if reads + failures == 1:
        print("reading", flush=True)
    time.sleep(0.02)
print(json.dumps({"reads": reads, "failures": failures, "errors": errors[:3]}), flush=True)
"""

RENAME = ("0003_mark_names.sql", """-- migrate:up
UPDATE user SET name = name || '.' WHERE email LIKE '%@%';
-- migrate:down
UPDATE user SET name = substr(name, 1, length(name) - 1) WHERE email LIKE '%@%';
""")


class HeldByTheApplicationTests(ProjectTestCase):
    ini = INI.replace("busy_timeout = 2", f"busy_timeout = {BUSY_TIMEOUT}")

    def setUp(self) -> None:
        super().setUp()
        self.assertIn(f"busy_timeout = {BUSY_TIMEOUT}", self.ini)
        db = self.create()
        with closing(sqlite3.connect(db)) as conn:      # 10 MB: more than SQLite's page cache
            conn.executemany("INSERT INTO user (email, name) VALUES (?, ?)",
                             [(f"{i}@example.org", "n" * 500) for i in range(20_000)])
            conn.commit()
        self.assertEqual(query(db, "PRAGMA journal_mode"), [("delete",)])

    def start(self, script: str, *argv: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", script, *argv], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        self.addCleanup(process.stdout.close)
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        self.addCleanup(process.stdin.close)
        return process

    def hold_a_read_transaction(self) -> subprocess.Popen:
        holder = self.start(HOLDER, str(self.db()))
        self.assertEqual(holder.stdout.readline().strip(), "holding")
        return holder

    def while_held(self, script: str, *argv: str) -> tuple[subprocess.CompletedProcess, float, dict]:
        """Run a CLI while the application holds a read transaction and keeps reading."""
        before = sha256(self.db())
        holder = self.hold_a_read_transaction()
        stop = self.root / "stop-reading"
        reader = self.start(READER, str(self.db()), str(stop), str(READER_TIMEOUT))
        self.assertEqual(reader.stdout.readline().strip(), "reading")   # before the command
        started = time.monotonic()
        result = self.run_script(script, *argv, timeout=SAFETY_TIMEOUT)
        seconds = time.monotonic() - started
        stop.touch()
        reads = json.loads(reader.stdout.readline())
        holder.stdin.close()
        self.assertEqual(holder.wait(timeout=SAFETY_TIMEOUT), 0)
        self.assertEqual(sha256(self.db()), before, "the database changed")
        return result, seconds, reads

    def assertGaveUpInTime(self, result: subprocess.CompletedProcess, seconds: float,
                           reads: dict) -> None:
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertLess(seconds, BUSY_TIMEOUT + SLACK, result.stderr)
        self.assertGreater(reads["reads"], 0)
        self.assertEqual(reads["failures"], 0, reads["errors"])
        self.assertNoTraceback(result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("dev: the database is locked by another connection (the application?",
                      result.stderr)
        self.assertIn(f"for more than {BUSY_TIMEOUT} s; nothing changed; try again when it is "
                      f"idle", result.stderr)
        # It waited busy_timeout before giving up (its own record, start-up left out).
        entry = json.loads((self.root / "backups" / "dev" / "history.jsonl")
                           .read_text(encoding="utf-8").splitlines()[-1])
        self.assertTrue(entry["outcome"].startswith("failed: "), entry)
        self.assertIn("locked", entry["outcome"])
        self.assertGreaterEqual(entry["seconds"], BUSY_TIMEOUT, entry)

    def test_migrate_gives_up_after_busy_timeout_and_the_readers_carry_on(self) -> None:
        self.write_migration(*RENAME)
        result, seconds, reads = self.while_held("database_migration.py", "migrate", "dev")
        self.assertGaveUpInTime(result, seconds, reads)
        self.assertEqual(query(self.db(), "SELECT MAX(version) FROM schema_migrations"), [(2,)])
        code, _, err = self.migrate("dev")          # once the application lets go
        self.assertEqual(code, 0, err)
        self.assertEqual(query(self.db(), "SELECT COUNT(*) FROM user WHERE name LIKE '%.'"),
                         [(20_002,)])

    def test_rollback_gives_up_after_busy_timeout(self) -> None:
        self.write_migration(*RENAME)
        code, _, err = self.migrate("dev")
        self.assertEqual(code, 0, err)
        result, seconds, reads = self.while_held("database_migration.py", "rollback", "dev",
                                                 "--to", "2")
        self.assertGaveUpInTime(result, seconds, reads)
        self.assertEqual(query(self.db(), "SELECT MAX(version) FROM schema_migrations"), [(3,)])

    def test_restore_gives_up_after_busy_timeout(self) -> None:
        code, _, err = self.run_cli(safe_db_update, "backup", "dev")
        self.assertEqual(code, 0, err)
        with closing(sqlite3.connect(self.db())) as conn:
            conn.execute("DELETE FROM payment")
            conn.commit()
        result, seconds, reads = self.while_held("safe_db_update.py", "restore", "dev", "--yes")
        self.assertGaveUpInTime(result, seconds, reads)
        self.assertEqual(query(self.db(), "SELECT COUNT(*) FROM payment"), [(0,)])
        self.assertEqual([p.name for p in self.backups() if "pre-restore" in p.name], [])
