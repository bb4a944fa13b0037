"""Guard rails around migrate: drift detection, baseline, rollback, new, and the audit trail."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from tests.support import LOAN_APP, ProjectTestCase, database_migration, dump, query, sha256

UP_PART = re.compile(r"-- migrate:up\n(?P<up>.*?)(?:-- migrate:down\n|$)", re.DOTALL)


def up_part(name: str) -> str:
    """The up SQL of one of the loan-app migration files."""
    return UP_PART.search(LOAN_APP[name])["up"]


def checksum_of(script: str) -> str:
    """The contract's checksum: stripped statements without ';', joined by newlines."""
    statements = [s.strip() for s in script.split(";") if s.strip()]
    return hashlib.sha256("\n".join(statements).encode("utf-8")).hexdigest()


def execute(path: Path, *statements: str) -> None:
    """Change a database by hand, outside the tool."""
    with closing(sqlite3.connect(path)) as conn:
        for statement in statements:
            conn.execute(statement)
        conn.commit()


def build_by_hand(path: Path, *names: str) -> None:
    """A database that predates the tool: the migrations' CREATE statements, no tracking table."""
    with closing(sqlite3.connect(path)) as conn:
        for name in names:
            conn.executescript(up_part(name))
        conn.commit()


def table_names(path: Path) -> list[str]:
    return [name for (name,) in query(path, "SELECT name FROM sqlite_master WHERE type = 'table' "
                                            "ORDER BY name")]


def applied_versions(path: Path) -> list[int]:
    return [v for (v,) in query(path, "SELECT version FROM schema_migrations ORDER BY version")]


def shape(path: Path) -> dict[str, list[tuple]]:
    """Every schema object's type, name and SQL, and every table's PRAGMA table_info."""
    objects = query(path, "SELECT type, name, sql FROM sqlite_master "
                          "WHERE name <> 'schema_migrations' ORDER BY type, name")
    result: dict[str, list[tuple]] = {"objects": objects}
    for kind, name, _ in objects:
        if kind == "table":
            result[name] = query(path, f'PRAGMA table_info("{name}")')
    return result


class GuardRailTestCase(ProjectTestCase):
    """Helpers shared by the guard-rail tests."""

    def cli(self, *argv: str) -> tuple[int, str, str]:
        return self.run_cli(database_migration, *argv)

    def cli_json(self, *argv: str) -> tuple[int, dict, str]:
        code, out, err = self.cli("--json", *argv)
        return code, json.loads(out) if out.strip() else {}, err

    def status_of(self, name: str = "dev") -> str:
        code, data, err = self.cli_json("status")
        self.assertEqual(code, 0, err)
        return {row["name"]: row for row in data["instances"]}[name]["state"]

    def history_file(self, name: str = "dev") -> Path:
        return self.root / "backups" / name / "history.jsonl"

    def history(self, name: str = "dev") -> list[dict]:
        path = self.history_file(name)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def manifest(self, backup: Path) -> dict:
        return json.loads(backup.with_name(backup.name + ".json").read_text(encoding="utf-8"))


# --- Drift -------------------------------------------------------------------

class DriftTests(GuardRailTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.create("dev")

    def test_a_column_added_by_hand_makes_check_fail_and_names_the_table(self) -> None:
        execute(self.db(), "ALTER TABLE loan ADD COLUMN note TEXT")
        code, data, err = self.cli_json("check", "dev")
        self.assertEqual(code, 1, err)
        self.assertFalse(data["consistent"])
        self.assertTrue(any(p == "drift: column loan.note: only in the database" for p in data["problems"]),
                        data["problems"])

    def test_an_index_added_by_hand_makes_check_fail_and_names_the_index(self) -> None:
        execute(self.db(), "CREATE INDEX loan_by_user ON loan (user_id)")
        code, out, err = self.cli("check", "dev")
        self.assertEqual(code, 1, err)
        self.assertIn("loan_by_user", out)
        self.assertNoTraceback(err)

    def test_status_reports_drift_for_a_column_added_by_hand(self) -> None:
        self.assertEqual(self.status_of("dev"), "up to date")
        execute(self.db(), "ALTER TABLE user ADD COLUMN phone TEXT")
        self.assertEqual(self.status_of("dev"), "drift")

    def test_status_reports_drift_for_an_index_added_by_hand(self) -> None:
        execute(self.db(), "CREATE INDEX payment_by_loan ON payment (loan_id)")
        self.assertEqual(self.status_of("dev"), "drift")

    def test_a_table_dropped_by_hand_is_reported_as_missing(self) -> None:
        execute(self.db(), "DROP TABLE payment")
        code, data, err = self.cli_json("check", "dev")
        self.assertEqual(code, 1, err)
        self.assertTrue(any(p == "drift: table payment: only in the migrations" for p in data["problems"]),
                        data["problems"])
        self.assertEqual(self.status_of("dev"), "drift")

    def test_two_instances_migrated_identically_have_no_diff(self) -> None:
        self.create("prod")
        code, out, err = self.cli("diff", "dev", "prod")
        self.assertEqual(code, 0, err)
        self.assertEqual(err, "")

    def test_diff_names_a_column_added_by_hand(self) -> None:
        self.create("prod")
        execute(self.db("prod"), "ALTER TABLE loan ADD COLUMN note TEXT")
        code, data, err = self.cli_json("diff", "dev", "prod")
        self.assertEqual(code, 1, err)
        self.assertFalse(data["same"])
        self.assertTrue(any(d == "column loan.note: only in prod" for d in data["differences"]),
                        data["differences"])

    def test_diff_names_an_index_added_by_hand(self) -> None:
        self.create("prod")
        execute(self.db("dev"), "CREATE INDEX loan_by_user ON loan (user_id)")
        code, out, err = self.cli("diff", "dev", "prod")
        self.assertEqual(code, 1, err)
        self.assertIn("loan_by_user", out)

    def test_check_of_a_drifted_database_changes_nothing(self) -> None:
        execute(self.db(), "CREATE INDEX loan_by_user ON loan (user_id)")
        before = sha256(self.db())
        self.cli("check", "dev")
        self.cli("status")
        self.assertEqual(sha256(self.db()), before)
        self.assertEqual(self.backups("dev"), [])

    def test_check_reports_drift_when_run_as_a_script(self) -> None:
        execute(self.db(), "CREATE INDEX loan_by_user ON loan (user_id)")
        result = self.run_script("database_migration.py", "check", "dev")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("loan_by_user", result.stdout)
        self.assertNoTraceback(result.stderr)


# --- Baseline ----------------------------------------------------------------

class BaselineTests(GuardRailTestCase):
    def test_baseline_records_the_versions_of_a_hand_built_database_with_checksums(self) -> None:
        build_by_hand(self.db(), "0001_create_tables.sql", "0002_add_reset_fields.sql")
        code, out, err = self.cli("baseline", "dev", "--to", "2")
        self.assertEqual(code, 0, err)
        rows = query(self.db(), "SELECT version, checksum FROM schema_migrations ORDER BY version")
        self.assertEqual(rows, [(1, checksum_of(up_part("0001_create_tables.sql"))),
                                (2, checksum_of(up_part("0002_add_reset_fields.sql")))])

    def test_a_baseline_that_fails_half_way_records_nothing_and_changes_nothing(self) -> None:
        build_by_hand(self.db(), "0001_create_tables.sql", "0002_add_reset_fields.sql")
        execute(self.db(), "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY "
                           "CHECK (version < 2), description TEXT NOT NULL, applied_at DATETIME)")
        before = dump(self.db())
        code, _, err = self.cli("baseline", "dev", "--to", "2")
        self.assertEqual(code, 1, err)
        self.assertNotIn("Traceback", err)
        self.assertIn("rolled back", err)
        self.assertEqual(dump(self.db()), before)

    def test_baseline_takes_a_pre_migrate_backup_first(self) -> None:
        build_by_hand(self.db(), "0001_create_tables.sql")
        code, _, err = self.cli("baseline", "dev", "--to", "1")
        self.assertEqual(code, 0, err)
        backups = self.backups("dev")
        self.assertEqual(len(backups), 1)
        self.assertEqual(self.manifest(backups[0])["reason"], "pre-migrate")
        self.assertNotIn("schema_migrations", table_names(backups[0]))

    def test_after_a_full_baseline_check_is_consistent(self) -> None:
        build_by_hand(self.db(), "0001_create_tables.sql", "0002_add_reset_fields.sql")
        self.assertEqual(self.cli("baseline", "dev", "--to", "2")[0], 0)
        code, data, err = self.cli_json("check", "dev")
        self.assertEqual(code, 0, err)
        self.assertTrue(data["consistent"])
        self.assertEqual(data["problems"], [])

    def test_after_a_partial_baseline_migrate_applies_only_the_rest(self) -> None:
        build_by_hand(self.db(), "0001_create_tables.sql")
        execute(self.db(), "INSERT INTO user (id, email, name) VALUES (1, 'a@x', 'Ann')")
        self.assertEqual(self.cli("baseline", "dev", "--to", "1")[0], 0)
        code, data, err = self.cli_json("migrate", "dev")
        self.assertEqual(code, 0, err)
        self.assertEqual((data["from_version"], data["applied"]), (1, [2]))
        self.assertEqual(applied_versions(self.db()), [1, 2])
        self.assertEqual(query(self.db(), "SELECT id, name, reset_token FROM user"), [(1, "Ann", None)])

    def test_baseline_refuses_a_different_schema_and_records_nothing(self) -> None:
        build_by_hand(self.db(), "0001_create_tables.sql")
        execute(self.db(), "ALTER TABLE loan ADD COLUMN note TEXT")
        before = sha256(self.db())
        code, out, err = self.cli("baseline", "dev", "--to", "1")
        self.assertEqual(code, 1, out)
        self.assertIn("--force", err)
        self.assertNoTraceback(err)
        self.assertNotIn("schema_migrations", table_names(self.db()))
        self.assertEqual(sha256(self.db()), before)
        self.assertEqual(self.backups("dev"), [])

    def test_baseline_with_force_records_anyway_and_lists_the_differences(self) -> None:
        build_by_hand(self.db(), "0001_create_tables.sql")
        execute(self.db(), "ALTER TABLE loan ADD COLUMN note TEXT")
        code, data, err = self.cli_json("baseline", "dev", "--to", "1", "--force")
        self.assertEqual(code, 0, err)
        self.assertTrue(data["forced"])
        self.assertIn("column loan.note: only in the database", data["differences"])
        self.assertEqual(applied_versions(self.db()), [1])

    def test_baseline_refuses_when_versions_are_already_recorded(self) -> None:
        self.create("dev")
        before = dump(self.db())
        code, _, err = self.cli("baseline", "dev", "--to", "1")
        self.assertEqual(code, 1)
        self.assertIn("already recorded", err)
        self.assertEqual(dump(self.db()), before)
        self.assertEqual(self.backups("dev"), [])

    def test_baseline_to_an_unknown_version_is_a_usage_error(self) -> None:
        build_by_hand(self.db(), "0001_create_tables.sql")
        code, _, err = self.cli("baseline", "dev", "--to", "7")
        self.assertEqual(code, 2)
        self.assertIn("7", err)
        self.assertNotIn("schema_migrations", table_names(self.db()))


# --- Rollback ----------------------------------------------------------------

INDEXED = {
    **LOAN_APP,
    "0003_index_loans.sql": """-- migrate:up
CREATE INDEX loan_by_user ON loan (user_id);
-- migrate:down
DROP INDEX loan_by_user;
""",
}


class RollbackTests(GuardRailTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.create("dev")

    def reference(self, version: int) -> Path:
        """prod migrated only up to VERSION, to compare schemas with."""
        code, _, err = self.migrate("prod", "--create", "--to", str(version))
        self.assertEqual(code, 0, err)
        return self.db("prod")

    def test_rollback_restores_the_schema_of_the_target_version_exactly(self) -> None:
        code, _, err = self.cli("rollback", "dev", "--to", "1", "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual(shape(self.db()), shape(self.reference(1)))

    def test_rollback_keeps_the_rows_of_the_remaining_tables(self) -> None:
        self.assertEqual(self.cli("rollback", "dev", "--to", "1", "--yes")[0], 0)
        self.assertEqual(query(self.db(), "SELECT id, email, name FROM user ORDER BY id"),
                         [(1, "a@x", "Ann"), (2, "b@x", "Bob")])
        self.assertEqual(query(self.db(), "SELECT id, user_id, amount FROM loan ORDER BY id"),
                         [(1, 1, 100), (2, 2, 250)])
        self.assertEqual(query(self.db(), "SELECT COUNT(*) FROM payment"), [(2,)])

    def test_rollback_forgets_the_versions_above_the_target(self) -> None:
        self.assertEqual(self.cli("rollback", "dev", "--to", "1", "--yes")[0], 0)
        self.assertEqual(applied_versions(self.db()), [1])
        code, data, err = self.cli_json("check", "dev")
        self.assertEqual(data["pending"], [2])
        self.assertEqual(data["problems"], [])

    def test_rollback_takes_a_pre_rollback_backup_of_the_old_state(self) -> None:
        self.assertEqual(self.cli("rollback", "dev", "--to", "1", "--yes")[0], 0)
        backups = self.backups("dev")
        self.assertEqual(len(backups), 1)
        self.assertEqual(self.manifest(backups[0])["reason"], "pre-rollback")
        self.assertEqual(applied_versions(backups[0]), [1, 2])

    def test_a_destructive_rollback_without_terminal_or_yes_is_refused(self) -> None:
        before = dump(self.db())
        code, out, err = self.cli("rollback", "dev", "--to", "1")
        self.assertEqual(code, 1)
        self.assertIn("--yes", err)
        self.assertIn("DROP COLUMN", err)
        self.assertNoTraceback(err)
        self.assertEqual(dump(self.db()), before)
        self.assertEqual(self.backups("dev"), [])

    def test_rollback_to_the_current_version_is_refused(self) -> None:
        before = sha256(self.db())
        code, _, err = self.cli("rollback", "dev", "--to", "2", "--yes")
        self.assertEqual(code, 1)
        self.assertIn("not below", err)
        self.assertEqual(sha256(self.db()), before)
        self.assertEqual(self.backups("dev"), [])

    def test_rollback_to_a_version_above_the_current_one_is_refused(self) -> None:
        before = sha256(self.db())
        code, _, err = self.cli("rollback", "dev", "--to", "5", "--yes")
        self.assertNotEqual(code, 0)
        self.assertNoTraceback(err)
        self.assertEqual(sha256(self.db()), before)
        self.assertEqual(self.backups("dev"), [])


class NonDestructiveRollbackTests(GuardRailTestCase):
    migrations = INDEXED

    def test_a_rollback_whose_down_parts_are_harmless_asks_nothing(self) -> None:
        self.create("dev")
        code, _, err = self.cli("rollback", "dev", "--to", "2")
        self.assertEqual(code, 0, err)
        self.assertEqual(query(self.db(), "SELECT name FROM sqlite_master WHERE type = 'index' "
                                          "AND name = 'loan_by_user'"), [])
        self.assertEqual(applied_versions(self.db()), [1, 2])


class RollbackWithoutDownPartTests(GuardRailTestCase):
    migrations = {**LOAN_APP, "0003_index_loans.sql": "CREATE INDEX loan_by_user ON loan (user_id);\n"}

    def test_rollback_over_a_migration_without_down_part_is_refused_and_points_to_restore(self) -> None:
        self.create("dev")
        before = dump(self.db())
        code, _, err = self.cli("rollback", "dev", "--to", "2", "--yes")
        self.assertEqual(code, 1)
        self.assertIn("0003", err)
        self.assertIn("restore", err)
        self.assertNoTraceback(err)
        self.assertEqual(dump(self.db()), before)
        self.assertEqual(self.backups("dev"), [])


class RollbackFailingHalfWayTests(GuardRailTestCase):
    migrations = {
        **LOAN_APP,
        "0003_index_loans.sql": """-- migrate:up
CREATE INDEX loan_by_user ON loan (user_id);
CREATE INDEX payment_by_loan ON payment (loan_id);
-- migrate:down
DROP INDEX loan_by_user;
DROP INDEX no_such_index;
""",
    }

    def test_a_down_part_that_fails_half_way_leaves_the_database_as_it_was(self) -> None:
        self.create("dev")
        before = dump(self.db())
        code, _, err = self.cli("rollback", "dev", "--to", "2", "--yes")
        self.assertEqual(code, 1)
        self.assertIn("no_such_index", err)
        self.assertNoTraceback(err)
        self.assertEqual(dump(self.db()), before)
        self.assertEqual(applied_versions(self.db()), [1, 2, 3])


# --- new ---------------------------------------------------------------------

class NewMigrationTests(GuardRailTestCase):
    def test_new_writes_the_next_numbered_file_with_both_markers(self) -> None:
        code, out, err = self.cli("new", "Add loan status")
        self.assertEqual(code, 0, err)
        path = self.migrations_dir / "0003_add_loan_status.sql"
        self.assertTrue(path.is_file(), sorted(p.name for p in self.migrations_dir.iterdir()))
        text = path.read_text(encoding="utf-8")
        self.assertIn("-- migrate:up", text)
        self.assertIn("-- migrate:down", text)
        self.assertLess(text.index("-- migrate:up"), text.index("-- migrate:down"))

    def test_the_new_empty_file_blocks_status_until_its_up_part_is_filled(self) -> None:
        self.assertEqual(self.cli("new", "Add loan status")[0], 0)
        path = self.migrations_dir / "0003_add_loan_status.sql"
        code, _, err = self.cli("status")
        self.assertEqual(code, 2)
        self.assertIn("0003_add_loan_status.sql", err)
        self.assertNoTraceback(err)
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace("-- migrate:up\n",
                                     "-- migrate:up\nALTER TABLE loan ADD COLUMN status TEXT;\n"),
                        encoding="utf-8")
        code, data, err = self.cli_json("status")
        self.assertEqual(code, 0, err)
        self.assertEqual(data["instances"][0]["latest_version"], 3)

    def test_new_python_writes_a_py_migration(self) -> None:
        code, _, err = self.cli("new", "Fill loan status", "--python")
        self.assertEqual(code, 0, err)
        self.assertTrue((self.migrations_dir / "0003_fill_loan_status.py").is_file())
        self.assertFalse((self.migrations_dir / "0003_fill_loan_status.sql").exists())

    def test_new_never_overwrites_and_numbers_after_the_last_file(self) -> None:
        self.assertEqual(self.cli("new", "first")[0], 0)
        (self.migrations_dir / "0003_first.sql").write_text(
            "-- migrate:up\nCREATE TABLE a (x);\n", encoding="utf-8")
        self.assertEqual(self.cli("new", "second")[0], 0)
        self.assertTrue((self.migrations_dir / "0004_second.sql").is_file())
        self.assertIn("CREATE TABLE a", (self.migrations_dir / "0003_first.sql").read_text())


class TimestampNewMigrationTests(GuardRailTestCase):
    migrations = {
        "20240101120000_create_user.sql": "-- migrate:up\nCREATE TABLE user (id INTEGER PRIMARY KEY);\n",
        "20240102120000_add_name.sql": "-- migrate:up\nALTER TABLE user ADD COLUMN name TEXT;\n",
    }

    def test_new_continues_with_a_utc_timestamp_version(self) -> None:
        earliest = int(time.strftime("%Y%m%d%H%M%S", time.gmtime()))
        code, data, err = self.cli_json("new", "add email")
        self.assertEqual(code, 0, err)
        written = sorted(p.name for p in self.migrations_dir.glob("*_add_email.sql"))
        self.assertEqual(len(written), 1, written)
        number = written[0].split("_", 1)[0]
        self.assertRegex(number, r"^\d{14}$")
        self.assertGreaterEqual(int(number), earliest)   # now, not the last version plus one
        self.assertEqual(data["version"], int(number))


# --- Audit trail -------------------------------------------------------------

AUDIT_KEYS = {"created_at", "name", "user", "host", "command", "version_before", "version_after",
              "backup", "outcome", "seconds"}


class AuditTrailTests(GuardRailTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.create("dev")
        self.start = len(self.history())

    def new_entries(self) -> list[dict]:
        return self.history()[self.start:]

    def assertOneEntry(self, outcome_prefix: str = "ok") -> dict:
        entries = self.new_entries()
        self.assertEqual(len(entries), 1, entries)
        entry = entries[0]
        self.assertLessEqual(AUDIT_KEYS, set(entry), entry)
        self.assertTrue(entry["outcome"].startswith(outcome_prefix), entry)
        return entry

    def add_migration(self, sql: str) -> None:
        self.write_migration("0003_more.sql", f"-- migrate:up\n{sql}\n")

    def test_migrate_leaves_one_history_line_with_versions_and_backup(self) -> None:
        self.add_migration("ALTER TABLE loan ADD COLUMN status TEXT;")
        self.assertEqual(self.migrate("dev")[0], 0)
        entry = self.assertOneEntry("ok")
        self.assertEqual((entry["version_before"], entry["version_after"]), (2, 3))
        self.assertEqual(Path(entry["backup"]), self.backups("dev")[0])

    def test_a_failed_migrate_leaves_one_line_whose_outcome_says_failed(self) -> None:
        self.add_migration("INSERT INTO no_such_table VALUES (1);")
        code, _, err = self.migrate("dev")
        self.assertEqual(code, 1)
        entry = self.assertOneEntry("failed")
        self.assertIn("no_such_table", entry["outcome"])
        self.assertEqual((entry["version_before"], entry["version_after"]), (2, 2))

    def test_rollback_leaves_one_history_line(self) -> None:
        self.assertEqual(self.cli("rollback", "dev", "--to", "1", "--yes")[0], 0)
        entry = self.assertOneEntry("ok")
        self.assertEqual((entry["version_before"], entry["version_after"]), (2, 1))
        self.assertTrue(entry["backup"])

    def test_backup_leaves_one_history_line(self) -> None:
        self.assertEqual(self.cli("backup", "dev")[0], 0)
        entry = self.assertOneEntry("ok")
        self.assertEqual(Path(entry["backup"]), self.backups("dev")[0])

    def test_baseline_leaves_one_history_line(self) -> None:
        build_by_hand(self.db("prod"), "0001_create_tables.sql")
        self.assertEqual(self.cli("baseline", "prod", "--to", "1")[0], 0)
        entries = self.history("prod")
        self.assertEqual(len(entries), 1, entries)
        self.assertLessEqual(AUDIT_KEYS, set(entries[0]))
        self.assertEqual((entries[0]["version_before"], entries[0]["version_after"], entries[0]["outcome"]),
                         (0, 1, "ok"))

    def test_history_json_returns_the_lines_in_order(self) -> None:
        self.assertEqual(self.cli("backup", "dev")[0], 0)
        self.assertEqual(self.cli("rollback", "dev", "--to", "1", "--yes")[0], 0)
        code, data, err = self.cli_json("history", "dev")
        self.assertEqual(code, 0, err)
        self.assertEqual(data["entries"], self.history())
        self.assertEqual([e["version_after"] for e in data["entries"][-2:]], [2, 1])

    def test_dry_runs_and_read_only_commands_add_no_history(self) -> None:
        self.add_migration("ALTER TABLE loan ADD COLUMN status TEXT;")
        self.create("prod")
        before = self.history_file().read_bytes()
        for argv in (("migrate", "dev", "--dry-run"), ("status",), ("check", "dev"),
                     ("diff", "dev", "prod"), ("history", "dev")):
            with self.subTest(argv=argv):
                self.cli(*argv)
                self.assertEqual(self.history_file().read_bytes(), before)

    def test_the_command_line_is_recorded_when_run_as_a_script(self) -> None:
        result = self.run_script("database_migration.py", "backup", "dev")
        self.assertEqual(result.returncode, 0, result.stderr)
        entry = self.assertOneEntry("ok")
        self.assertIn("backup dev", entry["command"])
