"""migrate and migrate-all: one transaction, refusals, dry run, backups, guards, Python migrations."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sqlite3
import time
import unittest
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

from tests.support import INI, ProjectTestCase, database_migration, dump, query, sha256


class ApplyTestCase(ProjectTestCase):
    """The loan app at version 2 with rows in dev, and helpers to add and run migrations."""

    def setUp(self) -> None:
        super().setUp()
        self.path = self.create()

    def add(self, version: int, sql: str, suffix: str = "sql") -> Path:
        return self.write_migration(f"{version:04d}_step_{version}.{suffix}", sql)

    def versions(self, path: Path | None = None) -> list[int]:
        return [v for (v,) in query(path or self.path, "SELECT version FROM schema_migrations ORDER BY version")]

    def count(self, table: str, path: Path | None = None) -> int:
        return query(path or self.path, f"SELECT COUNT(*) FROM {table}")[0][0]

    def columns(self, table: str, path: Path | None = None) -> list[str]:
        return [row[1] for row in query(path or self.path, f"PRAGMA table_info({table})")]

    def files(self, audit_trail: bool = True) -> dict[str, str]:
        """Every file and folder in the project with its contents' hash; or, without the
        audit trail (where even a refused migrate is recorded), every other file."""
        return {str(p.relative_to(self.root)): (sha256(p) if p.is_file() else "folder")
                for p in sorted(self.root.rglob("*"))
                if audit_trail or (p.is_file() and p.name != "history.jsonl")}

    def execute(self, *statements: str, path: Path | None = None) -> None:
        with closing(sqlite3.connect(path or self.path)) as conn:
            for statement in statements:
                conn.execute(statement)
            conn.commit()

    def migrate_json(self, *argv: str) -> tuple[int, dict, str]:
        code, out, err = self.migrate("dev", "--json", *argv)
        return code, json.loads(out) if out else {}, err

    def migrate_fails(self, argv: tuple[str, ...], words: tuple[str, ...]) -> str:
        """migrate dev exits 1 in one clean message holding every word; returns stderr."""
        code, out, err = self.migrate("dev", *argv)
        self.assertEqual(code, 1, out + err)
        self.assertNoTraceback(err)
        for word in words:
            self.assertIn(word, err)
        return err

    def assertRefusedUnchanged(self, *argv: str, words: tuple[str, ...] = ()) -> str:
        """migrate exits 1, the database keeps every byte, and no backup is taken."""
        before, backups = sha256(self.path), self.backups()
        err = self.migrate_fails(argv, words)
        self.assertEqual(sha256(self.path), before)
        self.assertEqual(self.backups(), backups)
        return err

    def assertFailedAndRolledBack(self, *argv: str, words: tuple[str, ...] = ()) -> str:
        """migrate exits 1 after its backup; schema and rows exactly as before."""
        before, backups = dump(self.path), len(self.backups())
        err = self.migrate_fails(argv, words)
        self.assertEqual(dump(self.path), before)
        self.assertEqual(len(self.backups()), backups + 1)
        self.assertEqual(query(self.path, "PRAGMA integrity_check"), [("ok",)])
        return err


class FailureRollsBackTests(ApplyTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.add(3, "ALTER TABLE loan ADD COLUMN status TEXT;")
        self.add(4, "INSERT INTO user (id, email, name) VALUES (3, 'c@x', 'Cy');")
        self.add(5, "UPDATE loan SET status = 'open' WHERE id = 1;\n"
                    "INSERT INTO no_such_table (x) VALUES (1);")
        self.add(6, "CREATE TABLE note (id INTEGER PRIMARY KEY);")
        self.add(7, "CREATE INDEX loan_status ON loan (status);")

    def test_a_failing_third_of_five_migrations_leaves_schema_and_rows_as_before(self) -> None:
        self.assertFailedAndRolledBack()
        self.assertEqual(self.versions(), [1, 2])
        self.assertNotIn("status", self.columns("loan"))

    def test_the_error_names_the_version_the_statement_and_the_backup(self) -> None:
        err = self.assertFailedAndRolledBack()
        [backup] = self.backups()
        self.assertIn("migration 5", err)
        self.assertIn("INSERT INTO no_such_table (x) VALUES (1)", err)
        self.assertIn("no such table", err)
        self.assertIn(str(backup), err)

    def test_the_pre_migrate_backup_holds_the_old_contents(self) -> None:
        self.assertFailedAndRolledBack()
        [backup] = self.backups()
        self.assertIn("pre-migrate", backup.name)
        self.assertEqual(self.versions(backup), [1, 2])
        self.assertEqual(query(backup, "SELECT id, email FROM user ORDER BY id"), [(1, "a@x"), (2, "b@x")])
        self.assertEqual(dump(backup), dump(self.path))

    def test_the_same_run_succeeds_once_the_migration_is_fixed(self) -> None:
        self.assertFailedAndRolledBack()
        self.add(5, "UPDATE loan SET status = 'open' WHERE id = 1;")
        code, _, err = self.migrate("dev")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.versions(), [1, 2, 3, 4, 5, 6, 7])
        self.assertEqual(query(self.path, "SELECT id, status FROM loan ORDER BY id"), [(1, "open"), (2, None)])


class DryRunTests(ApplyTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.add(3, "ALTER TABLE loan ADD COLUMN status TEXT;\nDELETE FROM payment WHERE id = 2;")

    def test_a_dry_run_changes_no_byte_or_modification_time_and_creates_no_file(self) -> None:
        files, stat = self.files(), os.stat(self.path)
        code, out, err = self.migrate("dev", "--dry-run")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.files(), files)
        self.assertEqual(os.stat(self.path).st_mtime_ns, stat.st_mtime_ns)
        self.assertEqual(self.backups(), [])
        self.assertEqual(self.versions(), [1, 2])

    def test_a_dry_run_of_an_idle_wal_database_leaves_no_file_beside_it(self) -> None:
        with closing(sqlite3.connect(self.path)) as conn:
            conn.execute("PRAGMA journal_mode = WAL")
        files, stat = self.files(), os.stat(self.path)
        code, _, err = self.migrate("dev", "--dry-run")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.files(), files)
        self.assertEqual(os.stat(self.path).st_mtime_ns, stat.st_mtime_ns)

    def test_the_plan_shows_every_statement_with_destructive_ones_marked(self) -> None:
        code, out, _ = self.migrate("dev", "--dry-run")
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertIn("0003 step 3", out)
        [alter] = [line for line in lines if "ALTER TABLE loan ADD COLUMN status TEXT" in line]
        [delete] = [line for line in lines if "DELETE FROM payment WHERE id = 2" in line]
        self.assertIn("!", delete)
        self.assertNotIn("!", alter)

    def test_the_rehearsal_reports_columns_added_and_row_counts_changed(self) -> None:
        _, out, _ = self.migrate("dev", "--dry-run")
        self.assertIn("loan.status", out)
        self.assertIn("payment: 2 -> 1", out)

    def test_a_dry_run_needs_no_confirmation_for_destructive_statements(self) -> None:
        code, _, err = self.migrate("dev", "--dry-run")
        self.assertEqual((code, err), (0, ""))

    def test_the_json_dry_run_says_what_would_be_applied(self) -> None:
        code, data, err = self.migrate_json("--dry-run")
        self.assertEqual(code, 0, err)
        self.assertIs(data["dry_run"], True)
        self.assertEqual((data["from_version"], data["to_version"], data["applied"]), (2, 3, [3]))
        self.assertIsNone(data["backup"])
        self.assertIs(data["rehearsal"]["ok"], True)
        self.assertIn("loan.status", data["rehearsal"]["columns_added"])
        self.assertEqual(self.versions(), [1, 2])

    def test_a_dry_run_with_create_makes_no_database_and_no_file(self) -> None:
        files = self.files()
        code, out, err = self.migrate("prod", "--dry-run", "--create", "--json")
        self.assertEqual(code, 0, err)
        data = json.loads(out)
        self.assertEqual((data["from_version"], data["applied"]), (0, [1, 2, 3]))
        self.assertEqual(self.files(), files)
        self.assertFalse(self.db("prod").exists())

    def test_a_failing_rehearsal_exits_1_and_changes_nothing(self) -> None:
        self.add(4, "INSERT INTO no_such_table (x) VALUES (1);")
        files, mtime = self.files(), os.stat(self.path).st_mtime_ns
        code, out, err = self.migrate("dev", "--dry-run")
        self.assertEqual(code, 1, out + err)
        self.assertIn("FAILED", out)
        self.assertIn("no_such_table", out)
        self.assertEqual(self.files(), files)
        self.assertEqual(os.stat(self.path).st_mtime_ns, mtime)

    def test_a_failing_json_rehearsal_reports_the_error(self) -> None:
        self.add(4, "INSERT INTO no_such_table (x) VALUES (1);")
        code, data, _ = self.migrate_json("--dry-run")
        self.assertEqual(code, 1)
        self.assertIs(data["rehearsal"]["ok"], False)
        self.assertIn("migration 4", data["rehearsal"]["error"])


class DestructiveConfirmationTests(ApplyTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.add(3, "DELETE FROM payment WHERE id = 2;\nDROP TABLE IF EXISTS old_payment;")

    def test_destructive_statements_without_a_terminal_or_yes_are_refused_before_any_backup(self) -> None:
        before = self.files(audit_trail=False)
        err = self.assertRefusedUnchanged(words=("--yes", "DELETE FROM payment WHERE id = 2"))
        self.assertIn("DROP TABLE", err)
        self.assertEqual(self.files(audit_trail=False), before)

    def test_yes_applies_destructive_statements_after_a_backup(self) -> None:
        code, _, err = self.migrate("dev", "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.versions(), [1, 2, 3])
        self.assertEqual(self.count("payment"), 1)
        [backup] = self.backups()
        self.assertEqual(self.count("payment", backup), 2)


class RefusalTests(ApplyTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.add(3, "ALTER TABLE loan ADD COLUMN status TEXT;")

    def status_of(self, name: str = "dev") -> str:
        code, out, err = self.run_cli(database_migration, "status", "--json")
        self.assertEqual(code, 0, err)
        return {i["name"]: i["state"] for i in json.loads(out)["instances"]}[name]

    def edit_applied_migration(self) -> None:
        path = self.migrations_dir / "0002_add_reset_fields.sql"
        path.write_text(path.read_text().replace("VARCHAR(100)", "VARCHAR(200)"))

    def test_an_applied_migration_edited_afterwards_is_refused(self) -> None:
        self.edit_applied_migration()
        self.assertRefusedUnchanged(words=("migration 2", "nothing changed"))

    def test_check_reports_an_edited_migration_and_exits_1(self) -> None:
        self.edit_applied_migration()
        code, out, err = self.run_cli(database_migration, "check", "dev", "--json")
        self.assertEqual(code, 1, err)
        data = json.loads(out)
        self.assertEqual({a["version"]: a["checksum_ok"] for a in data["applied"]}, {1: True, 2: False})
        self.assertTrue(any("migration 2" in p for p in data["problems"]), data["problems"])
        self.assertIs(data["consistent"], False)

    def test_status_says_modified_for_an_edited_migration(self) -> None:
        self.edit_applied_migration()
        self.assertEqual(self.status_of(), "modified")

    def test_a_database_holding_an_unknown_version_is_refused(self) -> None:
        self.execute("INSERT INTO schema_migrations (version, description) VALUES (99, 'from the future')")
        self.assertRefusedUnchanged(words=("99",))
        self.assertEqual(self.status_of(), "ahead")

    def test_a_file_that_is_not_a_database_is_refused(self) -> None:
        self.path.write_bytes(b"this is not a database, it is a note" * 200)
        self.assertRefusedUnchanged(words=("not an SQLite database",))

    def test_a_missing_database_without_create_is_refused_and_nothing_is_created(self) -> None:
        before = self.files(audit_trail=False)
        code, _, err = self.migrate("prod")
        self.assertEqual(code, 1)
        self.assertIn("--create", err)
        self.assertNoTraceback(err)
        self.assertEqual(self.files(audit_trail=False), before)
        self.assertFalse(self.db("prod").exists())


class LegacyTrackingTableTests(ApplyTestCase):
    """A database migrated by the previous in-house script: three columns, no checksums."""

    def setUp(self) -> None:
        super().setUp()
        self.execute("DROP TABLE schema_migrations",
                     "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
                     "description TEXT NOT NULL, applied_at DATETIME DEFAULT CURRENT_TIMESTAMP)",
                     "INSERT INTO schema_migrations VALUES (1, 'Create tables', '2024-01-02 03:04:05'), "
                     "(2, 'Add reset fields', '2024-02-03 04:05:06')")

    def test_status_and_check_accept_the_legacy_table(self) -> None:
        code, out, err = self.run_cli(database_migration, "status", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["instances"][0]["state"], "up to date")
        code, out, err = self.run_cli(database_migration, "check", "dev", "--json")
        self.assertEqual(code, 0, out + err)
        self.assertTrue(all(a["checksum_ok"] for a in json.loads(out)["applied"]))

    def test_a_no_op_migrate_changes_no_byte(self) -> None:
        before = sha256(self.path)
        code, out, err = self.migrate("dev")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(sha256(self.path), before)
        self.assertEqual(self.columns("schema_migrations"), ["version", "description", "applied_at"])

    def test_migrate_upgrades_the_table_in_place_keeping_every_row(self) -> None:
        self.add(3, "ALTER TABLE loan ADD COLUMN status TEXT;")
        code, _, err = self.migrate("dev")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.columns("schema_migrations"),
                         ["version", "description", "applied_at", "checksum", "execution_ms"])
        self.assertEqual(query(self.path, "SELECT version, description, applied_at FROM schema_migrations "
                                          "WHERE version < 3 ORDER BY version"),
                         [(1, "Create tables", "2024-01-02 03:04:05"),
                          (2, "Add reset fields", "2024-02-03 04:05:06")])
        known = {m.version: m.checksum for m in database_migration.all_migrations(self.instance())}
        self.assertEqual(dict(query(self.path, "SELECT version, checksum FROM schema_migrations")), known)


class NothingPendingTests(ApplyTestCase):
    def test_nothing_pending_exits_0_without_a_backup_or_a_changed_byte(self) -> None:
        before = sha256(self.path)
        code, out, err = self.migrate("dev")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("nothing to do", out)
        self.assertEqual(self.backups(), [])
        self.assertEqual(sha256(self.path), before)

    def test_the_json_result_of_a_no_op_has_nothing_applied_and_no_backup(self) -> None:
        code, data, err = self.migrate_json()
        self.assertEqual(code, 0, err)
        self.assertEqual((data["from_version"], data["to_version"], data["applied"]), (2, 2, []))
        self.assertIsNone(data["backup"])


class PlanTests(ApplyTestCase):
    def setUp(self) -> None:
        super().setUp()
        for version in (3, 4, 5):
            self.add(version, f"CREATE TABLE t{version} (id INTEGER PRIMARY KEY);")

    def test_to_applies_only_up_to_the_version_given(self) -> None:
        code, data, err = self.migrate_json("--to", "4")
        self.assertEqual(code, 0, err)
        self.assertEqual((data["from_version"], data["to_version"], data["applied"]), (2, 4, [3, 4]))
        self.assertEqual(self.versions(), [1, 2, 3, 4])

    def test_to_a_version_that_does_not_exist_is_a_usage_error(self) -> None:
        before = self.files(audit_trail=False)
        code, _, err = self.migrate("dev", "--to", "9")
        self.assertEqual(code, 2)
        self.assertIn("--to 9", err)
        self.assertNoTraceback(err)
        self.assertEqual(self.files(audit_trail=False), before)

    def test_to_below_the_current_version_points_to_rollback(self) -> None:
        self.assertRefusedUnchanged("--to", "1", words=("rollback dev --to 1",))

    def test_the_json_result_names_the_backup(self) -> None:
        code, data, err = self.migrate_json()
        self.assertEqual(code, 0, err)
        [backup] = self.backups()
        self.assertEqual(data["backup"], str(backup))
        self.assertTrue(Path(data["backup"]).is_absolute())
        self.assertIs(data["dry_run"], False)


class CreateTests(ProjectTestCase):
    ini = INI + "\n[nested]\npath = data/deep/nested.db\n"

    def test_create_makes_parent_folders_and_takes_no_backup(self) -> None:
        code, out, err = self.migrate("nested", "--create", "--json")
        self.assertEqual(code, 0, err)
        data = json.loads(out)
        self.assertEqual((data["from_version"], data["to_version"], data["applied"]), (0, 2, [1, 2]))
        self.assertIsNone(data["backup"])
        db = self.root / "data" / "deep" / "nested.db"
        self.assertEqual(query(db, "SELECT version FROM schema_migrations ORDER BY version"), [(1,), (2,)])
        self.assertEqual(self.backups("nested"), [])

    def test_a_failed_create_leaves_no_database_file_behind(self) -> None:
        self.write_migration("0003_broken.sql", "CREATE TABLE broken (;")
        code, _, err = self.migrate("nested", "--create")
        self.assertEqual(code, 1)
        self.assertIn("migration 3", err)
        self.assertEqual(list((self.root / "data" / "deep").iterdir()), [])
        code, _, err = self.migrate("nested")
        self.assertEqual(code, 1)
        self.assertIn("--create", err)

    def test_without_create_a_missing_database_is_refused_and_no_folder_is_made(self) -> None:
        code, _, err = self.migrate("nested")
        self.assertEqual(code, 1)
        self.assertIn("--create", err)
        self.assertFalse((self.root / "data").exists())
        self.assertEqual(self.backups("nested"), [])


class ForeignKeyTests(ApplyTestCase):
    REBUILD_USER = """
        CREATE TABLE new_user (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
                               reset_token VARCHAR(100), reset_token_expires DATETIME,
                               active INTEGER NOT NULL DEFAULT 1);
        INSERT INTO new_user (id, email, name, reset_token, reset_token_expires)
            SELECT id, email, name, reset_token, reset_token_expires FROM user;
        DROP TABLE user;
        ALTER TABLE new_user RENAME TO user;
    """

    def test_rebuilding_a_parent_table_keeps_every_cascading_child_row(self) -> None:
        self.add(3, self.REBUILD_USER)
        code, _, err = self.migrate("dev", "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual((self.count("user"), self.count("loan"), self.count("payment")), (2, 2, 2))
        self.assertIn("active", self.columns("user"))
        self.assertEqual(query(self.path, "PRAGMA foreign_key_check"), [])

    def test_the_rebuilt_parent_still_cascades_afterwards(self) -> None:
        self.add(3, self.REBUILD_USER)
        self.assertEqual(self.migrate("dev", "--yes")[0], 0)
        with closing(sqlite3.connect(self.path)) as conn:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("DELETE FROM user WHERE id = 1")
            conn.commit()
        self.assertEqual(query(self.path, "SELECT user_id FROM loan"), [(2,)])

    def test_an_orphan_row_fails_the_foreign_key_check_and_rolls_back_everything(self) -> None:
        self.add(3, "ALTER TABLE loan ADD COLUMN status TEXT;")
        self.add(4, "INSERT INTO loan (id, user_id, amount) VALUES (3, 99, 5);")
        err = self.assertFailedAndRolledBack(words=("foreign key",))
        self.assertIn("loan", err)
        self.assertEqual(self.versions(), [1, 2])


class LostRowGuardTests(ApplyTestCase):
    def test_a_rebuild_that_drops_rows_without_a_destructive_statement_is_rolled_back(self) -> None:
        self.add(3, """
            ALTER TABLE payment RENAME TO payment_old;
            CREATE TABLE payment (id INTEGER PRIMARY KEY,
                                  loan_id INTEGER NOT NULL REFERENCES loan (id) ON DELETE CASCADE,
                                  amount NUMERIC NOT NULL);
            INSERT INTO payment SELECT * FROM payment_old WHERE amount > 15;
        """)
        err = self.assertFailedAndRolledBack(words=("lost-row guard", "table payment"))
        self.assertIn(str(self.backups()[0]), err)
        self.assertEqual(self.versions(), [1, 2])

    def test_rows_collapsed_by_a_replace_conflict_are_rolled_back(self) -> None:
        self.add(3, "UPDATE OR REPLACE payment SET id = 1 WHERE id = 2;")
        self.assertFailedAndRolledBack(words=("lost-row guard", "table payment"))

    def test_rows_deleted_by_a_trigger_are_rolled_back(self) -> None:
        self.add(3, """
            CREATE TRIGGER tidy AFTER INSERT ON loan BEGIN
                DELETE FROM payment WHERE loan_id <> new.id;
            END;
            INSERT INTO loan (id, user_id, amount) VALUES (3, 1, 5);
        """)
        self.assertFailedAndRolledBack(words=("lost-row guard", "table payment"))

    def test_a_confirmed_destructive_run_may_remove_rows(self) -> None:
        self.add(3, "DELETE FROM payment WHERE amount < 15;")
        code, _, err = self.migrate("dev", "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.count("payment"), 1)


class PythonMigrationTests(ApplyTestCase):
    def add_python(self, version: int, body: str) -> Path:
        return self.add(version, "def up(conn):\n" + "".join(f"    {line}\n" for line in body.splitlines()),
                        suffix="py")

    def test_a_python_migration_runs_and_is_recorded_with_its_file_checksum(self) -> None:
        path = self.add_python(3, "conn.execute('ALTER TABLE loan ADD COLUMN status TEXT')\n"
                                  "for (id,) in conn.execute('SELECT id FROM loan').fetchall():\n"
                                  "    conn.execute('UPDATE loan SET status = ? WHERE id = ?', ('open', id))")
        code, _, err = self.migrate("dev")
        self.assertEqual(code, 0, err)
        self.assertEqual(query(self.path, "SELECT status FROM loan"), [("open",), ("open",)])
        self.assertEqual(query(self.path, "SELECT checksum FROM schema_migrations WHERE version = 3"),
                         [(hashlib.sha256(path.read_bytes()).hexdigest(),)])

    def test_a_python_migration_shares_the_transaction_with_the_sql_ones(self) -> None:
        self.add_python(3, "conn.execute('ALTER TABLE loan ADD COLUMN status TEXT')\n"
                           "conn.execute(\"UPDATE loan SET status = 'open' WHERE id = 1\")")
        self.add(4, "INSERT INTO no_such_table (x) VALUES (1);")
        self.assertFailedAndRolledBack(words=("migration 4",))
        self.assertNotIn("status", self.columns("loan"))

    def test_a_python_migration_that_raises_leaves_the_database_as_it_was(self) -> None:
        self.add_python(3, "conn.execute('DELETE FROM payment')\nraise ValueError('bad data in loan 7')")
        self.assertFailedAndRolledBack(words=("migration 3", "bad data in loan 7"))

    def test_a_python_migration_cannot_commit(self) -> None:
        for call in ("conn.commit()", "conn.execute('COMMIT')", "conn.execute('END')",
                     "conn.execute('ROLLBACK')", "conn.rollback()"):
            with self.subTest(call=call):
                self.add_python(3, f"conn.execute('DELETE FROM payment WHERE id = 1')\n{call}")
                database_migration._python_modules.clear()
                self.assertFailedAndRolledBack(words=("migration 3",))
                self.assertEqual(self.count("payment"), 2)


class MigrateAllTests(ProjectTestCase):
    ini = "[DEFAULT]\nbusy_timeout = 2\n\n[zeta]\npath = instance/zeta.db\n\n" \
          "[alpha]\npath = instance/alpha.db\n\n[mid]\npath = instance/mid.db\n"
    names = ("zeta", "alpha", "mid")

    def setUp(self) -> None:
        super().setUp()
        for name in self.names:
            self.create(name)
        self.write_migration("0003_status.sql", "ALTER TABLE loan ADD COLUMN status TEXT;")

    def break_instance(self, name: str) -> None:
        self.db(name).write_bytes(b"not a database at all" * 100)

    def version_of(self, name: str) -> int:
        return query(self.db(name), "SELECT MAX(version) FROM schema_migrations")[0][0]

    def migrate_all(self, *argv: str) -> tuple[int, dict, str]:
        code, out, err = self.run_cli(database_migration, "migrate-all", "--json", *argv)
        return code, json.loads(out), err

    def test_every_instance_is_migrated_in_file_order(self) -> None:
        code, data, err = self.migrate_all()
        self.assertEqual(code, 0, err)
        self.assertEqual([(i["name"], i["result"], i["applied"]) for i in data["instances"]],
                         [("zeta", "ok", [3]), ("alpha", "ok", [3]), ("mid", "ok", [3])])
        self.assertEqual([self.version_of(n) for n in self.names], [3, 3, 3])

    def test_the_first_failure_stops_the_run_and_later_instances_are_skipped(self) -> None:
        self.break_instance("alpha")
        code, data, _ = self.migrate_all()
        self.assertEqual(code, 1)
        self.assertEqual([(i["name"], i["result"]) for i in data["instances"]],
                         [("zeta", "ok"), ("alpha", "failed"), ("mid", "skipped")])
        self.assertIn("not an SQLite database", data["instances"][1]["error"])
        self.assertEqual(self.version_of("mid"), 2)

    def test_keep_going_migrates_the_instances_after_a_failure(self) -> None:
        self.break_instance("zeta")
        code, data, _ = self.migrate_all("--keep-going")
        self.assertEqual(code, 1)
        self.assertEqual([i["result"] for i in data["instances"]], ["failed", "ok", "ok"])
        self.assertEqual([self.version_of(n) for n in ("alpha", "mid")], [3, 3])

    def test_the_text_summary_counts_and_names_the_failures(self) -> None:
        self.break_instance("alpha")
        code, out, err = self.run_cli(database_migration, "migrate-all")
        self.assertEqual(code, 1)
        self.assertIn("1 ok, 1 failed, 1 skipped", out)
        self.assertIn("failed: alpha", out)
        self.assertIn("alpha", err)
        self.assertNoTraceback(err)


if __name__ == "__main__":
    unittest.main()


HOLD_WRITE_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode = WAL" if sys.argv[2] == "wal" else "PRAGMA journal_mode = DELETE")
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO user (id, email, name) VALUES (99, 'w@x', 'Writer')")
print("held", flush=True)
sys.stdin.read()
"""


BUSY_TIMEOUT = 0.3     # seconds: waiting then giving up is the same at 0.3 s as at 2 s


class BusyDatabaseTests(ApplyTestCase):
    """The application holds a write transaction for longer than busy_timeout."""

    ini = INI.replace("busy_timeout = 2", f"busy_timeout = {BUSY_TIMEOUT}")

    @contextmanager
    def write_lock_held(self, mode: str) -> Iterator[None]:
        with subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(self.path), mode],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
            self.assertEqual(holder.stdout.readline().strip(), "held")
            yield
            holder.stdin.close()

    def test_a_migration_that_cannot_get_the_write_lock_fails_in_one_line_and_changes_nothing(self) -> None:
        self.add(3, "ALTER TABLE loan ADD COLUMN status TEXT;")
        for mode in ("delete", "wal"):
            with self.subTest(journal_mode=mode):
                before = self.versions()
                with self.write_lock_held(mode):
                    started = time.monotonic()
                    code, _, err = self.migrate("dev")
                    waited = time.monotonic() - started
                self.assertEqual(code, 1, err)
                self.assertGreaterEqual(waited, BUSY_TIMEOUT, "gave up without waiting")
                self.assertNoTraceback(err)
                self.assertIn("locked", err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertEqual(self.versions(), before)
                self.assertNotIn("status", self.columns("loan"))
