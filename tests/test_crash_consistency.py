"""Crash consistency of migrate, rollback, restore and migrate-all, in real processes on a
database of tens of thousands of rows: SIGKILL at random moments, a full disk
(RLIMIT_FSIZE), the application writing all the time, and migrations that try to leave
their transaction (journal and sync pragmas; a disk-full error swallowed in Python).

After a crash the database must hold either the old or the new version, whole: integrity
ok, the schema of that version, every row committed before; no partial backup listed;
and the next run of the same command finishes the job.

Environment:
    CRASH_TRIALS=N  kill trials per command (default 10), e.g.
                    CRASH_TRIALS=200 python -m unittest tests.test_crash_consistency
    CRASH_SEED=S    the first trial's seed (default 20261123); trial n uses S + n.
                    A failure names its seed: CRASH_SEED=<seed> CRASH_TRIALS=1 replays
                    that trial's choices (the kill delay and the journal mode).
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest
from contextlib import closing, redirect_stderr, redirect_stdout
from pathlib import Path

from tests.support import (INI as BASE_INI, LOAN_APP, ROOT, ProjectTestCase, database_migration,
                           query, safe_db_update, sha256)

TRIALS = int(os.environ.get("CRASH_TRIALS", "10"))
SEED = int(os.environ.get("CRASH_SEED", "20261123"))
SAFETY_TIMEOUT = 60         # seconds; only so that a hang fails instead of blocking CI
USERS, LOANS, PAYMENTS = 1_000, 30_000, 60_000
WRITER_IDS = 1_000_000      # the writer's payment ids start here; the fingerprint ignores them
MODES = ("delete", "wal")
OLD, NEW = 2, 5             # the templates' versions: pending migrations 3, 4 and 5

CRASH_APP = {
    **LOAN_APP,
    "0003_loan_status.sql": """-- migrate:up
ALTER TABLE loan ADD COLUMN status TEXT DEFAULT 'open';
UPDATE loan SET status = 'closed' WHERE id % 3 = 0;
-- migrate:down
ALTER TABLE loan DROP COLUMN status;
""",
    "0004_rebuild_loan.sql": """-- migrate:up
CREATE TABLE loan_new (id INTEGER PRIMARY KEY,
                       user_id INTEGER NOT NULL REFERENCES user (id) ON DELETE CASCADE,
                       amount NUMERIC NOT NULL CHECK (amount > 0),
                       status TEXT NOT NULL DEFAULT 'open');
INSERT INTO loan_new (id, user_id, amount, status)
    SELECT id, user_id, amount, COALESCE(status, 'open') FROM loan;
DROP TABLE loan;
ALTER TABLE loan_new RENAME TO loan;
-- migrate:down
CREATE TABLE loan_old (id INTEGER PRIMARY KEY,
                       user_id INTEGER NOT NULL REFERENCES user (id) ON DELETE CASCADE,
                       amount NUMERIC NOT NULL, status TEXT DEFAULT 'open');
INSERT INTO loan_old (id, user_id, amount, status) SELECT id, user_id, amount, status FROM loan;
DROP TABLE loan;
ALTER TABLE loan_old RENAME TO loan;
""",
    "0005_payment_note_and_indexes.sql": """-- migrate:up
CREATE INDEX payment_loan_id ON payment (loan_id);
ALTER TABLE payment ADD COLUMN note TEXT;
UPDATE payment SET note = 'checked ' || id WHERE id % 10 = 0;
CREATE INDEX loan_status ON loan (status);
-- migrate:down
DROP INDEX loan_status;
ALTER TABLE payment DROP COLUMN note;
DROP INDEX payment_loan_id;
""",
}

INI = BASE_INI.replace("busy_timeout = 2", "busy_timeout = 10")

# Migrations that try to get out of the run's transaction, pending on the new template
# (version 5). Each run must fail and leave version 5 whole.
ESCAPING_PRAGMAS = """import sqlite3

def up(conn):
    for pragma in ("PRAGMA journal_mode = MEMORY", "PRAGMA synchronous = OFF",
                   "PRAGMA locking_mode = EXCLUSIVE", "PRAGMA journal_mode = OFF"):
        try:
            conn.execute(pragma)
        except Exception:
            pass        # swallowed: the run must fail all the same
    # Far more than SQLite's page cache holds: changed pages spill into the file, where
    # only the journal could undo them.
    conn.execute("UPDATE payment SET amount = amount + 1, note = printf('%.300c', 'x')")
    conn.execute("INSERT INTO no_such_table (x) VALUES (1)")
"""
SWALLOWS_DISK_FULL = """import sqlite3

def up(conn):
    conn.execute("CREATE TABLE bulk (x BLOB)")
    try:            # far past the file size limit: SQLite ends the transaction itself
        conn.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                     "WHERE i < 20000) INSERT INTO bulk SELECT randomblob(1000) FROM n")
    except sqlite3.Error:
        pass        # swallowed; every later statement would commit on its own
    for sql in ("UPDATE payment SET amount = 0 WHERE id < 100",
                "DELETE FROM payment WHERE id >= 100", "DELETE FROM loan"):
        try:
            conn.execute(sql)
        except Exception:
            pass
"""

FINGERPRINT = {     # per table: what 'every committed row is still there' compares
    "user": "COUNT(*), TOTAL(id), TOTAL(LENGTH(email))",
    "loan": "COUNT(*), TOTAL(id), TOTAL(amount), TOTAL(user_id)",
    "payment": "COUNT(*), TOTAL(id), TOTAL(amount), TOTAL(loan_id)",
}

# The application: small committed transactions into payment, retried when locked.
# After each COMMIT it logs 'ok <monotonic time> <ids>'; every error it logs as 'error ...'.
WRITER = r"""
import os, sqlite3, sys, time
db, log_path, stop_path = sys.argv[1:4]
conn = sqlite3.connect(db, timeout=0.01, isolation_level=None)
conn.execute("PRAGMA foreign_keys = ON")
next_id, deadline = int(sys.argv[4]), time.monotonic() + 60
with open(log_path, "a", encoding="utf-8") as log:
    while not os.path.exists(stop_path) and time.monotonic() < deadline:
        batch = range(next_id, next_id + 3)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO payment (id, loan_id, amount) VALUES (?, ?, 7)",
                             [(i, 1 + i % 1000) for i in batch])
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.write(f"error {exc}\n")
            log.flush()
            time.sleep(0.005)
            continue
        log.write(f"ok {time.monotonic()} {' '.join(map(str, batch))}\n")
        log.flush()
        next_id += 3
        time.sleep(0.002)
"""


# --- Reading databases -------------------------------------------------------

def integrity(path: Path) -> list[tuple]:
    return query(path, "PRAGMA integrity_check")


def version(path: Path) -> int:
    return query(path, "SELECT MAX(version) FROM schema_migrations")[0][0]


def rows(path: Path) -> dict[str, tuple]:
    """A fingerprint of the rows committed before the run (not the writer's)."""
    return {table: query(path, f'SELECT {columns} FROM "{table}" WHERE id < {WRITER_IDS}')[0]
            for table, columns in FINGERPRINT.items()}


def shape(path: Path) -> list[tuple]:
    """sqlite_master, with tables described by their columns and foreign keys."""
    with closing(sqlite3.connect(path)) as conn:
        objects = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master "
                               "WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name").fetchall()
        return [(kind, name, table,
                 (conn.execute(f'PRAGMA table_info("{name}")').fetchall(),
                  conn.execute(f'PRAGMA foreign_key_list("{name}")').fetchall())
                 if kind == "table" else " ".join((sql or "").split()))
                for kind, name, table, sql in objects]


def state(path: Path) -> tuple[int, dict[str, tuple]]:
    return version(path), rows(path)


def crash_copy(db: Path, folder: Path) -> Path:
    """The database as the crash left it (with its journal or WAL), copied for inspection,
    so that the next run of the command meets the crash's leftovers, not our recovery."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for suffix in ("", "-journal", "-wal"):
        if Path(f"{db}{suffix}").exists():
            shutil.copy(f"{db}{suffix}", folder / f"{db.name}{suffix}")
    return folder / db.name


def fill(path: Path) -> None:
    numbers = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(numbers + "INSERT INTO user (id, email, name) "
                               "SELECT i, 'u' || i || '@x', 'User ' || i FROM n", (USERS,))
        conn.execute(numbers + "INSERT INTO loan (id, user_id, amount) "
                               "SELECT i, 1 + i % ?, 100 + i % 900 FROM n", (LOANS, USERS))
        conn.execute(numbers + "INSERT INTO payment (id, loan_id, amount) "
                               "SELECT i, 1 + i % ?, 1 + i % 50 FROM n", (PAYMENTS, LOANS))


def set_journal_mode(path: Path, mode: str) -> Path:
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute(f"PRAGMA journal_mode = {mode}").fetchone()[0] == mode
    return path


def call(module, config: Path, *argv: str) -> str:
    """Run a CLI in this process (for building templates); its stdout."""
    database_migration._loaded.clear()
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = module.main(["--config", str(config), *argv])
    if code != 0:
        raise AssertionError(f"{argv}: exit {code}: {err.getvalue()}")
    return out.getvalue()


# --- Templates, built once for the module ------------------------------------

class Templates:
    """Big databases at the old and new versions, a backup to restore, reference schemas."""

    def __init__(self, folder: Path) -> None:
        (folder / "instances.ini").write_text(INI, encoding="utf-8")
        for sub in ("migrations", "instance"):
            (folder / sub).mkdir()
        for name, text in CRASH_APP.items():
            (folder / "migrations" / name).write_text(text, encoding="utf-8")
        config = folder / "instances.ini"
        dev = folder / "instance" / "dev.db"
        self.schemas = {}
        for target in range(OLD, NEW + 1):                  # empty databases at each version
            dev.unlink(missing_ok=True)
            call(database_migration, config, "migrate", "dev", "--new-empty-database", "--to",
                 str(target), "--yes")
            self.schemas[target] = shape(dev)
        dev.unlink()
        call(database_migration, config, "migrate", "dev", "--new-empty-database", "--to", str(OLD),
             "--yes")
        fill(dev)
        self.old = self.copies(dev, folder / "old")
        call(database_migration, config, "migrate", "dev", "--yes")
        self.new = self.copies(dev, folder / "new")
        with closing(sqlite3.connect(dev)) as conn, conn:   # the backup differs in rows too
            conn.execute("INSERT INTO payment (loan_id, amount) SELECT loan_id, 3 FROM payment "
                         "WHERE id <= 500")
        self.backup = Path(json.loads(call(safe_db_update, config, "backup", "dev",
                                           "--json"))["path"])
        self.states = {"old": state(self.old["delete"]), "new": state(self.new["delete"]),
                       "backup": state(self.backup)}

    @staticmethod
    def copies(db: Path, stem: Path) -> dict[str, Path]:
        return {mode: set_journal_mode(Path(shutil.copy(db, f"{stem}-{mode}.db")), mode)
                for mode in MODES}


_templates: dict = {}           # 'folder' and 'built', once for the module


def templates() -> Templates:
    if "built" not in _templates:
        _templates.setdefault("folder", tempfile.TemporaryDirectory())
        _templates["built"] = Templates(Path(_templates["folder"].name))
    return _templates["built"]


def tearDownModule() -> None:   # noqa: N802 - the name unittest and pytest call
    if "folder" in _templates:
        _templates.pop("folder").cleanup()
    _templates.clear()


# --- Test cases --------------------------------------------------------------

class CrashTestCase(ProjectTestCase):
    migrations = CRASH_APP
    ini = INI

    @classmethod
    def setUpClass(cls) -> None:
        cls.t = templates()

    def start_from(self, template: Path, name: str = "dev") -> Path:
        """A fresh live database (a copy of a closed template) and no backups."""
        shutil.rmtree(self.root / "backups" / name, ignore_errors=True)
        db = self.db(name)
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        shutil.copy(template, db)
        return db

    def command(self, script: str, *argv: str) -> list[str]:
        return [sys.executable, str(ROOT / script), "--config", str(self.config), *argv]

    def listed(self, name: str = "dev") -> list[dict]:
        code, out, err = self.run_cli(safe_db_update, "list-backups", name, "--json")
        self.assertEqual(code, 0, err)
        return json.loads(out)["backups"]

    def assertBackupsVerify(self, where: str, name: str = "dev") -> list[dict]:
        listed = self.listed(name)
        for backup in listed:
            code, out, err = self.run_cli(safe_db_update, "verify", name, backup["path"])
            self.assertEqual(code, 0, f"{where}: listed backup fails verify: {out}{err}")
        return listed

    def assertWhole(self, db: Path, allowed: dict[int, dict], where: str) -> int:
        """Integrity ok, and one of the allowed versions with its schema and rows."""
        self.assertEqual(integrity(db), [("ok",)], where)
        current = version(db)
        self.assertIn(current, allowed, f"{where}: a version in between")
        self.assertEqual(shape(db), self.t.schemas[current],
                         f"{where}: the schema is not that of version {current}")
        self.assertEqual(rows(db), allowed[current], f"{where}: rows lost or changed")
        return current

    def assertOneLineError(self, result: subprocess.CompletedProcess, *words: str) -> None:
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        for word in words:
            self.assertIn(word, result.stderr)


class KillTests(CrashTestCase):
    """SIGKILL at a random moment, then inspect what the crash left and run again."""

    def kill_trials(self, start: dict[str, Path], old: tuple, new: tuple, reason: str,
                    argv: list[str], already_done: tuple[int, str]) -> None:
        begin, end, duration = self.timed_run(start["delete"], argv)
        for trial in range(TRIALS):
            seed = SEED + trial
            rng = random.Random(seed)       # half the kills in and around the transaction
            mode, delay = rng.choice(MODES), rng.choice([rng.uniform(0, 1.2 * duration),
                                                         rng.uniform(begin - 0.01, end + 0.01)])
            where = (f"{Path(argv[1]).name} {' '.join(argv[4:])}: trial {trial}, seed {seed} "
                     f"(CRASH_SEED={seed} CRASH_TRIALS=1 replays it), {mode} mode, SIGKILL "
                     f"after {delay:.3f}s of a {duration:.3f}s run, journal seen {begin:.3f}s "
                     f"to {end:.3f}s")
            with self.subTest(trial=trial, seed=seed):
                db = self.start_from(start[mode])
                code = self.run_killed(argv, delay)
                left = crash_copy(db, self.root / "crash")
                current = self.assertWhole(left, dict([old, new]), where)
                if code == 0:
                    self.assertEqual(current, new[0], f"{where}: exit 0 but not done")
                listed = self.assertBackupsVerify(where)
                if current == new[0]:   # done: the state before it is in a verified backup
                    self.assertIn(old, [state(Path(b["path"])) for b in listed
                                        if b["reason"] == reason], where)
                self.assertNextRunFinishes(argv, new, already_done if current == new[0]
                                           else (0, ""), where)

    def timed_run(self, template: Path, argv: list[str]) -> tuple[float, float, float]:
        """One run that is not killed, which must succeed: when its transaction's journal
        was first and last seen, and when it ended. They set the kill delays."""
        journal = Path(f"{self.start_from(template)}-journal")
        started, seen = time.perf_counter(), []
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, cwd=self.root)
        while process.poll() is None:
            if journal.exists():
                seen.append(time.perf_counter() - started)
            time.sleep(0.001)
        duration = time.perf_counter() - started
        _, err = process.communicate(timeout=SAFETY_TIMEOUT)
        self.assertEqual(process.returncode, 0, err)
        return (seen or [0.0])[0], (seen or [duration])[-1], duration

    def run_killed(self, argv: list[str], delay: float) -> int:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, cwd=self.root)
        time.sleep(delay)
        process.kill()                              # SIGKILL; nothing if it has finished
        _, err = process.communicate(timeout=SAFETY_TIMEOUT)
        self.assertIn(process.returncode, (0, -9), err)
        return process.returncode

    def assertNextRunFinishes(self, argv: list[str], new: tuple, expected: tuple[int, str],
                              where: str) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                cwd=self.root, timeout=SAFETY_TIMEOUT)
        self.assertEqual(result.returncode, expected[0], f"{where}: the next run: {result.stderr}")
        self.assertIn(expected[1], result.stdout + result.stderr, where)
        self.assertNotIn("Traceback", result.stderr, where)
        self.assertWhole(self.db(), dict([new]), f"{where}: after the next run")

    def test_migrate_killed_at_random_moments_leaves_the_old_or_the_new_version_whole(self) -> None:
        t = self.t
        self.kill_trials(t.old, t.states["old"], t.states["new"], "pre-migrate",
                         self.command("database_migration.py", "migrate", "dev", "--yes"),
                         (0, "nothing to do"))

    def test_rollback_killed_at_random_moments_leaves_the_newer_or_older_version_whole(self):
        t = self.t
        self.kill_trials(t.new, t.states["new"], t.states["old"], "pre-rollback",
                         self.command("database_migration.py", "rollback", "dev", "--to", str(OLD),
                                      "--yes"), (1, "nothing to roll back"))

    def test_restore_killed_at_random_moments_leaves_the_old_or_the_restored_contents(self) -> None:
        t = self.t
        self.kill_trials(t.old, t.states["old"], t.states["backup"], "pre-restore",
                         self.command("safe_db_update.py", "restore", "dev", str(t.backup),
                                      "--yes"), (0, "restored"))


class DiskFullTests(CrashTestCase):
    """RLIMIT_FSIZE: no file may grow past the limit; Python ignores SIGXFSZ, so EFBIG."""

    def run_limited(self, limit: int, script: str, *argv: str) -> subprocess.CompletedProcess:
        def small_files() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return subprocess.run(self.command(script, *argv), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, cwd=self.root, preexec_fn=small_files,
                              timeout=SAFETY_TIMEOUT)

    def test_migrate_whose_writes_hit_the_limit_fails_in_one_line_and_changes_nothing(self) -> None:
        db = self.start_from(self.t.old["delete"])
        limit = db.stat().st_size           # the backup fits exactly; the migration cannot grow
        result = self.run_limited(limit, "database_migration.py", "migrate", "dev", "--yes")
        self.assertOneLineError(result, "migration 5", "rolled back, nothing changed", "backup:")
        self.assertWhole(db, dict([self.t.states["old"]]), "after the full disk")
        self.assertEqual([b["reason"] for b in self.assertBackupsVerify("disk full")],
                         ["pre-migrate"])
        again = self.run_script("database_migration.py", "migrate", "dev", "--yes")
        self.assertEqual(again.returncode, 0, again.stderr)

    def test_migrate_whose_backup_hits_the_limit_fails_in_one_line_changing_nothing(self):
        db = self.start_from(self.t.old["delete"])
        result = self.run_limited(db.stat().st_size // 2, "database_migration.py", "migrate",
                                  "dev", "--yes")
        self.assertOneLineError(result, "backup failed")
        self.assertWhole(db, dict([self.t.states["old"]]), "after the full disk")
        self.assertEqual(self.listed(), [])

    def test_restore_that_hits_the_limit_fails_in_one_line_and_changes_nothing(self) -> None:
        db = self.start_from(self.t.old["delete"])
        result = self.run_limited(db.stat().st_size, "safe_db_update.py", "restore", "dev",
                                  str(self.t.backup), "--yes")
        self.assertOneLineError(result, "restore failed")
        self.assertWhole(db, dict([self.t.states["old"]]), "after the full disk")
        self.assertEqual([b["reason"] for b in self.assertBackupsVerify("disk full")],
                         ["pre-restore"])


class EscapeAttemptTests(CrashTestCase):
    """A migration that tries to leave its transaction, on 60,000 payments in both modes."""

    def each_mode(self, migration: str, text: str, test) -> None:
        self.write_migration(migration, text)
        for mode in MODES:
            with self.subTest(journal_mode=mode):
                test(self.start_from(self.t.new[mode]), mode)

    def test_journal_and_sync_pragmas_from_a_python_migration_leave_the_database_whole(self):
        def test(db: Path, mode: str) -> None:
            result = self.run_script("database_migration.py", "migrate", "dev", "--yes")
            self.assertWhole(db, dict([self.t.states["new"]]), f"{mode}: after the pragmas")
            self.assertOneLineError(result, "migration 6", "weaken the run's transaction",
                                    "rolled back, nothing changed")
            self.assertEqual(query(db, "PRAGMA journal_mode"), [(mode,)])
        self.each_mode("0006_escape.py", ESCAPING_PRAGMAS, test)

    def test_the_same_pragma_in_a_sql_migration_is_refused_before_anything_is_opened(self):
        def test(db: Path, mode: str) -> None:
            before = (db.stat().st_mtime_ns, sha256(db))
            result = self.run_script("database_migration.py", "migrate", "dev", "--yes")
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertIn("0006_escape.sql", result.stderr)
            self.assertEqual((db.stat().st_mtime_ns, sha256(db)), before, mode)
            self.assertEqual(self.listed(), [])
        self.each_mode("0006_escape.sql", "PRAGMA journal_mode = OFF;\n"
                                          "UPDATE payment SET amount = amount + 1;\n"
                                          "INSERT INTO no_such_table (x) VALUES (1);\n", test)

    def test_a_swallowed_disk_full_error_commits_nothing_afterwards(self) -> None:
        def test(db: Path, mode: str) -> None:
            limit = db.stat().st_size + 64 * 1024   # the backup fits; the bulk insert cannot
            result = DiskFullTests.run_limited(self, limit, "database_migration.py", "migrate",
                                               "dev", "--yes")
            self.assertOneLineError(result, "migration 6", "rolled back, nothing changed")
            self.assertWhole(db, dict([self.t.states["new"]]), f"{mode}: after the full disk")
            self.assertEqual([b["reason"] for b in self.assertBackupsVerify(mode)],
                             ["pre-migrate"])
        self.each_mode("0006_swallow.py", SWALLOWS_DISK_FULL, test)


class ConcurrentWriterTests(CrashTestCase):
    """The application keeps committing while the command runs."""

    def with_writer(self, db: Path, argv: list[str]) -> tuple[float, float, list[tuple]]:
        """Run the command, which must succeed, while the writer commits: when it started
        and ended, and the writer's commits as (time, ids)."""
        log, stop = self.root / "writer.log", self.root / "stop"
        for leftover in (log, stop):
            leftover.unlink(missing_ok=True)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(log), str(stop),
                                   str(WRITER_IDS)], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: (writer.kill(), writer.communicate()))

        def commits() -> list[tuple[float, list[int]]]:
            lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
            errors = [line for line in lines if not line.startswith("ok ")]
            self.assertEqual([e for e in errors if "database is locked" not in e], [],
                             "the writer's only errors are 'database is locked' retries")
            return [(float(line.split()[1]), [int(i) for i in line.split()[2:]])
                    for line in lines if line.startswith("ok ")]

        def wait_for(count: int) -> None:
            deadline = time.monotonic() + SAFETY_TIMEOUT
            while len(commits()) < count:
                if time.monotonic() > deadline:
                    self.fail(f"the writer stopped committing (exit {writer.poll()}): "
                              f"{log.read_text(encoding='utf-8')[-300:]!r}")
                time.sleep(0.01)

        wait_for(10)
        started = time.monotonic()
        result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                cwd=self.root, timeout=SAFETY_TIMEOUT)
        finished = time.monotonic()
        wait_for(len(commits()) + 10)
        stop.touch()
        out, err = writer.communicate(timeout=SAFETY_TIMEOUT)
        self.assertEqual((writer.returncode, err), (0, ""))
        self.assertEqual(result.returncode, 0, result.stderr)
        return started, finished, commits()

    def writer_ids(self, path: Path) -> set[int]:
        return {i for (i,) in query(path, "SELECT id FROM payment WHERE id >= ?", (WRITER_IDS,))}

    def each_mode(self, test) -> None:
        for mode in MODES:
            with self.subTest(journal_mode=mode):
                test(mode)

    def test_migrate_keeps_every_row_the_application_committed(self) -> None:
        def test(mode: str) -> None:
            db = self.start_from(self.t.old[mode])
            _, _, commits = self.with_writer(db, self.command(
                "database_migration.py", "migrate", "dev", "--yes"))
            self.assertWhole(db, dict([self.t.states["new"]]), mode)
            self.assertEqual(self.writer_ids(db), {i for _, ids in commits for i in ids})
        self.each_mode(test)

    def test_migrate_all_with_jobs_keeps_every_row_the_application_committed(self) -> None:
        def test(mode: str) -> None:
            self.start_from(self.t.old[mode], "prod")
            db = self.start_from(self.t.old[mode])
            _, _, commits = self.with_writer(db, self.command(
                "database_migration.py", "migrate-all", "--jobs", "2", "--yes"))
            for name in ("dev", "prod"):
                self.assertWhole(self.db(name), dict([self.t.states["new"]]), f"{mode} {name}")
            self.assertEqual(self.writer_ids(db), {i for _, ids in commits for i in ids})
        self.each_mode(test)

    def restore_with_writer(self, mode: str) -> dict[str, set[int]]:
        """The writer's ids by when they were committed, and where they are afterwards."""
        db = self.start_from(self.t.old[mode])
        started, finished, commits = self.with_writer(db, self.command(
            "safe_db_update.py", "restore", "dev", str(self.t.backup), "--yes"))
        self.assertWhole(db, dict([self.t.states["backup"]]), mode)
        [safety] = [Path(b["path"]) for b in self.listed() if b["reason"] == "pre-restore"]
        self.assertWhole(safety, dict([self.t.states["old"]]), f"{mode} pre-restore")
        before = {i for at, ids in commits if at < started for i in ids}
        after = {i for at, ids in commits if at > finished for i in ids}
        return {"before": before, "after": after, "live": self.writer_ids(db),
                "during": {i for _, ids in commits for i in ids} - before - after,
                "saved": self.writer_ids(safety)}

    def test_restore_keeps_later_rows_live_and_earlier_rows_in_the_pre_restore_backup(self) -> None:
        def test(mode: str) -> None:
            ids = self.restore_with_writer(mode)
            self.assertLessEqual(ids["before"], ids["saved"], "committed before: in the backup")
            self.assertLessEqual(ids["after"], ids["live"], "committed after: in the database")
        self.each_mode(test)

    def test_restore_keeps_rows_committed_while_it_runs_in_the_backup_or_the_database(self) -> None:
        """Every row the application commits during a restore is in the pre-restore backup
        or in the restored database: the pre-restore backup is taken while the copy holds
        the live database's write lock, so no commit can fall between the two."""
        def test(mode: str) -> None:
            ids = self.restore_with_writer(mode)
            self.assertEqual(ids["during"] - ids["saved"] - ids["live"], set(),
                             "committed during the restore: lost")
        self.each_mode(test)


if __name__ == "__main__":
    unittest.main()
