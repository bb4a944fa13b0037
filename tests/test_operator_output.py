"""Issue 11: output an operator can use: pipes, JSON on failure, one vocabulary, names,
--help, messages that name the instance and the next step, and the newcomer's path.

Every test drives the CLIs as real processes with no terminal (stdin closed), on real
SQLite files in a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import unittest
from contextlib import closing
from pathlib import Path

from tests.support import ROOT, ProjectTestCase, query

MANUAL = ROOT / "DATABASE_MIGRATION_README.md"
DM, SDU = "database_migration.py", "safe_db_update.py"


def clean_environment() -> dict:
    return {k: v for k, v in os.environ.items() if k != "DB_MIGRATION_CONFIG"}


class OperatorTestCase(ProjectTestCase):
    """The loan-app project; helpers to run the scripts as processes."""

    def cli(self, script: str, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return self.run_script(script, *argv, env={**clean_environment(), **(env or {})})

    def ok(self, script: str, *argv: str) -> subprocess.CompletedProcess:
        result = self.cli(script, *argv)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result

    def one_document(self, result: subprocess.CompletedProcess) -> dict:
        """stdout is exactly one JSON document (json.loads refuses two)."""
        self.assertTrue(result.stdout.strip(), f"empty stdout; stderr: {result.stderr}")
        return json.loads(result.stdout)

    def history(self, name: str = "dev") -> list[dict]:
        return self.one_document(self.ok(DM, "history", name, "--json"))["entries"]


# --- Pipes and streams -------------------------------------------------------

class ClosedPipeTests(OperatorTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.create("dev")

    def start(self, script: str, *argv: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(ROOT / script), "--config", str(self.config),
                                 *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=clean_environment(), cwd=self.root)

    def finish(self, process: subprocess.Popen) -> tuple[int, str]:
        errors = process.stderr.read().decode()
        process.stderr.close()
        return process.wait(timeout=60), errors

    def test_a_reader_that_has_gone_is_not_an_error(self) -> None:
        # The reader closes before the command writes a byte (the command takes far longer
        # to start), so every write meets a closed pipe, as with '| head -1' on long output.
        for script, argv in ((DM, ("status",)), (DM, ("check", "dev", "--json")),
                             (SDU, ("info", "dev", "--json"))):
            with self.subTest(argv=argv):
                process = self.start(script, *argv)
                process.stdout.close()
                code, errors = self.finish(process)
                self.assertEqual((code, errors), (0, ""))

    def test_reading_one_line_and_closing_stops_the_command_quietly(self) -> None:
        with closing(sqlite3.connect(self.db("dev"))) as conn:     # info --json: about 150 KiB
            conn.executescript("BEGIN;\n"      # one transaction: one sync, not 1,500
                               + "".join(f"CREATE TABLE extra_{i} (id INTEGER PRIMARY KEY);\n"
                                         for i in range(1500)) + "COMMIT;\n")
        for script, argv, first in ((SDU, ("info", "dev", "--json"), "{"),):
            with self.subTest(argv=argv):
                process = self.start(script, *argv)
                line = process.stdout.readline().decode()
                process.stdout.close()
                code, errors = self.finish(process)
                self.assertEqual((line.split()[0], errors), (first, ""))
                self.assertEqual(code, 0)

    def test_a_migrate_all_whose_reader_has_gone_still_migrates_every_instance(self) -> None:
        self.create("prod")
        self.write_migration("0003_add_loan_due_date.sql", "ALTER TABLE loan ADD COLUMN due_date DATE;\n")
        process = self.start(DM, "migrate-all")
        process.stdout.close()
        code, errors = self.finish(process)
        self.assertEqual((code, errors), (0, ""))
        for name in ("dev", "prod"):
            self.assertEqual(query(self.db(name), "SELECT MAX(version) FROM schema_migrations"), [(3,)])

    def test_head_in_a_shell_pipeline(self) -> None:
        command = (f"'{sys.executable}' '{ROOT / DM}' --config '{self.config}' status | head -1; "
                   f"echo \"exit ${{PIPESTATUS[0]}}\"")
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                env=clean_environment(), timeout=60)
        self.assertEqual(result.stdout.splitlines(), [result.stdout.splitlines()[0], "exit 0"])
        self.assertTrue(result.stdout.startswith("instance"), result.stdout)
        self.assertEqual(result.stderr, "")


class JsonOnFailureTests(OperatorTestCase):
    def test_a_failing_command_prints_one_json_document(self) -> None:
        cases = [
            ((DM, "check", "prod", "--json"), 1, "prod: no database at"),
            ((SDU, "info", "prod", "--json"), 1, "prod: no database at"),
            ((SDU, "backup", "prod", "--json"), 1, "prod: no database at"),
            ((DM, "migrate", "nosuch", "--json"), 2, "no instance named 'nosuch'"),
            ((DM, "check", "--json"), 2, "the following arguments are required: NAME"),
        ]
        for (script, *argv), code, words in cases:
            with self.subTest(argv=argv):
                result = self.cli(script, *argv)
                self.assertEqual(result.returncode, code, result.stderr)
                data = self.one_document(result)
                self.assertEqual(data["exit_code"], code)
                self.assertIn(words, data["error"])
                self.assertIn(words, result.stderr)        # the line on stderr is still there
                self.assertNotIn("Traceback", result.stderr)
                if argv[0] == "check" and len(argv) > 2:
                    self.assertEqual((data["command"], data["name"]), ("check", "prod"))

    def test_a_missing_registry_with_json(self) -> None:
        result = subprocess.run([sys.executable, str(ROOT / DM), "--config", "/nope/instances.ini",
                                 "status", "--json"], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, env=clean_environment(), timeout=60)
        self.assertEqual(result.returncode, 2)
        self.assertIn("/nope/instances.ini", self.one_document(result)["error"])

    def test_a_failed_migration_reports_what_it_knew(self) -> None:
        self.create("dev")
        self.write_migration("0003_broken.sql", "INSERT INTO no_such_table VALUES (1);\n")
        result = self.cli(DM, "migrate", "dev", "--json")
        self.assertEqual(result.returncode, 1)
        data = self.one_document(result)
        self.assertEqual((data["name"], data["from_version"], data["to_version"], data["exit_code"]),
                         ("dev", 2, 2, 1))
        self.assertTrue(Path(data["backup"]).is_file())
        self.assertIn("no_such_table", data["error"])

    def test_a_command_that_wrote_its_own_document_adds_none(self) -> None:
        self.create("dev")
        self.write_migration("0003_broken.sql", "INSERT INTO no_such_table VALUES (1);\n")
        result = self.cli(DM, "migrate-all", "--json")
        self.assertEqual(result.returncode, 1)
        self.assertEqual([i["result"] for i in self.one_document(result)["instances"]],
                         ["failed", "skipped"])


# --- One vocabulary -----------------------------------------------------------

class HistoryVocabularyTests(OperatorTestCase):
    def test_entries_say_name_and_created_at_and_versions_are_numbers_or_absent(self) -> None:
        self.ok(DM, "migrate-all", "--create")
        self.assertEqual(self.cli(SDU, "restore", "dev").returncode, 1)     # refused: no terminal
        entries = self.history()
        for entry in entries:
            self.assertLessEqual({"name", "created_at", "user", "host", "command", "operation",
                                  "outcome", "seconds"}, set(entry))
            self.assertFalse({"instance", "time"} & set(entry), entry)
            self.assertRegex(entry["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
            self.assertEqual(entry["name"], "dev")
            for key in ("version_before", "version_after"):
                if key in entry:
                    self.assertIs(type(entry[key]), int, entry)
        create, restore = entries
        self.assertEqual((create["operation"], create["version_after"]), ("migrate", 2))
        self.assertNotIn("version_before", create)           # there was no database
        self.assertEqual((restore["version_before"], restore["version_after"]), (2, 2))
        text = self.ok(DM, "history", "dev").stdout
        self.assertNotIn("None", text)
        self.assertIn("migrate   none -> 2  ok", text)
        self.assertIn("restore   2 -> 2  failed: ", text)

    def test_lines_written_with_the_old_keys_are_read_with_the_new(self) -> None:
        self.create("dev")
        old = {"time": "2026-11-20T02:00:00.000000Z", "instance": "dev", "user": "ann", "host": "h",
               "command": "x", "operation": "backup", "version_before": None,
               "version_after": None, "backup": None, "outcome": "ok", "seconds": 0.1}
        with open(self.root / "backups" / "dev" / "history.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(old) + "\n")
        entry = self.history()[-1]
        self.assertEqual((entry["name"], entry["created_at"]), ("dev", old["time"]))
        self.assertFalse({"instance", "time", "version_before", "version_after"} & set(entry))
        self.assertIn("2026-11-20T02:00:00.000000Z  ann@h  backup    ok", self.ok(DM, "history", "dev").stdout)

    def test_a_failed_entry_names_its_backup_once(self) -> None:
        self.create("dev")
        self.write_migration("0003_broken.sql", "INSERT INTO no_such_table VALUES (1);\n")
        self.assertEqual(self.cli(DM, "migrate", "dev").returncode, 1)
        line = self.ok(DM, "history", "dev").stdout.splitlines()[-1]
        backup = self.history()[-1]["backup"]
        self.assertEqual(line.count(backup), 1, line)

    def test_an_interrupt_is_recorded_as_one(self) -> None:
        self.create("dev")
        self.write_migration("0003_interrupted.py", "import os, signal, time\n\n\ndef up(conn):\n"
                             "    conn.execute('DELETE FROM payment')\n"
                             "    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(30)\n")
        result = self.cli(DM, "migrate", "dev", "--json")
        self.assertEqual(result.returncode, 130, result.stderr)
        self.assertEqual(query(self.db("dev"), "SELECT COUNT(*) FROM payment"), [(2,)])
        data = self.one_document(result)
        self.assertEqual((data["error"], data["exit_code"], data["from_version"]), ("interrupted", 130, 2))
        entry = self.history()[-1]
        self.assertEqual(entry["outcome"], "failed: interrupted (Ctrl-C or SIGINT)")


# --- The started name, and --help --------------------------------------------------

def parser_actions(module) -> dict:
    """{command: [argparse actions]} of a CLI's parser."""
    parser = module.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    return {name: sub._actions for name, sub in commands.choices.items()}


class HelpTests(OperatorTestCase):
    def test_every_argument_of_every_command_is_described(self) -> None:
        import database_migration
        import safe_db_update
        for module in (database_migration, safe_db_update):
            for command, actions in parser_actions(module).items():
                for action in actions:
                    with self.subTest(command=command, argument=action.dest):
                        self.assertTrue(action.help, f"{command} {action.dest} has no help")

    def test_help_shows_the_lookup_order_examples_and_the_manual(self) -> None:
        import database_migration
        import safe_db_update
        for script, module in ((DM, database_migration), (SDU, safe_db_update)):
            top = self.ok(script, "--help").stdout                 # as a process
            self.assertIn(f"usage: {script}", top)
            self.assertIn("DATABASE_MIGRATION_README.md", top)
            self.assertIn(f"  {script} backup prod", self.ok(script, "backup", "--help").stdout)
            for command in parser_actions(module):
                with self.subTest(script=script, command=command):
                    code, text, _ = self.run_cli(module, command, "--help")   # each one, in-process
                    self.assertEqual(code, 0)
                    flat = " ".join(text.split())
                    self.assertIn("$DB_MIGRATION_CONFIG, else ./instances.ini", flat)
                    self.assertIn("beside the scripts", flat)
                    examples = [line for line in text.splitlines()
                                if line.startswith(f"  {script} {command}")]
                    self.assertGreaterEqual(len(examples), 2, text)
                    self.assertIn("DATABASE_MIGRATION_README.md", text)
                    if "NAME" in text.split("\n\n")[0]:
                        self.assertRegex(text, r"\n  NAME +\S")          # NAME is described
                    if "--to V" in text:
                        self.assertRegex(flat, r"--to V [a-z]+ .*V is a version number")

    def test_version_names_the_program_once(self) -> None:
        for script in (DM, SDU):
            with self.subTest(script=script):
                self.assertEqual(self.ok(script, "backup", "--version").stdout.strip(),
                                 f"{script} 1.0.0")


class InstalledCommandsTests(unittest.TestCase):
    """pip install . into a fresh virtual environment; the console scripts know their names.

    The environment is made without a pip of its own (ensurepip takes about 4 seconds):
    it sees the interpreter's packages (--system-site-packages), so its python runs the
    interpreter's pip, which installs into the environment, console scripts and all;
    where the interpreter has no pip, the environment is made again with one. Offline,
    pip builds with the setuptools and wheel already installed (--no-build-isolation
    --no-index); otherwise with its own index. Without either it is skipped, saying why.
    SKIP_VENV_TEST=1 skips it (it takes about 3 seconds).
    """

    @classmethod
    def setUpClass(cls) -> None:
        if os.environ.get("SKIP_VENV_TEST"):
            raise unittest.SkipTest("SKIP_VENV_TEST is set")
        cls.folder = tempfile.TemporaryDirectory()
        root = Path(cls.folder.name)
        source = root / "source"
        source.mkdir()
        for name in ("pyproject.toml", "README.md", DM, SDU):
            shutil.copy2(ROOT / name, source / name)
        venv = root / "venv"
        cls.bin = venv / "bin"
        try:
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                            str(venv)], check=True, capture_output=True, timeout=120)
            if subprocess.run([str(cls.bin / "python"), "-m", "pip", "--version"],
                              capture_output=True).returncode != 0:    # no pip to see: its own
                subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--clear",
                                str(venv)], check=True, capture_output=True, timeout=120)
        except (subprocess.SubprocessError, OSError) as exc:
            cls.folder.cleanup()
            raise unittest.SkipTest(f"cannot make a virtual environment here: {exc}")
        pip = [str(cls.bin / "python"), "-m", "pip", "install", "--quiet", "--no-deps"]
        offline = subprocess.run([str(cls.bin / "python"), "-c", "import setuptools, wheel"],
                                 capture_output=True).returncode == 0
        attempts = ([pip + ["--no-build-isolation", "--no-index", str(source)]] if offline else []) \
            + [pip + ["--retries", "0", "--timeout", "15", str(source)]]   # offline: fail fast
        for attempt in attempts:
            result = subprocess.run(attempt, capture_output=True, text=True, timeout=300,
                                    env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
            if result.returncode == 0:
                return
        cls.folder.cleanup()
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        raise unittest.SkipTest(f"pip could not install the package (no setuptools and wheel "
                                f"offline, and no package index reachable?): {last}")

    @classmethod
    def tearDownClass(cls) -> None:
        cls.folder.cleanup()

    def command(self, name: str, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / name), *argv], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, cwd=cwd or Path(self.folder.name),
                              env=clean_environment(), timeout=120)

    def test_the_console_scripts_use_their_own_names(self) -> None:
        for name in ("database-migration", "safe-db-update"):
            with self.subTest(name=name):
                result = self.command(name, "--help")
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertTrue(result.stdout.startswith(f"usage: {name} "), result.stdout)
                result = self.command(name, "backup", "--help")
                self.assertIn(f"  {name} backup prod", result.stdout)
                self.assertEqual(self.command(name, "backup", "--version").stdout.strip(),
                                 f"{name} 1.0.0")

    def test_they_find_instances_ini_in_the_current_folder_and_name_each_other(self) -> None:
        project = Path(self.folder.name) / "project"
        project.mkdir(exist_ok=True)
        shutil.copy2(ROOT / "instances.ini", project / "instances.ini")
        shutil.copytree(ROOT / "migrations", project / "migrations", dirs_exist_ok=True)
        result = self.command("database-migration", "migrate-all", "--create", cwd=project)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue((project / "instance" / "prod.db").is_file())
        (project / "instance" / "prod.db").unlink()                 # lost: it has an audit trail
        result = self.command("database-migration", "check", "prod", cwd=project)
        self.assertEqual(result.returncode, 1)
        self.assertTrue(result.stderr.startswith("database-migration: error: prod: no database"),
                        result.stderr)
        self.assertIn("'safe-db-update restore prod'", result.stderr)


# --- Messages ---------------------------------------------------------------------

class MessageTests(OperatorTestCase):
    def error_line(self, result: subprocess.CompletedProcess, code: int = 1) -> str:
        self.assertEqual(result.returncode, code, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        return lines[0]

    def test_a_failed_migration_names_the_instance(self) -> None:
        self.create("dev")
        self.write_migration("0003_broken.sql", "INSERT INTO no_such_table VALUES (1);\n")
        for argv in (("migrate", "dev"), ("migrate", "dev", "--dry-run")):
            with self.subTest(argv=argv):
                result = self.cli(DM, *argv)
                text = result.stderr if "--dry-run" not in argv else result.stdout
                self.assertIn("dev: migration 3 (broken) failed: no such table: no_such_table", text)

    def test_migrate_all_prints_each_failure_once(self) -> None:
        self.create("dev")
        self.create("prod")
        self.write_migration("0003_broken.sql", "INSERT INTO no_such_table VALUES (1);\n")
        result = self.cli(DM, "migrate-all", "--keep-going")
        self.assertEqual(result.returncode, 1)
        for name in ("dev", "prod"):
            self.assertEqual((result.stdout + result.stderr).count(f"{name}: migration 3"), 1)
            self.assertIn(f"failed: {name} (its error is above)", result.stdout)

    def test_a_foreign_key_failure_names_the_migration(self) -> None:
        self.create("dev")
        self.write_migration("0003_audit.sql", "CREATE TABLE audit (id INTEGER PRIMARY KEY);\n")
        self.write_migration("0004_drop_users.sql", "DELETE FROM user WHERE id = 1;\n")
        self.write_migration("0005_index.sql", "CREATE INDEX ix_audit ON audit (id);\n")
        line = self.error_line(self.cli(DM, "migrate", "dev", "--yes"))
        self.assertIn("dev: foreign key check failed: loan row 1 refers to a missing row in user", line)
        self.assertIn("migration 0004 drop users is the last in this run that touches loan or user",
                      line)
        self.assertEqual(query(self.db("dev"), "SELECT COUNT(*) FROM user"), [(2,)])

    def test_a_missing_database_points_to_restore_or_create(self) -> None:
        for script, argv in ((DM, ("check", "prod")), (SDU, ("info", "prod")), (SDU, ("backup", "prod"))):
            with self.subTest(argv=argv, had_one=False):
                line = self.error_line(self.cli(script, *argv))
                self.assertIn("prod: no database at", line)
                self.assertIn("'database_migration.py migrate prod --create'", line)
                self.assertNotIn("restore", line)
        self.create("prod")
        self.ok(SDU, "backup", "prod")
        self.db("prod").unlink()
        for script, argv in ((DM, ("check", "prod")), (SDU, ("info", "prod")), (SDU, ("backup", "prod")),
                             (DM, ("migrate", "prod", "--create"))):
            with self.subTest(argv=argv, had_one=True):
                line = self.error_line(self.cli(script, *argv))
                self.assertIn("'safe_db_update.py restore prod'", line)
                self.assertNotIn("add --create", line)

    def test_a_damaged_or_foreign_file_points_to_the_emergency_procedure(self) -> None:
        self.db("dev").write_bytes(b"this is not a database" * 100)
        procedure = ("follow 'The database is corrupted' in the manual's emergency procedures: "
                     "'safe_db_update.py check dev', then 'safe_db_update.py list-backups dev' and "
                     "'safe_db_update.py restore dev FILE'")
        self.assertIn("The database is corrupted", MANUAL.read_text(encoding="utf-8"))
        for script, argv in ((DM, ("migrate", "dev")), (DM, ("check", "dev")), (SDU, ("backup", "dev"))):
            with self.subTest(argv=argv):
                line = self.error_line(self.cli(script, *argv))
                self.assertIn("is not an SQLite database", line)
                self.assertIn(procedure, line)

    def test_a_registry_that_does_not_exist_is_named(self) -> None:
        result = subprocess.run([sys.executable, str(ROOT / DM), "--config", "/nope/instances.ini",
                                 "status"], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, env=clean_environment(), timeout=60)
        self.assertEqual(self.error_line(result, 2),
                         "database_migration.py: error: /nope/instances.ini: the instance "
                         "registry given by --config does not exist; check the path")
        result = self.cli(DM, "status", env={"DB_MIGRATION_CONFIG": "/nope/x.ini"})
        self.assertEqual(result.returncode, 0)      # --config wins over the variable

    def test_an_unfilled_python_migration_says_what_to_write(self) -> None:
        self.ok(DM, "new", "backfill totals", "--python")
        line = self.error_line(self.cli(DM, "status"), 2)
        self.assertIn("0003_backfill_totals.py: no up(conn) function yet: write 'def up(conn):'", line)

    def test_a_failing_python_migration_shows_the_exception_and_its_line(self) -> None:
        self.create("dev")
        self.write_migration("0003_divide.py", "def up(conn):\n"
                             "    rows = conn.execute('SELECT id FROM loan WHERE 0').fetchall()\n"
                             "    share = 100 / len(rows)\n")
        line = self.error_line(self.cli(DM, "migrate", "dev"))
        self.assertIn("dev: migration 3 (divide) failed: ZeroDivisionError: division by zero "
                      "(line 3 of 0003_divide.py: share = 100 / len(rows))", line)


# --- The newcomer's path -------------------------------------------------------------

class NewcomerTests(OperatorTestCase):
    def test_readme_commands_use_python3_and_ci_runs_the_readme_test_command(self) -> None:
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        blocks = re.findall(r"```sh\n(.*?)```", readme, re.DOTALL)
        self.assertEqual([b.strip() for b in blocks],
                         ["python3 database_migration.py migrate-all --create && "
                          "python3 database_migration.py status", "python3 -m unittest"])
        ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        self.assertEqual(ci[-1], "python3 -m unittest")

    def test_the_manual_example_migration_runs_on_the_shipped_example(self) -> None:
        manual = MANUAL.read_text(encoding="utf-8")
        section = manual[manual.index("## Writing migrations"):]
        description = re.search(r'new "([^"]+)"\s+# migrations/(\S+)', section)
        sql = re.search(r"```sql\n(.*?)```", section, re.DOTALL).group(1)
        project = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, project)
        shutil.copy2(ROOT / "instances.ini", project / "instances.ini")
        shutil.copytree(ROOT / "migrations", project / "migrations")

        def run(*argv: str) -> subprocess.CompletedProcess:
            result = subprocess.run([sys.executable, str(ROOT / DM), *argv], capture_output=True,
                                    text=True, stdin=subprocess.DEVNULL, cwd=project,
                                    env=clean_environment(), timeout=120)
            self.assertEqual(result.returncode, 0, result.stderr)
            return result

        run("migrate-all", "--create")
        run("new", description.group(1))
        written = project / "migrations" / description.group(2)
        self.assertTrue(written.is_file(), sorted(os.listdir(project / "migrations")))
        written.write_text(sql, encoding="utf-8")
        run("migrate", "dev", "--dry-run")
        run("migrate", "dev")
        self.assertIn("due_date", [c for (_, c, *_) in query(project / "instance" / "dev.db",
                                                              "PRAGMA table_info(loan)")])
        run("rollback", "dev", "--to", "3", "--yes")

    def test_the_manual_says_what_the_checksum_covers(self) -> None:
        manual = " ".join(MANUAL.read_text(encoding="utf-8").split())
        self.assertTrue("The checksum covers the up part's statements" in manual and
                        "comments after the last statement of the up part" in manual)
        self.create("dev")
        path = self.migrations_dir / "0002_add_reset_fields.sql"
        path.write_text(path.read_text() .replace("-- migrate:down", "-- a note after the last statement\n"
                                                   "-- migrate:down"))
        self.assertEqual(json.loads(self.ok(DM, "check", "dev", "--json").stdout)["state"], "up to date")

    def test_status_on_a_damaged_database_does_not_say_up_to_date(self) -> None:
        self.create("dev")
        with closing(sqlite3.connect(self.db("dev"))) as conn:
            conn.executemany("INSERT INTO user (email, name) VALUES (?, ?)",
                             [(f"u{i}@x", "x" * 200) for i in range(200)])
            conn.commit()
            root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'user'").fetchone()[0]
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        with open(self.db("dev"), "r+b") as handle:     # garbage in the user table's root page
            handle.seek((root - 1) * page_size + 12)
            handle.write(b"\xff" * 64)
        result = self.cli(DM, "status")
        self.assertEqual(result.returncode, 1, result.stdout)
        row = next(line for line in result.stdout.splitlines() if line.startswith("dev "))
        self.assertNotIn("up to date", row)
        self.assertIn(" error ", row)
        self.assertIn("damaged", row)
        self.assertIn("'safe_db_update.py check dev'", row)
        data = self.one_document(self.cli(DM, "status", "--json"))["instances"][0]
        self.assertEqual(data["state"], "error")


# --- The manual lists every JSON document's keys ------------------------------------------

def documented_keys() -> dict[str, str]:
    """{command as written in the manual's JSON table: the text of its keys cell}."""
    manual = MANUAL.read_text(encoding="utf-8")
    table = manual[manual.index("| command | keys |"):]
    table = table[:table.index("\n\n")]
    rows = {}
    for line in table.splitlines()[2:]:
        command, keys = re.match(r"\| `([^`]+)`[^|]*\| (.*) \|$", line).groups()
        rows.setdefault(command, keys)
        if "(safe_db_update)" in line:
            rows["check (safe_db_update)"] = keys
    return rows


class ManualJsonKeysTests(OperatorTestCase):
    """In-process (the same main() the scripts run), for speed."""

    def cli(self, script: str, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
        import database_migration
        import safe_db_update
        module = database_migration if script == DM else safe_db_update
        code, out, err = self.run_cli(module, *argv)
        return subprocess.CompletedProcess(argv, code, out, err)

    def assertDocumented(self, command: str, data: dict, documented: dict) -> None:
        words = set(re.findall(r"[a-z_0-9]+", documented[command]))
        self.assertLessEqual(set(data), words, f"{command}: keys not in the manual")

    def test_every_json_document_has_only_documented_keys(self) -> None:
        documented = documented_keys()
        self.create("dev")
        self.create("prod")
        backup = self.one_document(self.ok(SDU, "backup", "dev", "--json"))
        self.write_migration("0003_add_loan_due_date.sql", "-- migrate:up\nALTER TABLE loan ADD "
                             "COLUMN due_date DATE;\n-- migrate:down\nALTER TABLE loan DROP COLUMN due_date;\n")
        documents = {
            "status": self.one_document(self.ok(DM, "status", "--json")),
            "check": self.one_document(self.cli(DM, "check", "dev", "--json")),
            "migrate": self.one_document(self.ok(DM, "migrate", "dev", "--dry-run", "--json")),
            "migrate-all": self.one_document(self.ok(DM, "migrate-all", "--json")),
            "rollback": self.one_document(self.ok(DM, "rollback", "dev", "--to", "2", "--yes", "--json")),
            "diff": self.one_document(self.cli(DM, "diff", "dev", "prod", "--json")),
            "history": self.one_document(self.ok(DM, "history", "dev", "--json")),
            "new": self.one_document(self.ok(DM, "new", "more", "--json")),
            "backup": backup,
            "list-backups": self.one_document(self.ok(SDU, "list-backups", "dev", "--json")),
            "verify": self.one_document(self.ok(SDU, "verify", "dev", "--json")),
            "restore": self.one_document(self.ok(SDU, "restore", "dev", "--yes", "--json")),
            "check (safe_db_update)": self.one_document(self.ok(SDU, "check", "dev", "--json")),
            "info": self.one_document(self.ok(SDU, "info", "dev", "--json")),
            "prune": self.one_document(self.ok(SDU, "prune", "dev", "--dry-run", "--json")),
            "error": self.one_document(self.cli(DM, "migrate", "testing", "--json")),
        }
        for command, data in documents.items():
            with self.subTest(command=command):
                self.assertDocumented(command, data, documented)
        nested = {"status": documents["status"]["instances"][0],
                  "migrate-all": documents["migrate-all"]["instances"][0],
                  "history": documents["history"]["entries"][0],
                  "list-backups": documents["list-backups"]["backups"][0],
                  "info": documents["info"]["tables"][0],
                  "prune": documents["prune"]["backups"][0],
                  "check": documents["check"]["applied"][0]}
        for command, data in nested.items():
            with self.subTest(command=command, nested=True):
                self.assertDocumented(command, data, documented)
        self.assertDocumented("migrate", documents["migrate"]["rehearsal"], documented)


if __name__ == "__main__":
    unittest.main()
