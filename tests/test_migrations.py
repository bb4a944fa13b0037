"""Loading and validating migrations: splitting, files, markers, checksums, MIGRATIONS, errors."""

from __future__ import annotations

import hashlib
import unittest

from tests.support import ProjectTestCase, database_migration, query, sha256

split = database_migration.split_statements
destructive_kind = database_migration.destructive_kind


class SplitStatementsTests(unittest.TestCase):
    def test_a_trigger_body_with_semicolons_stays_one_statement(self) -> None:
        script = """
            CREATE TABLE audit (note TEXT);
            CREATE TRIGGER loan_audit AFTER INSERT ON loan BEGIN
                INSERT INTO audit VALUES ('one');
                INSERT INTO audit VALUES ('two');
            END;
            CREATE INDEX audit_note ON audit (note);
        """
        statements = split(script)
        self.assertEqual(len(statements), 3)
        self.assertTrue(statements[1].startswith("CREATE TRIGGER loan_audit"))
        self.assertTrue(statements[1].endswith("END"))

    def test_a_semicolon_inside_a_string_does_not_split(self) -> None:
        self.assertEqual(split("INSERT INTO t VALUES ('a;b');\nINSERT INTO t VALUES ('it''s; ok');"),
                         ["INSERT INTO t VALUES ('a;b')", "INSERT INTO t VALUES ('it''s; ok')"])

    def test_a_semicolon_inside_a_comment_stays_in_its_statement(self) -> None:
        statements = split("CREATE TABLE a (x);\n-- note; with a semicolon\n"
                           "CREATE TABLE b (/* one; two */ y);")
        self.assertEqual(statements, ["CREATE TABLE a (x)",
                                      "-- note; with a semicolon\nCREATE TABLE b (/* one; two */ y)"])

    def test_the_trailing_semicolon_is_stripped_and_surrounding_space_too(self) -> None:
        self.assertEqual(split("  CREATE TABLE a (x) ;  \n"), ["CREATE TABLE a (x)"])

    def test_a_last_statement_without_a_semicolon_is_kept(self) -> None:
        self.assertEqual(split("CREATE TABLE a (x);\nCREATE TABLE b (y)"),
                         ["CREATE TABLE a (x)", "CREATE TABLE b (y)"])

    def test_comment_only_and_empty_fragments_are_dropped(self) -> None:
        self.assertEqual(split("-- header\n;;\nCREATE TABLE a (x);\n/* the end; really */\n-- bye\n"),
                         ["CREATE TABLE a (x)"])


class DestructiveKindTests(unittest.TestCase):
    def test_statements_that_can_destroy_data_are_named(self) -> None:
        cases = {
            "DROP TABLE payment": "DROP TABLE",
            "drop table if exists payment": "DROP TABLE",
            "ALTER TABLE user DROP COLUMN reset_token": "DROP COLUMN",
            "ALTER TABLE user DROP reset_token": "DROP COLUMN",
            "DELETE FROM payment": "DELETE",
            "DELETE FROM payment WHERE id = 1": "DELETE",
            "UPDATE loan SET amount = 0": "UPDATE without WHERE",
            "UPDATE loan SET amount = (SELECT MAX(amount) FROM loan WHERE id = 1)":
                "UPDATE without WHERE",
        }
        for statement, kind in cases.items():
            with self.subTest(statement=statement):
                self.assertEqual(destructive_kind(statement), kind)

    def test_statements_that_keep_data_are_not_destructive(self) -> None:
        for statement in ("UPDATE loan SET amount = 0 WHERE id = 1",
                          "update loan set amount = 0\nwhere id in (select id from loan)",
                          "INSERT INTO user (email, name) VALUES ('DROP TABLE user', 'x')",
                          "UPDATE loan SET note = 'DELETE everything' WHERE id = 2",
                          "-- DROP TABLE user\nCREATE TABLE t (x)",
                          "ALTER TABLE user ADD COLUMN dropped INTEGER",
                          "CREATE TABLE drop_log (x)",
                          "DROP INDEX loan_user"):
            with self.subTest(statement=statement):
                self.assertEqual(destructive_kind(statement), "")


class LoadingTests(ProjectTestCase):
    def load(self) -> list:
        database_migration._loaded.clear()
        return database_migration.all_migrations(self.instance())

    def versions(self) -> list[int]:
        return [m.version for m in self.load()]

    def use_code_migrations(self, entries: list[dict]) -> None:
        saved = database_migration.MIGRATIONS
        database_migration.MIGRATIONS = entries
        self.addCleanup(setattr, database_migration, "MIGRATIONS", saved)
        database_migration._loaded.clear()

    def test_the_loan_app_history_loads_in_order_with_descriptions(self) -> None:
        migrations = self.load()
        self.assertEqual([(m.version, m.description) for m in migrations],
                         [(1, "create tables"), (2, "add reset fields")])
        self.assertEqual(len(migrations[0].up), 3)
        self.assertEqual(migrations[0].down, ("DROP TABLE payment", "DROP TABLE loan", "DROP TABLE user"))

    def test_marker_lines_are_not_part_of_any_statement(self) -> None:
        for migration in self.load():
            for statement in migration.up + migration.down:
                with self.subTest(statement=statement):
                    self.assertNotIn("migrate:", statement)

    def test_a_file_without_markers_is_all_up_part(self) -> None:
        self.write_migration("0003_add_status.sql", "ALTER TABLE loan ADD COLUMN status TEXT;\n"
                                                    "CREATE INDEX loan_status ON loan (status);\n")
        third = self.load()[2]
        self.assertEqual(third.up, ("ALTER TABLE loan ADD COLUMN status TEXT",
                                    "CREATE INDEX loan_status ON loan (status)"))
        self.assertEqual(third.down, ())

    def test_markers_may_be_written_in_any_case_and_spacing(self) -> None:
        self.write_migration("0003_add_status.sql", "--migrate:UP\nALTER TABLE loan ADD COLUMN status TEXT;\n"
                                                    "--   Migrate:Down\nALTER TABLE loan DROP COLUMN status;\n")
        third = self.load()[2]
        self.assertEqual((third.up, third.down), (("ALTER TABLE loan ADD COLUMN status TEXT",),
                                                  ("ALTER TABLE loan DROP COLUMN status",)))

    def test_the_checksum_follows_the_contract_rule(self) -> None:
        second = self.load()[1]
        expected = hashlib.sha256("ALTER TABLE user ADD COLUMN reset_token VARCHAR(100)\n"
                                  "ALTER TABLE user ADD COLUMN reset_token_expires DATETIME"
                                  .encode("utf-8")).hexdigest()
        self.assertEqual(second.checksum, expected)

    def test_crlf_line_endings_give_the_same_checksum(self) -> None:
        before = [m.checksum for m in self.load()]
        for name in ("0001_create_tables.sql", "0002_add_reset_fields.sql"):
            path = self.migrations_dir / name
            path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
        self.assertEqual([m.checksum for m in self.load()], before)

    def test_an_edit_changes_the_checksum(self) -> None:
        before = self.load()[1].checksum
        path = self.migrations_dir / "0002_add_reset_fields.sql"
        path.write_text(path.read_text().replace("VARCHAR(100)", "VARCHAR(200)"))
        self.assertNotEqual(self.load()[1].checksum, before)

    def test_an_edit_in_the_down_part_does_not_change_the_checksum(self) -> None:
        before = self.load()[1].checksum
        path = self.migrations_dir / "0002_add_reset_fields.sql"
        path.write_text(path.read_text() + "-- one more comment\n")
        self.assertEqual(self.load()[1].checksum, before)

    def test_migrations_in_code_merge_with_files_in_version_order(self) -> None:
        self.use_code_migrations([{"version": 3, "description": "Add loan status",
                                   "sql": ["ALTER TABLE loan ADD COLUMN status VARCHAR(20) DEFAULT 'open'"],
                                   "down": ["ALTER TABLE loan DROP COLUMN status"]}])
        migrations = self.load()
        self.assertEqual([m.version for m in migrations], [1, 2, 3])
        self.assertEqual(migrations[2].description, "Add loan status")
        self.assertEqual(migrations[2].down, ("ALTER TABLE loan DROP COLUMN status",))

    def test_a_migration_in_code_is_applied_by_migrate(self) -> None:
        self.use_code_migrations([{"version": 3, "description": "Add loan status",
                                   "sql": ["ALTER TABLE loan ADD COLUMN status VARCHAR(20) DEFAULT 'open'"]}])
        code, _, err = self.migrate("dev", "--create")
        self.assertEqual(code, 0, err)
        self.assertEqual(query(self.db(), "SELECT MAX(version) FROM schema_migrations"), [(3,)])
        self.assertIn("status", [row[1] for row in query(self.db(), "PRAGMA table_info(loan)")])

    def test_dbmate_timestamp_versions_are_accepted(self) -> None:
        self.write_migration("20261123020000_add_status.sql", "ALTER TABLE loan ADD COLUMN status TEXT;")
        self.assertEqual(self.versions(), [1, 2, 20261123020000])

    def test_other_files_in_the_folder_are_ignored(self) -> None:
        (self.migrations_dir / "README.md").write_text("# how to write migrations\n")
        (self.migrations_dir / "notes.txt").write_text("DROP TABLE user;\n")
        (self.migrations_dir / "__init__.py").write_text("raise SystemExit('imported')\n")
        (self.migrations_dir / ".0003_hidden.sql").write_text("this is not SQL")
        (self.migrations_dir / ".0004_hidden.py").write_text("this is not Python")
        (self.migrations_dir / "0005_archive").mkdir()
        (self.migrations_dir / "0005_archive" / "0005_old.sql").write_text("this is not SQL")
        (self.migrations_dir / "0006_folder.sql").mkdir()
        self.assertEqual(self.versions(), [1, 2])

    def test_a_trigger_migration_is_not_mistaken_for_transaction_control(self) -> None:
        self.write_migration("0003_audit.sql", """
            CREATE TABLE audit (loan_id INTEGER);
            CREATE TRIGGER loan_audit AFTER INSERT ON loan BEGIN
                INSERT INTO audit VALUES (new.id);
            END;
        """)
        path = self.create()
        self.assertEqual(query(path, "SELECT loan_id FROM audit ORDER BY loan_id"), [(1,), (2,)])


class InvalidMigrationTests(ProjectTestCase):
    """Every bad migration list: exit 2 before any database is opened, nothing touched."""

    def setUp(self) -> None:
        super().setUp()
        self.existing = self.create()

    def use_code_migrations(self, entries: list[dict]) -> None:
        saved = database_migration.MIGRATIONS
        database_migration.MIGRATIONS = entries
        self.addCleanup(setattr, database_migration, "MIGRATIONS", saved)

    def files(self) -> dict[str, str]:
        return {str(p.relative_to(self.root)): (sha256(p) if p.is_file() else "folder")
                for p in sorted(self.root.rglob("*")) if "__pycache__" not in p.parts}

    def assertRejected(self, *words: str) -> None:
        """migrate, migrate --create, status and check all exit 2; no file changes or appears."""
        before = self.files()
        for argv in (("migrate", "dev"), ("migrate", "prod", "--create"), ("status",),
                     ("check", "dev"), ("migrate-all", "--create")):
            with self.subTest(argv=argv):
                code, out, err = self.run_cli(database_migration, *argv)
                self.assertEqual(code, 2, out + err)
                self.assertNoTraceback(err)
                self.assertEqual(out, "")
                for word in words:
                    self.assertIn(word, err)
        self.assertEqual(self.files(), before)
        self.assertFalse(self.db("prod").exists())

    def test_a_version_defined_in_code_and_in_a_file_is_refused(self) -> None:
        self.use_code_migrations([{"version": 2, "description": "again", "sql": ["CREATE TABLE x (a)"]}])
        self.assertRejected("version 2", "twice", "0002_add_reset_fields.sql")

    def test_a_version_defined_in_two_files_is_refused(self) -> None:
        self.write_migration("02_again.sql", "CREATE TABLE x (a);")
        self.assertRejected("version 2", "twice")

    def test_version_zero_in_a_file_is_refused(self) -> None:
        self.write_migration("0000_zero.sql", "CREATE TABLE x (a);")
        self.assertRejected("0000_zero.sql", "positive integer")

    def test_versions_in_code_that_are_not_positive_integers_are_refused(self) -> None:
        for version in (0, -3, "3", 3.0, None, True):
            with self.subTest(version=version):
                self.use_code_migrations([{"version": version, "description": "bad",
                                           "sql": ["CREATE TABLE x (a)"]}])
                self.assertRejected("positive integer")

    def test_an_empty_up_part_is_refused(self) -> None:
        # An up part of comments only is a no-op that is applied (tests/test_adopt.py).
        for text in ("", "-- migrate:up\n-- migrate:down\nDROP TABLE x;\n",
                     "-- migrate:down\nDROP TABLE x;\n", "-- migrate:up\n;\n \n"):
            with self.subTest(text=text):
                self.write_migration("0003_todo.sql", text)
                self.assertRejected("0003_todo.sql", "up part is empty")

    def test_an_empty_sql_list_in_code_is_refused(self) -> None:
        self.use_code_migrations([{"version": 3, "description": "nothing", "sql": []}])
        self.assertRejected("up part is empty")

    def test_a_badly_named_sql_file_is_refused(self) -> None:
        for name in ("0003.sql", "abc.sql", "0003-add-status.sql", "0003_.sql", "v3_add_status.sql"):
            with self.subTest(name=name):
                path = self.write_migration(name, "ALTER TABLE loan ADD COLUMN status TEXT;")
                self.assertRejected(name, "NNNN_description")
                path.unlink()

    def test_statements_that_control_the_transaction_are_refused(self) -> None:
        for statement in ("BEGIN", "BEGIN TRANSACTION", "COMMIT", "END TRANSACTION", "ROLLBACK",
                          "VACUUM", "commit -- done"):
            with self.subTest(statement=statement):
                self.write_migration("0003_status.sql", f"ALTER TABLE loan ADD COLUMN status TEXT;\n"
                                                        f"{statement};\n")
                self.assertRejected("0003_status.sql", "transaction")

    def test_a_commit_in_code_migrations_is_refused(self) -> None:
        self.use_code_migrations([{"version": 3, "description": "status",
                                   "sql": ["ALTER TABLE loan ADD COLUMN status TEXT", "COMMIT"]}])
        self.assertRejected("transaction")

    def test_a_code_migration_that_is_not_a_dict_of_known_keys_is_refused(self) -> None:
        for entry in ({"version": 3, "description": "x", "up": ["CREATE TABLE x (a)"]},
                      ("version", 3), {"version": 3, "description": "x", "sql": [1, 2]}):
            with self.subTest(entry=entry):
                self.use_code_migrations([entry])
                self.assertRejected("MIGRATIONS[0]")


if __name__ == "__main__":
    unittest.main()
