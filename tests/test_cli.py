"""The two CLIs as functions: registry errors, lookup order, global options, exit codes, JSON."""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from tests.support import ROOT, ProjectTestCase, database_migration, query, safe_db_update, sha256

ISO_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
SHA256 = re.compile(r"[0-9a-f]{64}")

# One way to call every command the contract names; '{name}' is the instance.
MIGRATION_COMMANDS = {
    "status": ["status", "{name}"],
    "check": ["check", "{name}"],
    "migrate": ["migrate", "{name}", "--create"],
    "migrate-all": ["migrate-all", "--create"],
    "backup": ["backup", "{name}"],
    "baseline": ["baseline", "{name}", "--to", "1"],
    "adopt": ["adopt", "{name}"],
    "rollback": ["rollback", "{name}", "--to", "1", "--yes"],
    "new": ["new", "add loan status"],
    "diff": ["diff", "{name}", "prod"],
    "history": ["history", "{name}"],
}
SAFE_COMMANDS = {
    "backup": ["backup", "{name}"],
    "backup --all": ["backup", "--all"],
    "list-backups": ["list-backups", "{name}"],
    "verify": ["verify", "{name}"],
    "restore": ["restore", "{name}", "--yes"],
    "check": ["check", "{name}"],
    "info": ["info", "{name}"],
    "prune": ["prune", "{name}", "--keep", "1", "--yes"],
}
TABLES = {database_migration: MIGRATION_COMMANDS, safe_db_update: SAFE_COMMANDS}

INI_ERRORS = {
    # case: (instances.ini text, the section the message must name, another word it must name)
    "bad instance name": ("[dev]\npath = instance/dev.db\n\n[bad name!]\npath = instance/bad.db\n",
                          "[bad name!]", ""),
    "missing path": ("[dev]\npath = instance/dev.db\n\n[prod]\nprotected = yes\n", "[prod]", "path"),
    "unknown key": ("[dev]\npth = instance/dev.db\n", "[dev]", "pth"),
    "path in DEFAULT": ("[DEFAULT]\npath = instance/dev.db\n\n[dev]\nprotected = no\n",
                        "[DEFAULT]", "path"),
    "path is a folder": ("[dev]\npath = instance\n", "[dev]", "folder"),
    "duplicate section": ("[dev]\npath = instance/dev.db\n\n[dev]\npath = instance/other.db\n",
                          "dev", ""),
    "line that is not key = value": ("[dev]\npath = instance/dev.db\nthis is not a setting\n",
                                     "[dev]", "line 3"),
    "keep_backups not a number": ("[dev]\npath = instance/dev.db\nkeep_backups = many\n",
                                  "[dev]", "keep_backups"),
    "protected not a boolean": ("[dev]\npath = instance/dev.db\nprotected = maybe\n",
                                "[dev]", "protected"),
}


def commands_of(module) -> list[str]:
    """The commands the module's parser knows."""
    parser = module.build_parser()
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            return list(action.choices)
    raise AssertionError(f"{module.__name__} has no commands")


def command_lines(module, name: str | None = "dev", named_only: bool = False):
    """(label, argv) for every command of the module the parser knows."""
    known = commands_of(module)
    for label, template in TABLES[module].items():
        if template[0] not in known or (named_only and "{name}" not in template):
            continue
        yield f"{module.PROG} {label}", [part.replace("{name}", name) for part in template]


def run_main(module, *argv: str) -> tuple[int, str, str]:
    """A CLI's main() with exactly these arguments (no --config added), stdin not a terminal."""
    database_migration._loaded.clear()
    out, err, stdin = io.StringIO(), io.StringIO(), sys.stdin
    sys.stdin = io.StringIO("")
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = module.main(list(argv))
            except SystemExit as exc:
                code = exc.code
    finally:
        sys.stdin = stdin
    return code, out.getvalue(), err.getvalue()


class CliTestCase(ProjectTestCase):
    """Shortcuts for the two CLIs run in this process."""

    def mig(self, *argv: str) -> tuple[int, str, str]:
        return self.run_cli(database_migration, *argv)

    def safe(self, *argv: str) -> tuple[int, str, str]:
        return self.run_cli(safe_db_update, *argv)

    def json_of(self, module, *argv: str, code: int = 0):
        actual, out, err = self.run_cli(module, *argv)
        self.assertEqual(actual, code, err)
        self.assertNoTraceback(err)
        return json.loads(out)

    def add_third_migration(self, sql: str = "ALTER TABLE loan ADD COLUMN note TEXT;") -> None:
        self.write_migration("0003_third.sql", f"-- migrate:up\n{sql}\n")

    def snapshot(self) -> dict:
        """Every file and folder under the project with size and modification time."""
        found = {}
        for path in self.root.rglob("*"):
            info = path.stat()
            found[str(path.relative_to(self.root))] = (info.st_size, info.st_mtime_ns)
        return found

    def assertSameKeys(self, data: dict, keys: set) -> None:
        self.assertLessEqual(keys, set(data), f"missing keys: {keys - set(data)}")

    def assertInt(self, value) -> None:
        self.assertIs(type(value), int, value)

    def assertAbsoluteFile(self, value) -> None:
        self.assertIsInstance(value, str)
        self.assertTrue(Path(value).is_absolute(), value)
        self.assertTrue(Path(value).is_file(), value)


class CommandTableTests(CliTestCase):
    def test_every_command_of_both_parsers_is_exercised_by_these_tests(self) -> None:
        for module, table in TABLES.items():
            with self.subTest(module=module.PROG):
                covered = {argv[0] for argv in table.values()}
                self.assertLessEqual(set(commands_of(module)), covered)


class RegistryErrorTests(CliTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.create("dev")

    def assertRefusedUntouched(self, argv: list[str], *words: str, code: int = 2) -> str:
        before = self.snapshot()
        dev = sha256(self.db("dev"))
        module = database_migration if argv[0] == database_migration.PROG else safe_db_update
        actual, out, err = self.run_cli(module, *argv[1:])
        self.assertEqual(actual, code, err)
        self.assertNoTraceback(out + err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        for word in words:
            self.assertIn(word, err)
        self.assertEqual(self.snapshot(), before)
        self.assertEqual(sha256(self.db("dev")), dev)
        return err

    def every_command(self, named_only: bool = False, name: str = "dev"):
        for module in TABLES:
            for label, argv in command_lines(module, name, named_only):
                yield label, [module.PROG, *argv]

    def test_each_registry_mistake_exits_2_naming_the_file_and_the_section_for_every_command(self) -> None:
        for case, (text, section, word) in INI_ERRORS.items():
            self.config.write_text(text, encoding="utf-8")
            for label, argv in self.every_command():
                with self.subTest(case=case, command=label):
                    err = self.assertRefusedUntouched(argv, str(self.config), word)
                    self.assertIn(section, err.replace(str(self.config), ""))

    def test_an_ini_that_is_not_an_ini_file_exits_2_naming_the_file(self) -> None:
        self.config.write_text("this is not an ini file\n", encoding="utf-8")
        for label, argv in self.every_command():
            with self.subTest(command=label):
                self.assertRefusedUntouched(argv, str(self.config))

    def test_a_missing_ini_given_with_config_exits_2_naming_it(self) -> None:
        missing = self.root / "nowhere" / "instances.ini"
        for module in TABLES:
            for label, argv in command_lines(module):
                with self.subTest(command=label):
                    code, out, err = run_main(module, "--config", str(missing), *argv)
                    self.assertEqual(code, 2, err)
                    self.assertIn(str(missing), err)
                    self.assertNoTraceback(out + err)
                    self.assertFalse(missing.parent.exists())

    def test_an_unknown_instance_name_exits_2_listing_the_known_ones_for_every_command(self) -> None:
        for label, argv in self.every_command(named_only=True, name="nosuch"):
            with self.subTest(command=label):
                self.assertRefusedUntouched(argv, "nosuch", "dev", "prod")
                self.assertFalse(self.db("nosuch").exists())


class RegistryLookupTests(CliTestCase):
    """Which instances.ini is read, and how its paths resolve (real processes)."""

    def setUp(self) -> None:
        super().setUp()
        elsewhere = tempfile.TemporaryDirectory()
        self.addCleanup(elsewhere.cleanup)
        self.elsewhere = Path(elsewhere.name)

    def registry(self, folder: Path, name: str) -> Path:
        """An instances.ini in folder whose only instance is called name."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "migrations").mkdir(exist_ok=True)
        config = folder / "instances.ini"
        config.write_text(f"[{name}]\npath = data/{name}.db\n", encoding="utf-8")
        return config

    def status(self, *argv: str, cwd: Path, env: dict | None = None) -> dict:
        environment = {k: v for k, v in os.environ.items() if k != "DB_MIGRATION_CONFIG"}
        result = subprocess.run([sys.executable, str(ROOT / "database_migration.py"), "status",
                                 "--json", *argv], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, cwd=cwd, timeout=60,
                                env={**environment, **(env or {})})
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout)

    def names(self, data: dict) -> list[str]:
        return [row["name"] for row in data["instances"]]

    def test_config_option_wins_over_the_environment_and_the_working_directory(self) -> None:
        given = self.registry(self.root / "given", "given")
        env = self.registry(self.root / "env", "fromenv")
        self.registry(self.elsewhere, "fromcwd")
        data = self.status("--config", str(given), cwd=self.elsewhere,
                           env={"DB_MIGRATION_CONFIG": str(env)})
        self.assertEqual(self.names(data), ["given"])

    def test_the_environment_variable_wins_over_the_working_directory(self) -> None:
        env = self.registry(self.root / "env", "fromenv")
        self.registry(self.elsewhere, "fromcwd")
        data = self.status(cwd=self.elsewhere, env={"DB_MIGRATION_CONFIG": str(env)})
        self.assertEqual(self.names(data), ["fromenv"])

    def test_instances_ini_in_the_working_directory_is_used_without_option_or_variable(self) -> None:
        self.registry(self.elsewhere, "fromcwd")
        data = self.status(cwd=self.elsewhere)
        self.assertEqual(self.names(data), ["fromcwd"])
        self.assertEqual(data["instances"][0]["path"], str(self.elsewhere / "data" / "fromcwd.db"))

    def test_relative_paths_resolve_against_the_ini_folder_not_the_working_directory(self) -> None:
        result = self.run_script("database_migration.py", "migrate", "dev", "--create",
                                 cwd=self.elsewhere)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(self.db("dev").is_file())
        self.assertEqual(list(self.elsewhere.iterdir()), [])
        self.assertEqual(query(self.db("dev"), "SELECT MAX(version) FROM schema_migrations"), [(2,)])


class InlineCommentTests(CliTestCase):
    ini = ("[DEFAULT]\nkeep_backups = 5   # five\nbusy_timeout = 2 ; seconds\n\n"
           "[dev]\npath = instance/dev.db   ; the development copy\n\n"
           "[prod]\npath = instance/prod.db   # the real one\nprotected = yes   ; typed name\n")

    def test_comments_after_values_are_not_part_of_the_values(self) -> None:
        data = self.json_of(database_migration, "status", "--json")
        self.assertEqual([row["path"] for row in data["instances"]],
                         [str(self.db("dev")), str(self.db("prod"))])
        self.assertEqual(self.instance("dev").keep_backups, 5)
        self.assertTrue(self.instance("prod").protected)
        self.assertFalse(self.instance("dev").protected)

    def test_a_database_is_created_at_the_path_without_its_comment(self) -> None:
        self.create("dev")
        self.assertEqual(sorted(p.name for p in (self.root / "instance").iterdir()), ["dev.db"])


class GlobalOptionTests(CliTestCase):
    def test_json_works_before_and_after_the_command(self) -> None:
        for argv in (["--json", "status"], ["status", "--json"]):
            with self.subTest(argv=argv):
                data = self.json_of(database_migration, *argv)
                self.assertEqual([row["name"] for row in data["instances"]], ["dev", "prod"])

    def test_quiet_works_before_and_after_the_command(self) -> None:
        self.create()
        for module, argv in ((database_migration, ["-q", "status"]),
                             (database_migration, ["status", "--quiet"]),
                             (safe_db_update, ["-q", "backup", "dev"]),
                             (safe_db_update, ["backup", "dev", "-q"])):
            with self.subTest(argv=argv):
                code, out, err = self.run_cli(module, *argv)
                self.assertEqual((code, out, err), (0, "", ""))

    def test_yes_works_before_and_after_the_command(self) -> None:
        self.create()
        self.assertEqual(self.safe("backup", "dev")[0], 0)
        for argv in (["-y", "restore", "dev"], ["restore", "dev", "--yes"]):
            with self.subTest(argv=argv):
                code, _, err = self.safe(*argv)
                self.assertEqual(code, 0, err)
        self.assertEqual(len([b for b in self.backups() if b.name.endswith("-pre-restore.db")]), 2)

    def test_config_works_before_and_after_the_command(self) -> None:
        for argv in (["--config", str(self.config), "status", "--json"],
                     ["status", "--json", "--config", str(self.config)]):
            with self.subTest(argv=argv):
                code, out, err = run_main(database_migration, *argv)
                self.assertEqual(code, 0, err)
                self.assertEqual(json.loads(out)["instances"][0]["path"], str(self.db("dev")))

    def test_version_exits_0_on_every_command_of_both_clis(self) -> None:
        for module in TABLES:
            for argv in [[]] + [[command] for command in commands_of(module)]:
                with self.subTest(module=module.PROG, argv=argv):
                    code, out, err = self.run_cli(module, *argv, "--version")
                    self.assertEqual(code, 0, err)
                    self.assertIn(module.VERSION, out + err)

    def test_json_wins_over_quiet(self) -> None:
        self.create()
        for module, argv in ((database_migration, ["status"]), (safe_db_update, ["backup", "dev"]),
                             (safe_db_update, ["info", "dev"])):
            with self.subTest(argv=argv):
                data = self.json_of(module, "-q", *argv, "--json")
                self.assertIsInstance(data, dict)

    def test_quiet_prints_nothing_on_stdout_after_a_migration(self) -> None:
        code, out, err = self.mig("-q", "migrate", "dev", "--create")
        self.assertEqual((code, out, err), (0, "", ""))
        self.assertTrue(self.db("dev").is_file())

    def test_errors_go_to_stderr_even_when_quiet(self) -> None:
        for module in TABLES:
            with self.subTest(module=module.PROG):
                code, out, err = self.run_cli(module, "-q", "backup", "dev")
                self.assertEqual(code, 1)
                self.assertEqual(out, "")
                self.assertIn("dev", err)
                self.assertNoTraceback(err)


class ExitCodeTests(CliTestCase):
    def test_status_of_a_missing_database_exits_0_with_state_missing(self) -> None:
        data = self.json_of(database_migration, "status", "--json")
        row = data["instances"][0]
        self.assertEqual((row["state"], row["exists"], row["current_version"]), ("missing", False, None))
        self.assertEqual(row["pending"], [1, 2])
        self.assertFalse(self.db("dev").exists())

    def test_status_of_a_file_that_is_not_sqlite_exits_1_with_state_error(self) -> None:
        self.db("dev").write_bytes(b"this is a text file, not a database\n" * 10)
        data = self.json_of(database_migration, "status", "--json", code=1)
        states = {row["name"]: row["state"] for row in data["instances"]}
        self.assertEqual(states, {"dev": "error", "prod": "missing"})

    def test_backup_of_a_missing_database_exits_1_and_makes_no_backup(self) -> None:
        for module in TABLES:
            with self.subTest(module=module.PROG):
                code, out, err = self.run_cli(module, "backup", "dev")
                self.assertEqual(code, 1, err)
                self.assertIn(str(self.db("dev")), err)
                self.assertNoTraceback(err)
                self.assertEqual(self.backups(), [])
                self.assertFalse(self.db("dev").exists())


class StatusAndCheckJsonTests(CliTestCase):
    STATUS_KEYS = {"name", "path", "exists", "current_version", "latest_version", "pending",
                   "state", "last_backup"}
    CHECK_KEYS = {"name", "path", "current_version", "latest_version", "applied", "pending",
                  "problems", "consistent"}

    def test_status_json_has_absolute_paths_integer_versions_and_the_last_backup(self) -> None:
        self.create()
        self.safe("backup", "dev")
        dev, prod = self.json_of(database_migration, "status", "--json")["instances"]
        for row in (dev, prod):
            self.assertSameKeys(row, self.STATUS_KEYS)
            self.assertTrue(Path(row["path"]).is_absolute())
            self.assertInt(row["latest_version"])
        self.assertEqual((dev["state"], dev["exists"], dev["current_version"], dev["pending"]),
                         ("up to date", True, 2, []))
        self.assertInt(dev["current_version"])
        self.assertRegex(dev["last_backup"], ISO_UTC)
        self.assertIsNone(prod["last_backup"])

    def test_status_json_lists_the_pending_versions(self) -> None:
        self.create()
        self.add_third_migration()
        dev = self.json_of(database_migration, "status", "--json")["instances"][0]
        self.assertEqual((dev["state"], dev["current_version"], dev["latest_version"], dev["pending"]),
                         ("pending", 2, 3, [3]))

    def test_check_json_reports_applied_migrations_as_stored(self) -> None:
        self.create()
        data = self.json_of(database_migration, "check", "dev", "--json")
        self.assertSameKeys(data, self.CHECK_KEYS)
        self.assertEqual((data["name"], data["path"]), ("dev", str(self.db("dev"))))
        self.assertEqual((data["current_version"], data["latest_version"]), (2, 2))
        self.assertEqual((data["pending"], data["problems"]), ([], []))
        self.assertIs(data["consistent"], True)
        stored = query(self.db("dev"), "SELECT version, description, applied_at "
                                       "FROM schema_migrations ORDER BY version")
        self.assertEqual([{"version": v, "description": d, "applied_at": a, "checksum_ok": True}
                          for v, d, a in stored], data["applied"])

    def test_check_is_not_consistent_while_migrations_are_pending(self) -> None:
        self.create()
        self.add_third_migration()
        data = self.json_of(database_migration, "check", "dev", "--json", code=1)
        self.assertIs(data["consistent"], False)
        self.assertEqual(data["pending"], [3])

    def test_check_reports_a_changed_migration_as_a_problem(self) -> None:
        self.create()
        self.write_migration("0002_add_reset_fields.sql",
                             "ALTER TABLE user ADD COLUMN reset_token TEXT;\n")
        data = self.json_of(database_migration, "check", "dev", "--json", code=1)
        self.assertEqual([a["checksum_ok"] for a in data["applied"]], [True, False])
        self.assertIs(data["consistent"], False)
        self.assertTrue(any("2" in problem for problem in data["problems"]), data["problems"])


class MigrateJsonTests(CliTestCase):
    KEYS = {"name", "from_version", "to_version", "applied", "backup", "dry_run", "seconds"}

    def assertMigrateShape(self, data: dict) -> None:
        self.assertSameKeys(data, self.KEYS)
        for key in ("from_version", "to_version"):
            self.assertInt(data[key])
        for version in data["applied"]:
            self.assertInt(version)
        self.assertIsInstance(data["dry_run"], bool)
        self.assertIsInstance(data["seconds"], (int, float))
        self.assertNotIsInstance(data["seconds"], bool)

    def test_migrate_json_after_create_starts_at_0_with_no_backup(self) -> None:
        data = self.json_of(database_migration, "migrate", "dev", "--create", "--json")
        self.assertMigrateShape(data)
        self.assertEqual((data["name"], data["from_version"], data["to_version"], data["applied"],
                          data["backup"], data["dry_run"]), ("dev", 0, 2, [1, 2], None, False))
        self.assertEqual(self.backups(), [])

    def test_migrate_json_names_the_verified_pre_migrate_backup(self) -> None:
        self.create()
        self.add_third_migration()
        data = self.json_of(database_migration, "migrate", "dev", "--json")
        self.assertMigrateShape(data)
        self.assertEqual((data["from_version"], data["to_version"], data["applied"]), (2, 3, [3]))
        self.assertAbsoluteFile(data["backup"])
        self.assertEqual(self.backups(), [Path(data["backup"])])
        self.assertRegex(Path(data["backup"]).name, r"^dev-\d{8}T\d{12}Z-pre-migrate\.db$")

    def test_migrate_dry_run_json_says_what_would_be_applied_and_changes_nothing(self) -> None:
        self.create()
        self.add_third_migration()
        before = sha256(self.db("dev"))
        data = self.json_of(database_migration, "migrate", "dev", "--dry-run", "--json")
        self.assertMigrateShape(data)
        self.assertEqual((data["to_version"], data["applied"], data["dry_run"], data["backup"]),
                         (3, [3], True, None))
        self.assertEqual(sha256(self.db("dev")), before)

    def test_migrate_all_json_reports_each_instance_in_file_order(self) -> None:
        data = self.json_of(database_migration, "migrate-all", "--create", "--json")
        self.assertEqual([r["name"] for r in data["instances"]], ["dev", "prod"])
        for row in data["instances"]:
            self.assertMigrateShape(row)
            self.assertEqual((row["result"], row["error"], row["applied"]), ("ok", None, [1, 2]))

    def test_migrate_all_json_marks_a_failure_and_skips_the_rest(self) -> None:
        self.db("dev").write_bytes(b"not a database at all\n" * 20)
        data = self.json_of(database_migration, "migrate-all", "--create", "--json", code=1)
        dev, prod = data["instances"]
        self.assertEqual(dev["result"], "failed")
        self.assertIsInstance(dev["error"], str)
        self.assertEqual(prod["result"], "skipped")
        self.assertFalse(self.db("prod").exists())

    def test_migrate_all_keep_going_goes_on_after_a_failure(self) -> None:
        self.db("dev").write_bytes(b"not a database at all\n" * 20)
        data = self.json_of(database_migration, "migrate-all", "--create", "--keep-going",
                            "--json", code=1)
        self.assertEqual([r["result"] for r in data["instances"]], ["failed", "ok"])
        self.assertTrue(self.db("prod").is_file())


class BackupJsonTests(CliTestCase):
    KEYS = {"name", "path", "size", "sha256", "seconds", "reason", "verified"}
    MANIFEST_KEYS = {"sha256", "size", "created_at", "source", "schema_version", "reason",
                     "sqlite_version", "verified"}

    def setUp(self) -> None:
        super().setUp()
        self.create()

    def assertBackupShape(self, data: dict, name: str = "dev") -> None:
        self.assertSameKeys(data, self.KEYS)
        self.assertEqual((data["name"], data["reason"]), (name, "manual"))
        self.assertAbsoluteFile(data["path"])
        self.assertInt(data["size"])
        self.assertEqual(data["size"], Path(data["path"]).stat().st_size)
        self.assertEqual(data["sha256"], sha256(Path(data["path"])))
        self.assertIs(data["verified"], True)
        self.assertIsInstance(data["seconds"], (int, float))

    def test_backup_json_of_both_clis_describes_the_file_written(self) -> None:
        for module in TABLES:
            with self.subTest(module=module.PROG):
                self.assertBackupShape(self.json_of(module, "backup", "dev", "--json"))

    def test_backup_all_json_lists_every_instance(self) -> None:
        self.create("prod")
        data = self.json_of(safe_db_update, "backup", "--all", "--json")
        self.assertEqual([b["name"] for b in data["backups"]], ["dev", "prod"])
        for backup in data["backups"]:
            self.assertBackupShape(backup, backup["name"])

    def test_backup_file_name_manifest_and_modes_follow_the_contract(self) -> None:
        path = Path(self.json_of(safe_db_update, "backup", "dev", "--json")["path"])
        self.assertEqual(path.parent, self.root / "backups" / "dev" / "database")
        self.assertRegex(path.name, r"^dev-\d{8}T\d{12}Z-manual\.db$")
        manifest_path = Path(f"{path}.json")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        self.assertEqual(set(manifest), self.MANIFEST_KEYS)
        self.assertRegex(manifest["created_at"], ISO_UTC)
        self.assertRegex(manifest["sha256"], SHA256)
        self.assertEqual((manifest["sha256"], manifest["size"]), (sha256(path), path.stat().st_size))
        self.assertEqual((manifest["source"], manifest["schema_version"], manifest["reason"]),
                         (str(self.db("dev")), 2, "manual"))
        self.assertEqual(manifest["sqlite_version"], sqlite3.sqlite_version)
        self.assertIs(manifest["verified"], True)
        for folder in (self.root / "backups" / "dev", path.parent):
            self.assertEqual(stat.S_IMODE(folder.stat().st_mode), 0o700, folder)
        for file in (path, manifest_path):
            self.assertEqual(stat.S_IMODE(file.stat().st_mode), 0o600, file)

    def test_list_backups_json_is_newest_first_with_the_contract_keys(self) -> None:
        first = self.json_of(safe_db_update, "backup", "dev", "--json")["path"]
        second = self.json_of(database_migration, "backup", "dev", "--json")["path"]
        data = self.json_of(safe_db_update, "list-backups", "dev", "--json")
        self.assertEqual(data["name"], "dev")
        self.assertEqual([b["path"] for b in data["backups"]], [second, first])
        for backup in data["backups"]:
            self.assertSameKeys(backup, {"path", "created_at", "size", "schema_version", "reason",
                                         "sha256"})
            self.assertRegex(backup["created_at"], ISO_UTC)
            self.assertInt(backup["size"])
            self.assertEqual((backup["schema_version"], backup["reason"]), (2, "manual"))
            self.assertEqual(backup["sha256"], sha256(Path(backup["path"])))
        self.assertGreater(data["backups"][0]["created_at"], data["backups"][1]["created_at"])

    def test_info_json_has_every_key_of_the_contract(self) -> None:
        backup = self.json_of(safe_db_update, "backup", "dev", "--json")["path"]
        data = self.json_of(safe_db_update, "info", "dev", "--json")
        self.assertSameKeys(data, {"name", "path", "size", "sqlite_version", "page_size",
                                   "page_count", "freelist_count", "journal_mode",
                                   "schema_version", "tables", "indexes", "views", "triggers",
                                   "backups"})
        self.assertEqual((data["name"], data["path"]), ("dev", str(self.db("dev"))))
        for key in ("size", "page_size", "page_count", "freelist_count", "schema_version"):
            self.assertInt(data[key])
        self.assertEqual(data["size"], self.db("dev").stat().st_size)
        self.assertEqual(data["schema_version"], 2)
        tables = {t["name"]: t for t in data["tables"]}
        self.assertEqual(tables["payment"], {"name": "payment", "rows": 2,
                                             "columns": ["id", "loan_id", "amount"]})
        self.assertEqual(tables["user"]["columns"],
                         ["id", "email", "name", "reset_token", "reset_token_expires"])
        self.assertEqual(data["backups"], {"count": 1, "newest": backup})
        for key in ("indexes", "views", "triggers"):
            self.assertIsInstance(data[key], list)
