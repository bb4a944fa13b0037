"""--create makes a database only where none ever was: a lost one is restored, not re-made.

A lost database shows itself by its backups, by an audit trail, or by the -wal,
-journal or -shm files its application left beside it. 'migrate NAME
--new-empty-database' is the one way to start again from nothing, asked for and
recorded.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import sqlite3
import subprocess
import sys
import unittest
from pathlib import Path

from tests.support import (ROOT, ProjectTestCase, database_migration, query, safe_db_update,
                           sha256)

# The application in WAL mode, killed with rows only in its -wal file.
CRASHED_APP = r"""
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode = WAL")
conn.execute("PRAGMA wal_autocheckpoint = 0")
conn.execute("CREATE TABLE note (id INTEGER PRIMARY KEY, body TEXT)")
for i in range(50):
    conn.execute("INSERT INTO note (body) VALUES (?)", (f"note {i}",))
os.kill(os.getpid(), signal.SIGKILL)
"""


class LostDatabaseTestCase(ProjectTestCase):
    def lose(self, name: str = "prod") -> Path:
        """An instance with rows, backups and an audit trail, then its file deleted."""
        db = self.create(name)
        for _ in range(2):
            code, _, err = self.run_cli(safe_db_update, "backup", name)
            self.assertEqual(code, 0, err)
        db.unlink()
        return db

    def crash_app(self, db: Path) -> None:
        """A real application process killed in WAL mode, then its database file deleted."""
        result = subprocess.run([sys.executable, "-c", CRASHED_APP, str(db)], timeout=30)
        self.assertEqual(result.returncode, -signal.SIGKILL)
        self.assertTrue(Path(f"{db}-wal").stat().st_size > 0)
        db.unlink()


class CreateRefusesALostDatabaseTests(LostDatabaseTestCase):
    def test_a_deleted_database_with_backups_and_history_is_not_re_created(self) -> None:
        db = self.lose("prod")
        backups = self.backups("prod")
        for argv in (["prod", "--create"], ["prod", "--create", "--yes"],
                     ["prod", "--create", "--dry-run"]):
            with self.subTest(argv=argv):
                code, out, err = self.migrate(*argv)
                self.assertEqual(code, 1, out + err)
                self.assertNoTraceback(err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertIn("prod: no database at", err)
                self.assertIn("2 backup(s)", err)
                self.assertIn("audit trail", err)
                self.assertIn("restore prod", err)
                self.assertIn("--new-empty-database", err)
                self.assertFalse(db.exists())
        self.assertEqual([p.name for p in db.parent.iterdir()], [])
        self.assertEqual(self.backups("prod"), backups)

    def test_migrate_without_create_points_to_restore_not_to_create(self) -> None:
        self.lose("dev")
        code, _, err = self.migrate("dev")
        self.assertEqual(code, 1, err)
        self.assertIn("restore dev", err)
        self.assertNotIn("add --create", err)

    def test_backups_alone_are_enough_and_so_is_an_audit_trail_alone(self) -> None:
        db = self.lose("dev")
        history = self.root / "backups" / "dev" / "history.jsonl"
        history.rename(self.root / "history.jsonl")
        code, _, err = self.migrate("dev", "--create")
        self.assertEqual(code, 1, err)
        self.assertIn("backup(s)", err)
        for backup in self.backups("dev"):
            backup.unlink()
        (self.root / "history.jsonl").rename(history)
        code, _, err = self.migrate("dev", "--create")
        self.assertEqual(code, 1, err)
        self.assertIn("audit trail", err)
        self.assertNotIn("backup(s)", err)
        self.assertFalse(db.exists())

    def test_a_leftover_wal_file_beside_the_missing_database_is_refused(self) -> None:
        db = self.db("dev")
        self.crash_app(db)
        wal = Path(f"{db}-wal").read_bytes()
        result = self.run_script("database_migration.py", "migrate", "dev", "--create")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNoTraceback(result.stderr)
        self.assertIn(f"{db}-wal is beside it", result.stderr)
        self.assertIn("no verified backup to restore", result.stderr)      # restore could only fail
        self.assertIn("'database_migration.py migrate dev --new-empty-database'", result.stderr)
        self.assertFalse(db.exists())
        self.assertEqual(Path(f"{db}-wal").read_bytes(), wal)
        self.assertFalse((self.root / "backups" / "dev" / "database").exists())

    def test_runs_that_made_nothing_are_no_sign_of_a_lost_database(self) -> None:
        code, _, err = self.migrate("dev")                  # refused: recorded, nothing made
        self.assertEqual(code, 1, err)
        code, _, err = self.run_cli(safe_db_update, "backup", "dev")
        self.assertEqual(code, 1, err)
        self.write_migration("0003_broken.sql", "CREATE TABEL oops (id INTEGER);\n")
        code, _, err = self.migrate("dev", "--create")      # fails: nothing made
        self.assertEqual(code, 1, err)
        self.assertFalse(self.db("dev").exists())
        (self.migrations_dir / "0003_broken.sql").unlink()
        code, _, err = self.migrate("dev", "--create")
        self.assertEqual(code, 0, err)
        self.assertEqual(query(self.db("dev"), "SELECT MAX(version) FROM schema_migrations"), [(2,)])
        operations = [json.loads(line)["outcome"][:6] for line in
                      (self.root / "backups" / "dev" / "history.jsonl").read_text().splitlines()]
        self.assertEqual(operations, ["failed", "failed", "failed", "ok"])


class MigrateAllCreateTests(LostDatabaseTestCase):
    ini = """[DEFAULT]
busy_timeout = 2

[prod]
path = instance/prod.db
protected = yes

[dev]
path = instance/dev.db

[testing]
path = instance/testing.db
"""

    def test_migrate_all_create_makes_the_new_ones_and_refuses_the_lost_one(self) -> None:
        prod = self.lose("prod")
        self.create("dev")
        dev = sha256(self.db("dev"))
        result = self.run_script("database_migration.py", "migrate-all", "--create", "--json")
        self.assertEqual(result.returncode, 1, result.stderr)
        results = {r["name"]: r for r in json.loads(result.stdout)["instances"]}
        self.assertEqual({n: r["result"] for n, r in results.items()},
                         {"prod": "failed", "dev": "ok", "testing": "ok"})
        self.assertIs(results["prod"]["lost_database"], True)
        self.assertIn("restore prod", results["prod"]["error"])
        self.assertFalse(prod.exists())
        self.assertEqual(sha256(self.db("dev")), dev)
        self.assertEqual(query(self.db("testing"), "SELECT MAX(version) FROM schema_migrations"),
                         [(2,)])

    def test_the_text_summary_names_the_lost_database(self) -> None:
        self.lose("prod")
        code, out, err = self.run_cli(database_migration, "migrate-all", "--create")
        self.assertEqual(code, 1, err)
        self.assertIn("migrate-all: 2 ok, 1 failed, 0 skipped", out)
        self.assertIn("failed: prod (its error is above)", out)
        self.assertEqual(err.count("prod: no database at"), 1, err)          # each failure once


class NewEmptyDatabaseTests(LostDatabaseTestCase):
    def test_without_a_terminal_it_needs_yes_and_makes_nothing(self) -> None:
        db = self.lose("prod")
        result = self.run_script("database_migration.py", "migrate", "prod", "--new-empty-database")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNoTraceback(result.stderr)
        self.assertIn("add --yes", result.stderr)
        self.assertFalse(db.exists())

    def run_at_a_terminal(self, answer: str, *argv: str) -> subprocess.CompletedProcess:
        """The CLI with a real terminal (a pty) as stdin, answering the prompt."""
        main, terminal = pty.openpty()
        try:
            os.write(main, answer.encode() + b"\n")
            return subprocess.run([sys.executable, str(ROOT / "database_migration.py"),
                                   "--config", str(self.config), *argv], stdin=terminal,
                                  capture_output=True, text=True, timeout=60)
        finally:
            os.close(terminal)
            os.close(main)

    def test_at_a_terminal_a_protected_instance_needs_its_name_typed(self) -> None:
        db = self.lose("prod")
        refused = self.run_at_a_terminal("y", "migrate", "prod", "--new-empty-database")
        self.assertEqual(refused.returncode, 1, refused.stderr)
        self.assertIn("type its name", refused.stderr)
        self.assertIn("not confirmed", refused.stderr)
        self.assertFalse(db.exists())
        done = self.run_at_a_terminal("prod", "migrate", "prod", "--new-empty-database")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(query(db, "SELECT COUNT(*) FROM user"), [(0,)])

    def test_with_yes_it_makes_an_empty_database_keeps_every_backup_and_is_audited(self) -> None:
        db = self.lose("prod")
        backups = {p: sha256(p) for p in self.backups("prod")}
        result = self.run_script("database_migration.py", "migrate", "prod",
                                 "--new-empty-database", "--yes")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(query(db, "SELECT MAX(version) FROM schema_migrations"), [(2,)])
        self.assertEqual(query(db, "SELECT COUNT(*) FROM user"), [(0,)])
        self.assertEqual({p: sha256(p) for p in self.backups("prod")}, backups)
        last = json.loads((self.root / "backups" / "prod" / "history.jsonl")
                          .read_text().splitlines()[-1])
        self.assertEqual((last["operation"], last["outcome"], last["new_empty_database"]),
                         ("migrate", "ok", True))
        self.assertIn("--new-empty-database", last["command"])
        self.assertTrue(any("backup(s)" in sign for sign in last["signs"]))

    def test_a_leftover_wal_is_set_aside_and_the_new_database_is_sound(self) -> None:
        db = self.db("dev")
        self.crash_app(db)
        wal = Path(f"{db}-wal").read_bytes()
        code, _, err = self.migrate("dev", "--new-empty-database", "--yes")
        self.assertEqual(code, 0, err)
        self.assertFalse(Path(f"{db}-wal").exists())
        kept = list((self.root / "backups" / "dev" / "database").glob("dev-*-orphaned.db-wal"))
        self.assertEqual([p.read_bytes() for p in kept], [wal])
        self.assertEqual(query(db, "PRAGMA integrity_check"), [("ok",)])
        self.assertEqual(query(db, "SELECT name FROM sqlite_master WHERE name = 'note'"), [])
        self.assertEqual(query(db, "SELECT MAX(version) FROM schema_migrations"), [(2,)])

    def test_a_run_that_fails_half_way_after_yes_leaves_everything_as_it_was(self) -> None:
        db = self.lose("dev")
        Path(f"{db}-wal").write_bytes(b"a crashed application's log")
        backups = {p: sha256(p) for p in self.backups("dev")}
        self.write_migration("0003_broken.sql", "CREATE TABLE notes (id INTEGER);\n"
                                                "INSERT INTO nowhere VALUES (1);\n")
        code, _, err = self.migrate("dev", "--new-empty-database", "--yes")
        self.assertEqual(code, 1, err)
        self.assertIn("migration 3", err)
        self.assertEqual(sorted(p.name for p in db.parent.iterdir()), ["dev.db-wal"])
        self.assertEqual(Path(f"{db}-wal").read_bytes(), b"a crashed application's log")
        self.assertEqual({p: sha256(p) for p in self.backups("dev")}, backups)
        code, _, err = self.migrate("dev", "--create")          # still a lost database
        self.assertEqual(code, 1, err)
        self.assertIn("restore dev", err)

    def test_it_is_for_a_missing_file_of_one_instance_only(self) -> None:
        db = self.create("dev")
        before = sha256(db)
        code, _, err = self.migrate("dev", "--new-empty-database", "--yes")
        self.assertEqual(code, 2, err)
        self.assertIn("exists", err)
        self.assertEqual(sha256(db), before)
        code, _, err = self.run_cli(database_migration, "migrate-all", "--new-empty-database")
        self.assertEqual(code, 2, err)


if __name__ == "__main__":
    unittest.main()
