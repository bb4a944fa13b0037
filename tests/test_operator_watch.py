"""Issue 11: progress on a terminal, readable schema differences, backups with a reason,
status --max-backup-age and status --prometheus (node_exporter's textfile format)."""

from __future__ import annotations

import datetime
import json
import os
import pty
import re
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

from tests.support import ROOT, ProjectTestCase, database_migration, query, safe_db_update

# A migration that takes a while: long enough to pass the 1.5 s before progress shows.
SLOW = '''"""slow step"""
import time


def up(conn):
    time.sleep(2.2)
    conn.execute("CREATE TABLE slow_done (id INTEGER PRIMARY KEY)")
'''


def run_with_stderr_on_a_terminal(argv: list[str], cwd: Path) -> subprocess.Popen:
    """Start a command whose stderr is a pseudo-terminal (stdout a pipe, stdin closed);
    process.terminal_text() then returns all it wrote there."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=follower, cwd=cwd, text=True)
    os.close(follower)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:                 # EIO: the command exited, the terminal is closed
                break
            if not data:
                break
            chunks.append(data)
        os.close(leader)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def terminal_text() -> str:
        process.wait(timeout=60)
        reader.join(timeout=10)
        return b"".join(chunks).decode("utf-8", "replace")

    process.terminal_text = terminal_text
    return process


class ProgressTests(ProjectTestCase):
    """migrate and a dry run say what they are doing on a terminal, and nothing elsewhere."""

    ini = "[DEFAULT]\nbusy_timeout = 5\n\n[dev]\npath = instance/dev.db\n"

    def project(self, label: str) -> Path:
        """A copy of the project at version 2 with the slow migration 0003 pending."""
        folder = self.root / label
        (folder / "instance").mkdir(parents=True)
        (folder / "migrations").mkdir()
        for path in self.migrations_dir.iterdir():
            (folder / "migrations" / path.name).write_bytes(path.read_bytes())
        (folder / "instances.ini").write_text(self.ini, encoding="utf-8")
        created = subprocess.run([sys.executable, str(ROOT / "database_migration.py"), "--config",
                                  str(folder / "instances.ini"), "migrate", "dev", "--create"],
                                 capture_output=True, text=True, stdin=subprocess.DEVNULL)
        self.assertEqual(created.returncode, 0, created.stderr)
        (folder / "migrations" / "0003_slow_step.py").write_text(SLOW, encoding="utf-8")
        return folder

    def command(self, folder: Path, *argv: str) -> list[str]:
        return [sys.executable, str(ROOT / "database_migration.py"), "--config",
                str(folder / "instances.ini"), "migrate", "dev", *argv]

    def test_progress_on_a_terminal_and_none_without_one_or_under_quiet(self) -> None:
        # Four real runs at once (each sleeps 2.2 s in its migration): on a terminal,
        # a dry run on a terminal, --quiet on a terminal, and no terminal at all.
        runs = {label: self.project(label) for label in ("tty", "dry", "quiet", "pipe")}
        tty = run_with_stderr_on_a_terminal(self.command(runs["tty"]), runs["tty"])
        dry = run_with_stderr_on_a_terminal(self.command(runs["dry"], "--dry-run"), runs["dry"])
        quiet = run_with_stderr_on_a_terminal(self.command(runs["quiet"], "--quiet"), runs["quiet"])
        pipe = subprocess.Popen(self.command(runs["pipe"]), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        shown, rehearsed, hushed = tty.terminal_text(), dry.terminal_text(), quiet.terminal_text()
        out, err = pipe.communicate(timeout=60)
        for process in (tty, dry, quiet):
            with process.stdout:
                self.assertEqual(process.returncode, 0, process.stdout.read())
        self.assertEqual(pipe.returncode, 0, err)

        self.assertRegex(shown, r"dev: applying 0003 slow step \(\d+\.\d s so far\)")
        self.assertRegex(shown, r"dev: applying 0003 slow step \(took [2-9]\.\d s\)")
        self.assertRegex(rehearsed, r"dev: dry run: applying 0003 slow step \(\d+\.\d s so far\)")
        self.assertEqual(hushed, "")
        self.assertEqual(err, "")
        self.assertIn("dev: applied 0003 slow step", out)
        self.assertEqual(query(runs["tty"] / "instance" / "dev.db",
                               "SELECT MAX(version) FROM schema_migrations"), [(3,)])
        self.assertEqual(query(runs["dry"] / "instance" / "dev.db",
                               "SELECT MAX(version) FROM schema_migrations"), [(2,)])


class ReadableDifferenceTests(ProjectTestCase):
    """One line per differing column, index, trigger or view, for drift, diff and baseline."""

    def rebuild_loan_with_integer_amount(self, path: Path) -> None:
        with closing(sqlite3.connect(path)) as conn:
            conn.executescript("""
                PRAGMA foreign_keys = OFF;
                BEGIN;
                CREATE TABLE loan_new (id INTEGER PRIMARY KEY,
                                       user_id INTEGER NOT NULL REFERENCES user (id) ON DELETE CASCADE,
                                       amount INTEGER NOT NULL);
                INSERT INTO loan_new SELECT * FROM loan;
                DROP TABLE loan;
                ALTER TABLE loan_new RENAME TO loan;
                COMMIT;
            """)

    def test_drift_says_which_column_differs_and_how(self) -> None:
        self.rebuild_loan_with_integer_amount(self.create())
        with closing(sqlite3.connect(self.db())) as conn:
            conn.execute("ALTER TABLE loan ADD COLUMN status TEXT")
            conn.execute("CREATE INDEX idx_by_hand ON user (name)")
        code, out, err = self.run_cli(database_migration, "check", "dev", "--json")
        self.assertEqual(code, 1, err)
        self.assertEqual(json.loads(out)["drift"], [
            "index idx_by_hand: only in the database",
            "column loan.amount: type NUMERIC in the migrations, INTEGER in the database",
            "column loan.status: only in the database",
        ])

    def test_diff_prints_one_line_per_difference_through_the_cli(self) -> None:
        self.create("dev")
        self.create("prod")
        with closing(sqlite3.connect(self.db("dev"))) as conn:
            conn.execute("CREATE TRIGGER audit AFTER INSERT ON loan BEGIN SELECT 1; END")
            conn.execute("CREATE VIEW big_loans AS SELECT * FROM loan WHERE amount > 100")
        with closing(sqlite3.connect(self.db("prod"))) as conn:
            conn.execute("CREATE TRIGGER audit AFTER INSERT ON loan BEGIN SELECT 2; END")
            conn.execute("ALTER TABLE user DROP COLUMN reset_token_expires")
        result = self.run_script("database_migration.py", "diff", "dev", "prod")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout.splitlines(), [
            "column user.reset_token_expires: only in dev",
            "trigger audit: different SQL",
            "view big_loans: only in dev",
        ])
        self.assertNotIn(" has (", result.stdout)


class BackupReasonTests(ProjectTestCase):
    """backup --reason: the operator's word in the file name and manifest."""

    ini = "[DEFAULT]\nkeep_backups = 2\n\n[dev]\npath = instance/dev.db\n"

    def test_nightly_backups_are_named_listed_and_pruned_as_nightly(self) -> None:
        self.create()
        for night in range(3):
            result = self.run_script("safe_db_update.py", "backup", "dev", "--reason", "nightly",
                                     "--quiet") if night == 0 else None
            code, out, err = (result.returncode, result.stdout, result.stderr) if result else \
                self.run_cli(safe_db_update, "backup", "dev", "--reason", "nightly", "--quiet")
            self.assertEqual((code, out, err), (0, "", ""))
            with closing(sqlite3.connect(self.db())) as conn:   # a new state each night
                conn.execute("INSERT INTO user (email, name) VALUES (?, 'n')", (str(time.time()),))
                conn.commit()
        backups = self.backups()
        self.assertEqual(len(backups), 2)           # keep_backups = 2: retention counts them
        self.assertTrue(all(p.name.endswith("-nightly.db") for p in backups), backups)
        for path in backups:
            manifest = json.loads(Path(f"{path}.json").read_text(encoding="utf-8"))
            self.assertEqual(manifest["reason"], "nightly")
        _, listed, _ = self.run_cli(safe_db_update, "list-backups", "dev", "--json")
        self.assertEqual([b["reason"] for b in json.loads(listed)["backups"]],
                         ["nightly", "nightly"])
        _, made, _ = self.run_cli(database_migration, "backup", "dev", "--reason", "pre-deploy",
                                  "--json")
        self.assertEqual(json.loads(made)["reason"], "pre-deploy")

    def test_the_tools_own_reasons_and_unknown_words_are_refused(self) -> None:
        self.create()
        for reason in ("pre-migrate", "pre-restore", "Nightly", "before-lunch"):
            with self.subTest(reason=reason):
                code, _, err = self.run_cli(safe_db_update, "backup", "dev", "--reason", reason)
                self.assertEqual(code, 2)
                self.assertIn("--reason", err)
                self.assertNotIn("Traceback", err)
        self.assertEqual(self.backups(), [])


def backdate(backup: Path, days: float) -> None:
    """Set a backup's manifest created_at (what status reads) back by days."""
    manifest_path = Path(f"{backup}.json")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days)
    manifest["created_at"] = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")


class MaxBackupAgeTests(ProjectTestCase):
    """status --max-backup-age: the check that tells an operator nightly backups stopped."""

    ini = ("[dev]\npath = instance/dev.db\n\n[prod]\npath = instance/prod.db\n\n"
           "[testing]\npath = instance/testing.db\n")

    def setUp(self) -> None:
        super().setUp()
        for name in ("dev", "prod"):
            self.create(name)
            code, _, err = self.run_cli(safe_db_update, "backup", name, "--reason", "nightly")
            self.assertEqual(code, 0, err)
        backdate(self.backups("prod")[0], days=2)      # prod's nightly stopped two days ago

    def test_an_instance_without_a_recent_verified_backup_exits_1_and_is_named(self) -> None:
        result = self.run_script("database_migration.py", "status", "--max-backup-age", "26h",
                                 "--quiet")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, "")             # --quiet; the problem is on stderr
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, lines)          # testing was never made: not checked
        self.assertRegex(lines[0], r"^database_migration\.py: error: prod: no verified backup in "
                                   r"the last 26h: the newest verified one is from \S+ \(2d ago\)")
        self.assertIn("list-backups prod", lines[0])

    def test_a_longer_limit_passes_and_json_lists_the_stale_instances(self) -> None:
        code, _, err = self.run_cli(database_migration, "status", "--max-backup-age", "3d")
        self.assertEqual((code, err), (0, ""))
        code, out, _ = self.run_cli(database_migration, "status", "--max-backup-age", "90m", "--json")
        self.assertEqual(code, 1)
        data = json.loads(out)
        self.assertEqual((data["stale_backups"], data["max_backup_age_seconds"]), (["prod"], 5400))

    def test_an_instance_with_no_backup_at_all_or_only_a_future_one_is_stale(self) -> None:
        for backup in self.backups("dev"):
            backdate(backup, days=-1)                   # dated in the future: never the newest
        code, _, err = self.run_cli(database_migration, "status", "--max-backup-age", "3d", "--quiet")
        self.assertEqual(code, 1)
        self.assertIn("dev: no verified backup in the last 3d: it has none", err)

    def test_an_age_without_a_unit_is_a_usage_error(self) -> None:
        for text in ("26", "26x", "1.h", "0h"):
            with self.subTest(text=text):
                code, _, err = self.run_cli(database_migration, "status", "--max-backup-age", text)
                self.assertEqual(code, 2)
                self.assertIn("a number and a unit", err)


SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\\n]|\\[\\"n])*)"(?:,|$)')


def parse_textfile(text: str) -> dict[str, dict]:
    """Prometheus' text exposition format, strictly: every family has HELP and TYPE before
    its samples, label values are escaped, no series repeats. {name: {"type", "help",
    "samples": {frozenset(labels): value}}}"""
    families: dict[str, dict] = {}
    assert text.endswith("\n"), "the text must end with a line feed"
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, kind, name, rest = line.split(" ", 3)
            family = families.setdefault(name, {"samples": {}})
            assert kind.lower() not in family, f"second {kind} for {name}"
            assert not family["samples"], f"{kind} after samples of {name}"
            family[kind.lower()] = rest
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        family = families.get(match["name"])
        assert family and "type" in family and "help" in family, f"no HELP/TYPE: {line!r}"
        labels_text, labels = match["labels"] or "", {}
        position = 0
        while position < len(labels_text):
            label = LABEL.match(labels_text, position)
            assert label, f"bad labels in {line!r}"
            value = label["value"].replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
            labels[label["key"]] = value
            position = label.end()
        key = frozenset(labels.items())
        assert key not in family["samples"], f"repeated series: {line!r}"
        family["samples"][key] = float(match["value"])
    return families


def value(families: dict, name: str, **labels: str) -> float | None:
    return families[f"sqlite_migration_{name}"]["samples"].get(frozenset(labels.items()))


class PrometheusTests(ProjectTestCase):
    """status --prometheus: node_exporter's textfile collector format, written atomically."""

    ini = ("[dev]\npath = instance/dev.db\n\n[prod]\npath = instance/prod.db\n\n"
           "[testing]\npath = instance/testing.db\n")

    def test_the_metrics_parse_and_say_versions_state_backups_and_the_last_run(self) -> None:
        self.create("dev")
        self.create("prod")
        self.assertEqual(self.run_cli(safe_db_update, "backup", "dev")[0], 0)
        backdate(self.backups("dev")[0], days=1)
        self.write_migration("0003_add_status.sql", "ALTER TABLE loan ADD COLUMN status TEXT;")
        self.write_migration("0004_broken.sql", "ALTER TABLE nowhere ADD COLUMN x TEXT;")
        self.assertEqual(self.migrate("prod")[0], 1)    # prod's last run failed

        result = self.run_script("database_migration.py", "status", "--prometheus", "-")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        families = parse_textfile(result.stdout)
        for name, family in families.items():
            self.assertTrue(name.startswith("sqlite_migration_"), name)
            self.assertEqual(family["type"], "gauge")
        self.assertEqual(value(families, "current_version", instance="dev"), 2)
        self.assertEqual(value(families, "latest_version", instance="dev"), 4)
        self.assertEqual(value(families, "pending_migrations", instance="prod"), 2)
        states = {dict(k)["state"]: v for k, v in families["sqlite_migration_state"]["samples"].items()
                  if dict(k)["instance"] == "dev"}
        self.assertEqual(states["pending"], 1)
        self.assertEqual(sum(states.values()), 1)
        self.assertEqual(len(states), 8)
        self.assertEqual(value(families, "state", instance="testing", state="missing"), 1)
        self.assertIsNone(value(families, "current_version", instance="testing"))
        age = value(families, "last_backup_age_seconds", instance="dev")
        self.assertAlmostEqual(age, 86400, delta=120)
        made = value(families, "last_backup_timestamp_seconds", instance="dev")
        self.assertAlmostEqual(made, time.time() - 86400, delta=120)
        manifest = json.loads(Path(f"{self.backups('dev')[0]}.json").read_text(encoding="utf-8"))
        self.assertEqual(value(families, "last_backup_size_bytes", instance="dev"), manifest["size"])
        self.assertEqual(value(families, "last_backup_timestamp_seconds", instance="testing"), 0)
        self.assertEqual(value(families, "last_run_success", instance="dev", operation="backup"), 1)
        # prod's failed migrate took a pre-migrate backup, so prod has one too
        self.assertEqual(value(families, "last_run_success", instance="prod", operation="migrate"), 0)
        self.assertIsNone(value(families, "last_run_success", instance="testing", operation=""))

    def test_a_file_is_replaced_whole_and_readable_by_node_exporter(self) -> None:
        self.create("dev")
        target = self.root / "textfile" / "sqlite_migration.prom"
        target.parent.mkdir()
        target.write_text("old\n", encoding="utf-8")
        result = self.run_script("database_migration.py", "status", "--prometheus", str(target))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("instance", result.stdout)        # the table still goes to stdout
        self.assertIn("sqlite_migration_current_version", parse_textfile(target.read_text()))
        self.assertEqual(stat.S_IMODE(target.stat().st_mode), 0o644)
        self.assertEqual(sorted(p.name for p in target.parent.iterdir()), [target.name])

    def test_a_folder_that_does_not_exist_is_one_line_and_exit_1(self) -> None:
        code, _, err = self.run_cli(database_migration, "status", "--prometheus",
                                    str(self.root / "nowhere" / "x.prom"))
        self.assertEqual(code, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("cannot write", err)
