"""A migration cannot leave its transaction; when SQLite ends it, nothing runs after; an
interrupt after COMMIT is recorded as committed; read-only commands never run a Python
migration's code, and drift is still detected with Python migrations (issue 8, items 2-5).

Every failure is made for real: a real pragma, a real RLIMIT_FSIZE in a subprocess, a
real SIGINT, real files.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

from tests import test_apply
from tests.support import ROOT, database_migration, dump, query, sha256

MANY = 60_000           # payment rows: enough that a transaction's changes spill to the file


def python_migration(body: str, head: str = "") -> str:
    return f"{head}\n\ndef up(conn):\n{textwrap.indent(textwrap.dedent(body), '    ')}"


class SafetyTestCase(test_apply.ApplyTestCase):
    """The loan app at version 2 in dev, with `payments` payments."""

    payments = MANY

    def setUp(self) -> None:
        super().setUp()
        self.execute("WITH RECURSIVE n(i) AS (SELECT 3 UNION ALL SELECT i + 1 FROM n "
                     f"WHERE i < {self.payments}) INSERT INTO payment (id, loan_id, amount) "
                     "SELECT i, 1 + i % 2, i % 50 FROM n")
        self.fingerprint = query(self.path, "SELECT COUNT(*), TOTAL(amount) FROM payment")

    def script(self, *argv: str, env: dict | None = None, limit: int | None = None
               ) -> subprocess.CompletedProcess:
        """database_migration.py as a real process, optionally with RLIMIT_FSIZE."""
        def small_files() -> None:      # Python ignores SIGXFSZ: a write past it fails (EFBIG)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return subprocess.run([sys.executable, str(ROOT / "database_migration.py"), "--config",
                               str(self.config), *argv], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                              cwd=self.root, timeout=60,
                              preexec_fn=small_files if limit else None)

    def history(self, name: str = "dev") -> list[dict]:
        path = self.root / "backups" / name / "history.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def assertUnchanged(self, before: list[str], where: str = "") -> None:
        self.assertEqual(query(self.path, "PRAGMA integrity_check"), [("ok",)], where)
        self.assertEqual(self.versions(), [1, 2], where)
        self.assertEqual(query(self.path, "SELECT COUNT(*), TOTAL(amount) FROM payment"),
                         self.fingerprint, where)
        self.assertEqual(dump(self.path), before, where)

    def assertOneLine(self, result: subprocess.CompletedProcess, code: int, *words: str) -> None:
        self.assertEqual(result.returncode, code, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        for word in words:
            self.assertIn(word, result.stderr)


# --- Item 2: a migration cannot leave its transaction ------------------------

class JournalOffTests(SafetyTestCase):

    def test_a_migration_that_switches_the_journal_off_is_refused_before_the_database_is_opened(self):
        for mode in ("OFF", "MEMORY"):
            with self.subTest(journal_mode=mode):
                path = self.add(3, f"PRAGMA journal_mode={mode};\n"
                                   "UPDATE payment SET amount = amount + 1;\n"
                                   "INSERT INTO no_such_table (x) VALUES (1);")
                before = sha256(self.path)
                result = self.script("migrate", "dev", "--yes")
                self.assertOneLine(result, 2, path.name, f"PRAGMA journal_mode={mode}",
                                   "weaken the run's transaction")
                self.assertEqual(sha256(self.path), before)
                self.assertEqual(self.backups(), [])
                path.unlink()

    def test_a_python_migration_cannot_switch_the_journal_off_even_if_it_swallows_the_refusal(self):
        for mode in ("OFF", "MEMORY"):
            with self.subTest(journal_mode=mode):
                self.add(3, python_migration(f"""
                    try:
                        conn.execute("PRAGMA journal_mode = {mode}")
                    except Exception:
                        pass
                    conn.execute("UPDATE payment SET amount = amount + 1")
                    conn.execute("INSERT INTO no_such_table (x) VALUES (1)")
                """), suffix="py")
                database_migration._python_modules.clear()
                before = dump(self.path)
                result = self.script("migrate", "dev", "--yes")
                self.assertOneLine(result, 1, "migration 3", "weaken the run's transaction",
                                   "rolled back, nothing changed")
                self.assertUnchanged(before, mode)
                self.assertEqual(query(self.path, "PRAGMA journal_mode"), [("delete",)])

class EscapeTests(SafetyTestCase):
    payments = 10

    def test_each_escape_is_refused_at_load_time_with_its_own_message(self) -> None:
        cases = (("ATTACH DATABASE 'other.db' AS other", "reach another database file"),
                 ("DETACH DATABASE other", "reach another database file"),
                 ("VACUUM INTO 'copy.db'", "VACUUM INTO writes the database to another file"),
                 ("SELECT load_extension('evil')", "load_extension loads native code"),
                 ("PRAGMA main.locking_mode = EXCLUSIVE", "weaken the run's transaction"),
                 ("PRAGMA synchronous = OFF", "weaken the run's transaction"),
                 ("PRAGMA writable_schema = ON", "weaken the run's transaction"),
                 ("PRAGMA wal_checkpoint(TRUNCATE)", "weaken the run's transaction"),
                 ("COMMIT", "begin or end a transaction"),
                 ("VACUUM", "cannot run inside the run's transaction"))
        for statement, words in cases:
            with self.subTest(statement=statement):
                path = self.add(3, f"CREATE TABLE audit (id INTEGER);\n{statement};")
                before = self.files()
                code, out, err = self.migrate("dev", "--yes")
                self.assertEqual(code, 2, out + err)
                for word in (path.name, statement[:30], words):
                    self.assertIn(word, err)
                self.assertNoTraceback(err)
                self.assertEqual(self.files(), before, "no database opened, nothing written")
                path.unlink()

    def test_the_authorizer_refuses_the_same_statements_from_a_python_migration(self) -> None:
        cases = (("ATTACH DATABASE 'other.db' AS other", "reach another database file"),
                 ("VACUUM INTO 'copy.db'", "VACUUM INTO writes the database to another file"),
                 ("SELECT load_extension('evil')", "load_extension loads native code"),
                 ("PRAGMA locking_mode = EXCLUSIVE", "weaken the run's transaction"),
                 ("PRAGMA schema_version = 1", "weaken the run's transaction"),
                 ("COMMIT", "begin or end a transaction"))
        for statement, words in cases:
            with self.subTest(statement=statement):
                self.add(3, python_migration(f"""
                    conn.execute("DELETE FROM payment WHERE id = 1")
                    conn.execute({statement!r})
                """), suffix="py")
                database_migration._python_modules.clear()
                self.assertFailedAndRolledBack("--yes", words=("migration 3", words))
        self.assertFalse((self.root / "other.db").exists())
        self.assertFalse((self.root / "copy.db").exists())

    def test_the_authorizer_refuses_what_the_text_does_not_show(self) -> None:
        # Through the raw connection behind conn (a cursor no longer leads to it: a private
        # attribute does), with extension loading switched on: only the authorizer stands
        # in the way.
        self.add(3, python_migration("""
            raw = conn._conn
            raw.execute("DELETE FROM payment WHERE id = 1")
            for sql in ("PRAGMA journal_mode = OFF", "ATTACH DATABASE 'other.db' AS other",
                        "SELECT load_extension('evil')", "COMMIT"):
                try:
                    raw.execute(sql)
                except sqlite3.DatabaseError as exc:
                    assert "not authorized" in str(exc), (sql, exc)
                else:
                    raise AssertionError(sql + " ran")
            if hasattr(raw, "enable_load_extension"):   # not in every Python build
                raw.enable_load_extension(True)
                raw.execute("SELECT load_extension('evil')")
            raw.execute("PRAGMA journal_mode = OFF")
        """, head="import sqlite3"), suffix="py")
        before = dump(self.path)
        result = self.script("migrate", "dev", "--yes")
        self.assertOneLine(result, 1, "migration 3", "not allowed in a migration")
        self.assertUnchanged(before)
        self.assertFalse((self.root / "other.db").exists())

    def test_harmless_pragmas_are_allowed(self) -> None:
        self.add(3, "PRAGMA foreign_keys = OFF;\nPRAGMA defer_foreign_keys = ON;\n"
                    "PRAGMA legacy_alter_table = ON;\nPRAGMA table_info(loan);\n"
                    "PRAGMA foreign_key_list(loan);\nPRAGMA journal_mode;\nPRAGMA user_version = 7;\n"
                    "ALTER TABLE loan ADD COLUMN status TEXT;\nPRAGMA foreign_keys = ON;")
        code, _, err = self.migrate("dev")
        self.assertEqual(code, 0, err)
        self.assertEqual(query(self.path, "PRAGMA user_version"), [(7,)])
        self.assertEqual(query(self.path, "PRAGMA journal_mode"), [("delete",)])


# --- Item 3: nothing runs once the transaction is gone -----------------------

SWALLOWS_DISK_FULL = python_migration("""
    global CURSOR
    CURSOR = conn.execute("CREATE TABLE bulk (x BLOB)")
    try:                # far more than the file may grow: SQLite rolls the run back
        conn.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                     "WHERE i < 20000) INSERT INTO bulk SELECT randomblob(1000) FROM n")
    except sqlite3.Error:
        pass            # and goes on, as if nothing happened
    for sql in ("UPDATE user SET name = 'changed after the rollback' WHERE id = 1",
                "DELETE FROM payment WHERE id > 10"):
        try:
            conn.execute(sql)
        except Exception:
            pass
    try:                # a cursor's own execute() does not go through conn
        CURSOR.execute("DELETE FROM loan")
    except Exception:
        pass
""", head="import sqlite3")


class TransactionGoneTests(SafetyTestCase):
    payments = 10

    def test_a_python_migration_that_swallows_a_disk_full_error_cannot_change_anything(self):
        self.add(3, SWALLOWS_DISK_FULL, suffix="py")
        before = dump(self.path)
        limit = self.path.stat().st_size + 16 * 1024    # the backup fits; the migration cannot
        result = self.script("migrate", "dev", "--yes", limit=limit)
        self.assertOneLine(result, 1, "migration 3", "transaction has ended",
                           "rolled back, nothing changed")
        self.assertUnchanged(before)
        self.assertTrue(self.history()[-1]["outcome"].startswith("failed"))

    def test_sys_exit_in_a_migration_fails_the_run_with_nothing_applied(self) -> None:
        for call in ("sys.exit()", "sys.exit(0)", "sys.exit(3)"):
            with self.subTest(call=call):
                self.add(3, python_migration(f"conn.execute('DELETE FROM payment')\n{call}",
                                             head="import sys"), suffix="py")
                before = dump(self.path)
                result = self.script("migrate", "dev", "--yes")
                self.assertOneLine(result, 1, "migration 3", "sys.exit", "nothing changed")
                self.assertUnchanged(before, call)
                last = self.history()[-1]
                self.assertEqual((last["version_after"], last["outcome"][:7]), (2, "failed:"))

    def test_a_keyboard_interrupt_in_a_migration_exits_130_with_nothing_applied(self) -> None:
        self.add(3, python_migration("""
            conn.execute("DELETE FROM payment")
            os.kill(os.getpid(), signal.SIGINT)     # a real Ctrl-C, mid-migration
            time.sleep(30)
        """, head="import os, signal, time"), suffix="py")
        before = dump(self.path)
        result = self.script("migrate", "dev", "--yes")
        self.assertEqual(result.returncode, 130, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertUnchanged(before)
        self.assertEqual(self.history()[-1]["outcome"], "failed: interrupted (Ctrl-C or SIGINT)")


# --- Item 5: Ctrl-C right after COMMIT ---------------------------------------

class InterruptAfterCommitTests(SafetyTestCase):
    payments = 10
    HOOK = {"DB_MIGRATION_TEST_SIGINT_AFTER_COMMIT": "1"}   # a real SIGINT just after COMMIT

    def assertCommittedAndSaid(self, result: subprocess.CompletedProcess, operation: str,
                               before, after) -> None:
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn("interrupted after COMMIT", result.stderr)
        self.assertIn("committed", result.stderr)
        last = self.history()[-1]
        self.assertEqual((last["operation"], last["outcome"], last.get("version_before"),
                          last.get("version_after")), (operation, "ok", before, after))   # absent: none

    def test_an_interrupt_after_commit_is_recorded_as_committed_and_exits_0(self) -> None:
        self.add(3, "ALTER TABLE loan ADD COLUMN status TEXT;")
        result = self.script("migrate", "dev", env=self.HOOK)
        self.assertCommittedAndSaid(result, "migrate", 2, 3)
        self.assertEqual(self.versions(), [1, 2, 3])
        self.assertEqual(self.history()[-1]["interrupted"], "after commit")

    def test_the_same_holds_for_rollback_and_for_a_new_database(self) -> None:
        result = self.script("rollback", "dev", "--to", "1", "--yes", env=self.HOOK)
        self.assertCommittedAndSaid(result, "rollback", 2, 1)
        self.assertEqual(self.versions(), [1])
        self.path.unlink()
        shutil.rmtree(self.root / "backups")      # a database that never was, not a lost one
        result = self.script("migrate", "dev", "--create", env=self.HOOK)
        self.assertCommittedAndSaid(result, "migrate", None, 2)
        self.assertEqual(self.versions(), [1, 2])

    def test_without_an_interrupt_nothing_changes_in_what_is_said(self) -> None:
        self.add(3, "ALTER TABLE loan ADD COLUMN status TEXT;")
        result = self.script("migrate", "dev")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertNotIn("interrupted", self.history()[-1])


# --- Item 4: read-only commands never run a Python migration's code ----------

RECORDS = Path("backups") / "dev" / "python-schema"


class ReadOnlyTests(SafetyTestCase):
    """A Python migration whose top level and up() each leave a marker file."""

    payments = 10

    def setUp(self) -> None:
        super().setUp()
        self.marks = self.root / "marks"
        self.marks.mkdir()
        self.add(3, python_migration(f"""
            (MARKS / ("up-" + str(os.getpid()))).write_text(
                conn.execute("PRAGMA database_list").fetchone()[2])
            conn.execute("ALTER TABLE loan ADD COLUMN status TEXT")
            conn.execute("CREATE INDEX loan_status ON loan (status)")
            conn.execute("CREATE VIEW open_loan AS SELECT * FROM loan WHERE status = 'open'")
            conn.execute("CREATE TRIGGER loan_opened AFTER INSERT ON loan "
                         "BEGIN UPDATE loan SET status = 'open' WHERE id = new.id; END")
            conn.execute("UPDATE loan SET status = 'open'")
        """, head=f"import os\nfrom pathlib import Path\nMARKS = Path({str(self.marks)!r})\n"
                  f"(MARKS / ('import-' + str(os.getpid()))).write_text('imported')"), suffix="py")
        self.add(4, "CREATE TABLE note (id INTEGER PRIMARY KEY, text TEXT);")
        database_migration._python_modules.clear()

    def runs(self) -> list[str]:
        return sorted(p.read_text() for p in self.marks.iterdir() if p.name.startswith("up-"))

    def imports(self) -> int:
        return sum(p.name.startswith("import-") for p in self.marks.iterdir())

    def test_read_only_commands_never_import_or_run_a_python_migration(self) -> None:
        result = self.script("migrate", "dev", "--dry-run")
        self.assertEqual(result.returncode, 0, result.stderr)
        [rehearsed] = self.runs()
        self.assertNotEqual(Path(rehearsed).resolve(), self.path.resolve(), "only on the copy")
        self.assertFalse((self.root / RECORDS).exists(), "a dry run keeps no record")
        self.assertEqual(self.script("migrate", "dev").returncode, 0)
        self.assertEqual(self.runs(), sorted([rehearsed, str(self.path.resolve())]))
        seen = (len(self.runs()), self.imports())
        (self.root / "instances.ini").write_text(self.ini + "\n[other]\npath = instance/dev.db\n",
                                                 encoding="utf-8")
        for argv in (("status",), ("check", "dev"), ("diff", "dev", "other"), ("history", "dev")):
            with self.subTest(argv=argv):
                result = self.script(*argv)
                self.assertNotIn("Traceback", result.stderr)
                self.assertEqual((len(self.runs()), self.imports()), seen, argv)
        for argv in (("info", "dev"), ("list-backups", "dev"), ("verify", "dev"), ("check", "dev")):
            with self.subTest(argv=argv):
                result = self.run_script("safe_db_update.py", *argv)
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertEqual((len(self.runs()), self.imports()), seen, argv)

    def test_drift_is_detected_on_an_instance_with_a_python_migration(self) -> None:
        self.assertEqual(self.script("migrate", "dev").returncode, 0)
        seen = self.imports()
        code, out, err = self.run_cli(database_migration, "check", "dev", "--json")
        self.assertEqual(code, 0, out + err)
        self.assertEqual((json.loads(out)["drift_checked"], json.loads(out)["state"]),
                         (True, "up to date"))
        self.execute("CREATE INDEX ix_hand ON loan (amount)",
                     "ALTER TABLE loan ADD COLUMN by_hand TEXT")
        result = self.script("check", "dev")
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertIn("drift: index ix_hand: only in the database", result.stdout)
        self.assertIn("drift: column loan.by_hand: only in the database", result.stdout)
        status = json.loads(self.script("status", "--json").stdout)["instances"]
        self.assertEqual([i["state"] for i in status if i["name"] == "dev"], ["drift"])
        self.assertEqual(self.imports(), seen)

    def test_the_record_is_private_and_never_written_through_a_symbolic_link(self) -> None:
        folder = self.root / RECORDS
        folder.mkdir(parents=True)
        outside = self.root / "outside.txt"
        outside.write_text("keep me")
        (folder / "3.json").symlink_to(outside)
        self.assertEqual(self.script("migrate", "dev").returncode, 0)
        record = folder / "3.json"
        self.assertFalse(record.is_symlink())
        self.assertEqual(outside.read_text(), "keep me")
        self.assertEqual((record.stat().st_mode & 0o777, folder.stat().st_mode & 0o777),
                         (0o600, 0o700))
        self.assertEqual(json.loads(record.read_text())["versions"], [1, 2, 3])

    def test_without_a_record_check_says_drift_was_not_checked(self) -> None:
        self.assertEqual(self.script("migrate", "dev").returncode, 0)
        for record in (self.root / RECORDS).iterdir():
            record.unlink()
        self.execute("CREATE INDEX ix_hand ON loan (amount)")
        result = self.script("check", "dev")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("drift: not checked: migration 3 is a Python migration with no schema "
                      "record", result.stdout)
        code, out, _ = self.run_cli(database_migration, "check", "dev", "--json")
        self.assertEqual(json.loads(out)["drift_checked"], False)
        self.assertEqual(self.imports(), 1, "the migrate run only")

    def test_baseline_does_not_run_a_python_migration_to_compare_schemas(self) -> None:
        self.assertEqual(self.script("migrate", "dev").returncode, 0)
        seen = (len(self.runs()), self.imports())
        prod = self.db("prod")
        shutil.copy(self.path, prod)
        self.execute("DROP TABLE schema_migrations", path=prod)
        result = self.script("baseline", "prod", "--to", "3")
        self.assertOneLine(result, 1, "schema not compared: migration 3 is a Python migration",
                           "--force")
        self.assertEqual(self.script("baseline", "prod", "--to", "3", "--force").returncode, 0)
        self.assertEqual(self.versions(prod), [1, 2, 3])
        self.assertEqual((len(self.runs()), self.imports()), seen)

    def test_a_later_sql_migration_is_checked_on_top_of_the_record(self) -> None:
        self.assertEqual(self.script("migrate", "dev", "--to", "3").returncode, 0)
        self.assertEqual(self.script("migrate", "dev").returncode, 0)
        self.assertEqual(self.script("check", "dev").returncode, 0)
        self.execute("DROP TABLE note", "CREATE TABLE note (id INTEGER PRIMARY KEY)")
        result = self.script("check", "dev")
        self.assertEqual(result.returncode, 1)
        self.assertIn("drift: column note.text: only in the migrations", result.stdout)


if __name__ == "__main__":
    import unittest
    unittest.main()
