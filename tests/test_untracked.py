"""A database made without the tool is 'untracked'; tables named sqlite... are ordinary tables."""

from __future__ import annotations

import json
import sqlite3
import unittest
from contextlib import closing

from tests.support import ProjectTestCase, database_migration, dump, query, safe_db_update, sha256
from tests.test_guard_rails import build_by_hand, execute


class UntrackedTests(ProjectTestCase):
    """dev built by hand (the loan app's tables, no schema_migrations), as the issue found it."""

    def setUp(self) -> None:
        super().setUp()
        build_by_hand(self.db(), "0001_create_tables.sql")
        execute(self.db(), "INSERT INTO user (id, email, name) VALUES (1, 'a@x', 'Ann')")

    def state(self, name: str = "dev") -> str:
        code, out, err = self.run_cli(database_migration, "status", "--json")
        self.assertEqual(code, 0, err)
        return {row["name"]: row["state"] for row in json.loads(out)["instances"]}[name]

    def test_status_shows_untracked_in_json_and_text(self) -> None:
        self.assertEqual(self.state(), "untracked")
        code, out, _ = self.run_cli(database_migration, "status")
        self.assertEqual(code, 0)
        [line] = [line for line in out.splitlines() if line.startswith("dev ")]
        self.assertIn("untracked", line)

    def test_check_reports_it_and_points_to_baseline(self) -> None:
        code, out, err = self.run_cli(database_migration, "check", "dev", "--json")
        self.assertEqual(code, 1, out + err)
        data = json.loads(out)
        self.assertEqual((data["state"], data["consistent"]), ("untracked", False))
        self.assertTrue(any("untracked" in p and "baseline dev --to" in p for p in data["problems"]))

    def test_migrate_refuses_it_changing_nothing_and_taking_no_backup(self) -> None:
        before = sha256(self.db())
        for argv in (("dev",), ("dev", "--yes"), ("dev", "--dry-run")):
            with self.subTest(argv=argv):
                code, out, err = self.migrate(*argv)
                self.assertEqual(code, 1, out + err)
                self.assertIn("untracked", err)
                self.assertIn("baseline dev --to V", err)
                self.assertNotIn("already exists", err)
                self.assertNoTraceback(err)
                self.assertEqual(sha256(self.db()), before)
                self.assertEqual(self.backups(), [])

    def test_migrate_as_a_script_refuses_it_with_one_line(self) -> None:
        result = self.run_script("database_migration.py", "migrate", "dev", "--yes")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("baseline dev --to V", result.stderr)

    def test_an_empty_tracking_table_beside_tables_is_still_untracked(self) -> None:
        execute(self.db(), "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
                           "description TEXT NOT NULL, applied_at DATETIME, checksum TEXT, "
                           "execution_ms INTEGER)")
        self.assertEqual(self.state(), "untracked")

    def test_after_baseline_it_is_tracked_and_migrate_applies_the_rest(self) -> None:
        code, _, err = self.run_cli(database_migration, "baseline", "dev", "--to", "1")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.state(), "pending")
        code, _, err = self.migrate("dev")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.state(), "up to date")
        self.assertEqual(query(self.db(), "SELECT name FROM user"), [("Ann",)])

    def test_untracked_comes_after_error_and_missing(self) -> None:
        self.db("prod").write_bytes(b"not a database at all, just text" * 10)
        code, out, _ = self.run_cli(database_migration, "status", "--json")
        states = {row["name"]: row["state"] for row in json.loads(out)["instances"]}
        self.assertEqual((code, states), (1, {"dev": "untracked", "prod": "error"}))


class NotUntrackedTests(ProjectTestCase):
    def test_an_empty_database_file_is_pending_and_migrate_builds_it(self) -> None:
        self.db().touch()
        code, out, _ = self.run_cli(database_migration, "status", "--json")
        self.assertEqual(json.loads(out)["instances"][0]["state"], "pending")
        code, _, err = self.migrate("dev")
        self.assertEqual(code, 0, err)

    def test_a_database_with_only_our_tracking_table_is_pending(self) -> None:
        with closing(sqlite3.connect(self.db())) as conn:
            conn.execute(database_migration.TRACKING_TABLE)
        code, out, _ = self.run_cli(database_migration, "status", "--json")
        self.assertEqual(json.loads(out)["instances"][0]["state"], "pending")
        code, _, err = self.migrate("dev")
        self.assertEqual(code, 0, err)


class SqlitePrefixedNameTests(ProjectTestCase):
    """Only SQLite's own sqlite_ objects are internal: sqliteusers is a table like any other."""

    def setUp(self) -> None:
        super().setUp()
        self.write_migration("0003_sqliteusers.sql",
                             "CREATE TABLE sqliteusers (id INTEGER PRIMARY KEY, name TEXT);\n"
                             "CREATE TABLE counter (id INTEGER PRIMARY KEY AUTOINCREMENT);\n"
                             "INSERT INTO sqliteusers VALUES (1, 'a'), (2, 'b');\n"
                             "INSERT INTO counter DEFAULT VALUES;")
        code, _, err = self.migrate("dev", "--create")
        self.assertEqual(code, 0, err)

    def test_the_lost_row_guard_counts_its_rows(self) -> None:
        self.write_migration("0004_collapse.sql", "UPDATE OR REPLACE sqliteusers SET id = 1 WHERE id = 2;")
        before = dump(self.db())
        code, _, err = self.migrate("dev")
        self.assertEqual(code, 1, err)
        self.assertIn("table sqliteusers had 2 rows before the run and has 1", err)
        self.assertEqual(dump(self.db()), before)

    def test_drift_sees_a_column_added_to_it_by_hand(self) -> None:
        execute(self.db(), "ALTER TABLE sqliteusers ADD COLUMN extra TEXT")
        code, out, err = self.run_cli(database_migration, "check", "dev", "--json")
        self.assertEqual(code, 1, out + err)
        self.assertTrue(any("sqliteusers" in line for line in json.loads(out)["drift"]))

    def test_info_lists_it_but_not_sqlite_sequence(self) -> None:
        code, out, err = self.run_cli(safe_db_update, "info", "dev", "--json")
        self.assertEqual(code, 0, err)
        tables = {t["name"]: t["rows"] for t in json.loads(out)["tables"]}
        self.assertEqual(tables.get("sqliteusers"), 2)
        self.assertNotIn("sqlite_sequence", tables)

    def test_a_database_holding_only_such_a_table_is_untracked(self) -> None:
        execute(self.db("prod"), "CREATE TABLE sqliteusers (id INTEGER)")
        code, out, _ = self.run_cli(database_migration, "status", "--json")
        states = {row["name"]: row["state"] for row in json.loads(out)["instances"]}
        self.assertEqual(states["prod"], "untracked")


if __name__ == "__main__":
    unittest.main()
