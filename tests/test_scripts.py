"""The two CLIs as real processes with no terminal, and the example the checkout ships."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from tests.support import ROOT, ProjectTestCase, query, safe_db_update, sha256

SCRIPTS = ("database_migration.py", "safe_db_update.py")
EXAMPLE_INSTANCES = ["dev", "testing", "prod"]


def clean_environment() -> dict:
    return {k: v for k, v in os.environ.items() if k != "DB_MIGRATION_CONFIG"}


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A command with stdin closed, so it has no terminal to ask on."""
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, cwd=cwd, env=clean_environment(), timeout=120)


def copy_example(folder: Path) -> Path:
    """The shipped instances.ini and migrations/ copied into folder; returns the ini."""
    shutil.copy2(ROOT / "instances.ini", folder / "instances.ini")
    shutil.copytree(ROOT / "migrations", folder / "migrations")
    return folder / "instances.ini"


class BareCheckoutTests(unittest.TestCase):
    def setUp(self) -> None:
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.folder = Path(folder.name)

    def test_help_works_from_a_checkout_with_only_the_two_scripts(self) -> None:
        for script in SCRIPTS:
            shutil.copy2(ROOT / script, self.folder / script)
        for script in SCRIPTS:
            with self.subTest(script=script):
                result = run([str(self.folder / script), "--help"], cwd=self.folder)
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn("usage", result.stdout)
                self.assertEqual(result.stderr, "")
        self.assertEqual(sorted(p.name for p in self.folder.iterdir() if p.name != "__pycache__"),
                         sorted(SCRIPTS))

    def test_help_of_the_checkout_lists_the_commands(self) -> None:
        for script, command in (("database_migration.py", "migrate-all"),
                                ("safe_db_update.py", "list-backups")):
            with self.subTest(script=script):
                result = run([str(ROOT / script), "--help"], cwd=self.folder)
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn(command, result.stdout)


class ShippedExampleTests(unittest.TestCase):
    """The README's command on a copy of the shipped instances.ini and migrations/."""

    @classmethod
    def setUpClass(cls) -> None:
        folder = tempfile.TemporaryDirectory()
        cls.addClassCleanup(folder.cleanup)
        cls.folder = Path(folder.name)
        cls.config = copy_example(cls.folder)
        cls.migrate = cls.script("database_migration.py", "migrate-all", "--create")
        cls.status = cls.script("database_migration.py", "status")

    @classmethod
    def script(cls, script: str, *argv: str) -> subprocess.CompletedProcess:
        return run([str(ROOT / script), "--config", str(cls.config), *argv], cwd=cls.folder)

    def db(self, name: str) -> Path:
        return self.folder / "instance" / f"{name}.db"

    def columns(self, name: str, table: str) -> dict[str, tuple]:
        """column -> (type, default) as PRAGMA table_info reports them."""
        return {row[1]: (row[2], row[4]) for row in query(self.db(name), f"PRAGMA table_info({table})")}

    def test_migrate_all_create_then_status_exits_0(self) -> None:
        for result in (self.migrate, self.status):
            with self.subTest(args=result.args[2:]):
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertNotIn("Traceback", result.stderr)

    def test_status_says_up_to_date_for_every_example_instance(self) -> None:
        lines = {line.split()[0]: line for line in self.status.stdout.splitlines()[1:] if line.strip()}
        self.assertEqual(list(lines), EXAMPLE_INSTANCES)
        for name in EXAMPLE_INSTANCES:
            with self.subTest(instance=name):
                self.assertIn("up to date", lines[name])

    def test_the_databases_are_made_under_the_copy_instance_folder(self) -> None:
        self.assertEqual(sorted(p.name for p in (self.folder / "instance").iterdir()),
                         ["dev.db", "prod.db", "testing.db"])
        for name in EXAMPLE_INSTANCES:
            with self.subTest(instance=name):
                self.assertEqual(query(self.db(name), "SELECT version FROM schema_migrations "
                                                      "ORDER BY version"), [(1,), (2,), (3,)])

    def test_first_migration_creates_user_loan_and_payment_with_foreign_keys(self) -> None:
        tables = query(self.db("dev"), "SELECT name FROM sqlite_master WHERE type = 'table' "
                                       "AND name <> 'schema_migrations' ORDER BY name")
        self.assertEqual(tables, [("loan",), ("payment",), ("user",)])
        for child, column, parent in (("loan", "user_id", "user"), ("payment", "loan_id", "loan")):
            with self.subTest(table=child):
                keys = [(row[2], row[3], row[4]) for row in
                        query(self.db("dev"), f"PRAGMA foreign_key_list({child})")]
                self.assertEqual(keys, [(parent, column, "id")])

    def test_second_migration_adds_the_password_reset_fields_to_user(self) -> None:
        columns = self.columns("dev", "user")
        self.assertEqual(columns["reset_token"], ("VARCHAR(100)", None))
        self.assertEqual(columns["reset_token_expires"], ("DATETIME", None))

    def test_third_migration_adds_new_field_to_loan_and_payment(self) -> None:
        self.assertEqual(self.columns("dev", "loan")["new_field"], ("VARCHAR(50)", None))
        self.assertEqual(self.columns("dev", "payment")["new_field"], ("INTEGER", "0"))

    def test_the_example_migrations_are_numbered_0001_to_0003(self) -> None:
        names = sorted(p.name for p in (ROOT / "migrations").glob("*.sql"))
        self.assertEqual([name[:5] for name in names], ["0001_", "0002_", "0003_"])


class ShippedRegistryTests(unittest.TestCase):
    def test_instances_ini_lists_dev_testing_prod_in_that_order(self) -> None:
        parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"))
        parser.read(ROOT / "instances.ini", encoding="utf-8")
        self.assertEqual(parser.sections(), EXAMPLE_INSTANCES)

    def test_only_prod_is_protected_and_paths_are_under_instance(self) -> None:
        instances = safe_db_update.load_instances(ROOT / "instances.ini")
        self.assertEqual([(i.name, i.protected) for i in instances],
                         [("dev", False), ("testing", False), ("prod", True)])
        for instance in instances:
            self.assertEqual(instance.path, ROOT / "instance" / f"{instance.name}.db")


class NoTerminalTests(ProjectTestCase):
    """Confirmations without a terminal are refused, never asked."""

    def test_a_destructive_migration_without_yes_is_refused_and_changes_nothing(self) -> None:
        self.create()
        self.write_migration("0003_drop_payment.sql", "-- migrate:up\nDROP TABLE payment;\n")
        before = sha256(self.db())
        result = self.run_script("database_migration.py", "migrate", "dev")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("--yes", result.stderr)
        self.assertIn("DROP TABLE", result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        self.assertEqual(sha256(self.db()), before)
        self.assertEqual(self.backups(), [])

    def test_the_same_destructive_migration_with_yes_is_applied(self) -> None:
        self.create()
        self.write_migration("0003_drop_payment.sql", "-- migrate:up\nDROP TABLE payment;\n")
        result = self.run_script("database_migration.py", "migrate", "dev", "--yes")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(query(self.db(), "SELECT name FROM sqlite_master WHERE name = 'payment'"), [])
        self.assertEqual(len(self.backups()), 1)

    def test_restore_without_a_terminal_is_refused_and_mentions_yes(self) -> None:
        for name in ("dev", "prod"):            # prod is protected: the typed-name prompt
            with self.subTest(instance=name):
                self.create(name)
                self.assertEqual(self.run_script("safe_db_update.py", "backup", name).returncode, 0)
                before, backups = sha256(self.db(name)), self.backups(name)
                result = self.run_script("safe_db_update.py", "restore", name)
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertIn("--yes", result.stderr)
                self.assertNotIn("Traceback", result.stdout + result.stderr)
                self.assertEqual(self.backups(name), backups)
                self.assertEqual(sha256(self.db(name)), before)


class UserErrorTests(ProjectTestCase):
    """A user's mistake prints one line and no traceback, in a real process."""

    def setUp(self) -> None:
        super().setUp()
        self.create()

    def assertUserError(self, result: subprocess.CompletedProcess, code: int) -> None:
        self.assertEqual(result.returncode, code, result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        self.assertTrue(result.stderr.strip(), "no message on stderr")

    def test_mistakes_on_the_command_line_never_print_a_traceback(self) -> None:
        for script, argv, code in (
                ("database_migration.py", ["check", "nosuch"], 2),
                ("safe_db_update.py", ["info", "nosuch"], 2),
                ("database_migration.py", ["migrate", "prod"], 1),
                ("safe_db_update.py", ["backup", "prod"], 1),
                ("safe_db_update.py", ["verify", "dev", "no-such-backup.db"], 1),
                ("database_migration.py", ["migrate", "dev", "--to", "two"], 2),
                ("database_migration.py", ["migrate", "dev", "--to", "9"], 2),
                ("database_migration.py", ["frobnicate"], 2),
                ("safe_db_update.py", ["backup", "dev", "--all"], 2)):
            with self.subTest(script=script, argv=argv):
                self.assertUserError(self.run_script(script, *argv), code)

    def test_mistakes_in_the_files_never_print_a_traceback(self) -> None:
        cases = (
            ("bad ini", lambda: self.config.write_text("[dev]\npth = x\n", encoding="utf-8"), 2),
            ("bad migration name", lambda: self.write_migration("0003.sql", "SELECT 1;"), 2),
            ("empty up part", lambda: self.write_migration("0003_empty.sql", "-- migrate:up\n"), 2),
            ("not a database", lambda: self.db().write_bytes(b"plain text\n" * 50), 1),
        )
        for case, make_mistake, code in cases:
            with self.subTest(case=case):
                config, dev = self.config.read_text(encoding="utf-8"), self.db().read_bytes()
                make_mistake()
                try:
                    for script, argv in (("database_migration.py", ["migrate", "dev"]),
                                         ("database_migration.py", ["check", "dev"])):
                        self.assertUserError(self.run_script(script, *argv), code)
                finally:
                    self.config.write_text(config, encoding="utf-8")
                    self.db().write_bytes(dev)
                    for path in self.migrations_dir.glob("0003*"):
                        path.unlink()
