"""Backups and restores under stress, in real processes: concurrent writers, a
backup killed part-way, a full disk, held connections, locks, corrupt files."""

from __future__ import annotations

import json
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

from tests.support import ROOT, ProjectTestCase, query, safe_db_update, sha256

SAFETY_TIMEOUT = 30     # seconds; only so that a hang fails instead of blocking CI

# A writer in its own process: small committed transactions until told to stop.
# It appends the ids of every committed transaction to a file, after the COMMIT,
# and retries a transaction that found the database locked.
WRITER = r"""
import os, sqlite3, sys, time
db, ids_path, stop_path = sys.argv[1:4]
conn = sqlite3.connect(db, timeout=0.2, isolation_level=None)
retries, next_id, deadline = 0, 1, time.monotonic() + 30
with open(ids_path, "a", encoding="utf-8") as ids:
    while not os.path.exists(stop_path) and time.monotonic() < deadline:
        batch = list(range(next_id, next_id + 5))
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO event (id, payload) VALUES (?, randomblob(300))",
                             [(i,) for i in batch])
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            retries += 1
            time.sleep(0.005)
            continue
        ids.write(" ".join(map(str, batch)) + "\n")
        ids.flush()
        next_id += 5
        time.sleep(0.001)
print(retries)
"""

# Holds an instance's lock, as a migrate would, until its stdin closes.
HOLDER = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import safe_db_update
config = Path(sys.argv[2])
instance = safe_db_update.select_instances(safe_db_update.load_instances(config), "dev", config)[0]
with safe_db_update.instance_lock(instance, "migrate"):
    print("held", flush=True)
    sys.stdin.read()
"""


def fill(path: Path, megabytes: int, table: str = "filler") -> None:
    """Add about `megabytes` of incompressible rows to a database."""
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY, data BLOB)")
        conn.execute(f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                     f"WHERE i < ?) INSERT INTO {table} (data) SELECT randomblob(4000) FROM n",
                     (megabytes * 256,))
        conn.commit()


def wait_until(predicate, what: str, timeout: float = SAFETY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


class SafetyTestCase(ProjectTestCase):
    def start(self, *argv: str, **options) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, *argv], cwd=self.root, **options)
        self.addCleanup(self.stop, process)
        return process

    def stop(self, process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.kill()
        process.wait(SAFETY_TIMEOUT)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream:
                stream.close()

    def backup_script(self, *argv: str) -> list[str]:
        return [str(ROOT / "safe_db_update.py"), "--config", str(self.config), *argv]

    def listed(self, name: str = "dev") -> list[dict]:
        result = self.run_script("safe_db_update.py", "list-backups", name, "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout)["backups"]

    def integrity(self, path: Path) -> list[tuple]:
        with closing(sqlite3.connect(f"{Path(path).as_uri()}?mode=ro", uri=True)) as conn:
            return conn.execute("PRAGMA integrity_check").fetchall()

    def manifest(self, backup: Path | str) -> dict:
        return json.loads(Path(f"{backup}.json").read_text(encoding="utf-8"))


class ConcurrentWriterTests(SafetyTestCase):
    """A backup taken while another process keeps committing."""

    def run_with_writer(self, journal_mode: str) -> None:
        live = self.create()
        with closing(sqlite3.connect(live)) as conn:
            self.assertEqual(conn.execute(f"PRAGMA journal_mode = {journal_mode}").fetchone()[0],
                             journal_mode)
            conn.execute("CREATE TABLE event (id INTEGER PRIMARY KEY, payload BLOB)")
        fill(live, 8)                                           # a few MB to copy
        ids_file, stop_file = self.root / "ids.txt", self.root / "stop"
        writer = self.start("-c", WRITER, str(live), str(ids_file), str(stop_file),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def committed() -> set[int]:
            text = ids_file.read_text(encoding="utf-8") if ids_file.exists() else ""
            return {int(i) for i in text.split()}

        wait_until(lambda: len(committed()) >= 50, "the writer's first commits")
        before_backup = committed()
        results = []
        for _ in range(3):
            results.append(self.run_script("safe_db_update.py", "backup", "dev", "--json",
                                           timeout=SAFETY_TIMEOUT))
        after_backup = len(committed())
        wait_until(lambda: len(committed()) >= after_backup + 50, "commits after the backups")
        stop_file.touch()
        out, err = writer.communicate(timeout=SAFETY_TIMEOUT)
        self.assertEqual(writer.returncode, 0, err)

        every_commit = committed()
        live_ids = {i for (i,) in query(live, "SELECT id FROM event")}
        self.assertEqual(live_ids, every_commit)               # nothing committed was lost
        self.assertEqual(self.integrity(live), [("ok",)])
        for result in results:
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.stderr, "")
            backup = Path(json.loads(result.stdout)["path"])
            self.assertIs(self.manifest(backup)["verified"], True)
            self.assertEqual(self.integrity(backup), [("ok",)])
            self.assertEqual(self.manifest(backup)["sha256"], sha256(backup))
            in_backup = {i for (i,) in query(backup, "SELECT id FROM event")}
            self.assertLessEqual(before_backup, in_backup)     # all that was committed before
            self.assertLess(in_backup, every_commit)           # and nothing never committed
            self.assertEqual(query(backup, "SELECT COUNT(*) FROM filler"), [(8 * 256,)])
            verify = self.run_script("safe_db_update.py", "verify", "dev", backup.name)
            self.assertEqual(verify.returncode, 0, verify.stdout + verify.stderr)
        self.assertEqual(query(backup, "PRAGMA journal_mode"), [("delete",)])

    def test_backup_during_continuous_writes_in_wal_mode(self) -> None:
        self.run_with_writer("wal")

    def test_backup_during_continuous_writes_in_rollback_journal_mode(self) -> None:
        self.run_with_writer("delete")


class KilledBackupTests(SafetyTestCase):
    def test_a_backup_killed_part_way_leaves_nothing_that_passes_for_a_backup(self) -> None:
        live = self.create()
        fill(live, 60)
        digest = sha256(live)
        folder = self.root / "backups" / "dev" / "database"
        # The kills land across one whole backup's time on this machine (start-up, copy,
        # check, rename), measured first: fixed delays could all fall before or after
        # the copy on a faster or slower machine, and test nothing.
        started = time.monotonic()
        self.assertEqual(self.start(*self.backup_script("backup", "dev"),
                                    stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL).wait(SAFETY_TIMEOUT), 0)
        whole = time.monotonic() - started
        chance = random.Random(20261129)
        delays = [whole * share for share in (0.3, 0.5, 0.7, 0.9)] \
            + [whole * chance.uniform(0.2, 0.95) for _ in range(6)]
        cut_short = 0                       # kills that left a partial copy behind
        for trial, delay in enumerate(delays):
            if trial >= 4 and cut_short:
                break                       # the extra trials only until one lands mid-copy
            with self.subTest(delay=round(delay, 3)):
                process = self.start(*self.backup_script("backup", "dev"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(delay)
                process.send_signal(signal.SIGKILL)
                process.wait(SAFETY_TIMEOUT)

                listed = {Path(b["path"]).name for b in self.listed()}
                entries = sorted(folder.iterdir()) if folder.is_dir() else []
                cut_short += any(e.name.startswith(".") and not e.name.endswith(".json")
                                 for e in entries)
                for entry in entries:
                    name = entry.name
                    if name.endswith(".json"):
                        continue
                    verify = self.run_script("safe_db_update.py", "verify", "dev", name)
                    if name in listed:                          # complete: it must verify
                        self.assertEqual(verify.returncode, 0, verify.stdout + verify.stderr)
                        continue
                    self.assertTrue(name.startswith("."), name)  # anything else is hidden
                    self.assertEqual(verify.returncode, 1, name)
                    self.assertNotIn("Traceback", verify.stderr)
                    restore = self.run_script("safe_db_update.py", "restore", "dev", name, "--yes")
                    self.assertEqual(restore.returncode, 1, name)
                    self.assertNotIn("Traceback", restore.stderr)
                self.assertEqual(sha256(live), digest)
        self.assertGreater(cut_short, 0, f"no kill landed during the copy ({whole:.2f} s a backup)")
        count = len(self.listed())
        result = self.run_script("safe_db_update.py", "backup", "dev", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(self.listed()), count + 1)
        newest = Path(json.loads(result.stdout)["path"])
        self.assertEqual(self.listed()[0]["path"], str(newest))
        verify = self.run_script("safe_db_update.py", "verify", "dev")
        self.assertEqual(verify.returncode, 0, verify.stdout + verify.stderr)
        self.assertEqual(sha256(live), digest)


class DiskFullTests(SafetyTestCase):
    def test_a_full_disk_fails_the_backup_with_one_line_and_leaves_no_partial_backup(self) -> None:
        live = self.create()
        fill(live, 4)
        digest = sha256(live)
        limit = 1024 * 1024                 # smaller than the database: the copy cannot fit

        def small_files() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        result = subprocess.run([sys.executable, *self.backup_script("backup", "dev")],
                                capture_output=True,
                                text=True, stdin=subprocess.DEVNULL, cwd=self.root,
                                preexec_fn=small_files, timeout=SAFETY_TIMEOUT)
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("dev", result.stderr)
        self.assertEqual(sha256(live), digest)
        self.assertEqual(self.listed(), [])
        folder = self.root / "backups" / "dev" / "database"
        self.assertEqual([p.name for p in folder.iterdir() if p.suffix in (".db", ".json")], [])
        again = self.run_script("safe_db_update.py", "backup", "dev")      # room again
        self.assertEqual(again.returncode, 0, again.stderr)


class RestoreWithOpenConnectionTests(SafetyTestCase):
    def test_a_connection_opened_before_a_restore_sees_the_restored_rows(self) -> None:
        for journal_mode in ("delete", "wal"):
            with self.subTest(journal_mode=journal_mode):
                self.check_open_connection(journal_mode)

    def check_open_connection(self, journal_mode: str) -> None:
        live = self.db()
        if live.exists():
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{live}{suffix}").unlink(missing_ok=True)
            shutil.rmtree(self.root / "backups")    # a new instance, not a lost one
        self.create()
        app = sqlite3.connect(live, isolation_level=None)     # the web app's connection
        self.addCleanup(app.close)
        app.execute(f"PRAGMA journal_mode = {journal_mode}")
        result = self.run_script("safe_db_update.py", "backup", "dev", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        app.execute("INSERT INTO user (id, email, name) VALUES (3, 'c@x', 'Cy')")
        app.execute("DELETE FROM payment WHERE id = 1")
        self.assertEqual(app.execute("SELECT COUNT(*) FROM user").fetchone(), (3,))

        restore = self.run_script("safe_db_update.py", "restore", "dev", "--yes")
        self.assertEqual(restore.returncode, 0, restore.stderr)

        self.assertEqual(app.execute("SELECT id FROM user ORDER BY id").fetchall(), [(1,), (2,)])
        self.assertEqual(app.execute("SELECT id FROM payment ORDER BY id").fetchall(), [(1,), (2,)])
        app.execute("INSERT INTO user (id, email, name) VALUES (4, 'd@x', 'Di')")   # still writable
        self.assertEqual(query(live, "SELECT id FROM user ORDER BY id"), [(1,), (2,), (4,)])
        self.assertEqual(app.execute("PRAGMA integrity_check").fetchall(), [("ok",)])


LOCK_WAIT = 0.3        # busy_timeout in LockTests: waiting for the lock, then giving up


class LockTests(SafetyTestCase):
    ini = f"[DEFAULT]\nbusy_timeout = {LOCK_WAIT}\n\n[dev]\npath = instance/dev.db\n"

    def assertWaitedThenGaveUp(self, command: str) -> None:
        """The audit trail's last entry: command failed, after waiting busy_timeout (timed by
        the command itself, from its start-up on: a real process's start-up left out)."""
        entry = json.loads((self.root / "backups" / "dev" / "history.jsonl")
                           .read_text(encoding="utf-8").splitlines()[-1])
        self.assertEqual(entry["operation"], command, entry)
        self.assertTrue(entry["outcome"].startswith("failed: "), entry)
        self.assertGreaterEqual(entry["seconds"], LOCK_WAIT, entry)

    def with_busy_timeout(self, seconds: float) -> None:
        self.config.write_text(self.ini.replace(f"busy_timeout = {LOCK_WAIT}",
                                                f"busy_timeout = {seconds}"), encoding="utf-8")

    def hold_lock(self) -> subprocess.Popen:
        holder = self.start("-c", HOLDER, str(ROOT), str(self.config), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.assertEqual(holder.stdout.readline().strip(), "held", holder.stderr)
        return holder

    def test_a_second_operation_waits_then_says_who_holds_the_lock_and_since_when(self) -> None:
        self.create()
        holder = self.hold_lock()
        result = self.run_script("safe_db_update.py", "backup", "dev", timeout=SAFETY_TIMEOUT)
        self.assertEqual(result.returncode, 1)
        self.assertWaitedThenGaveUp("backup")
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("'migrate'", result.stderr)
        self.assertIn(f"pid {holder.pid}", result.stderr)
        self.assertRegex(result.stderr, r"since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
        self.assertEqual(self.backups(), [])

    def test_restore_and_prune_are_refused_while_the_lock_is_held(self) -> None:
        live = self.create()
        for user_id in (3, 4):          # two different states: identical copies do not count
            self.assertEqual(self.run_script("safe_db_update.py", "backup", "dev").returncode, 0)
            with closing(sqlite3.connect(live)) as conn:
                conn.execute("INSERT INTO user (id, email, name) VALUES (?, 'c@x' || ?, 'Cy')",
                             (user_id, user_id))
                conn.commit()
        digest, made = sha256(live), self.backups()
        self.hold_lock()
        for argv in (("restore", "dev", "--yes"), ("prune", "dev", "--keep", "1", "--yes")):
            with self.subTest(command=argv[0]):
                result = self.run_script("safe_db_update.py", *argv)
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertIn("'migrate'", result.stderr)
                self.assertEqual(sha256(live), digest)
                self.assertEqual(self.backups(), made)

    def test_migrate_and_rollback_are_refused_while_the_lock_is_held(self) -> None:
        live = self.create()
        self.write_migration("0003_add_status.sql", "-- migrate:up\nALTER TABLE loan ADD COLUMN status TEXT;\n"
                                                    "-- migrate:down\nALTER TABLE loan DROP COLUMN status;\n")
        digest = sha256(live)
        self.hold_lock()
        for argv in (("migrate", "dev"), ("rollback", "dev", "--to", "1", "--yes")):
            with self.subTest(command=argv[0]):
                result = self.run_script("database_migration.py", *argv)
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertIn("'migrate'", result.stderr)
                self.assertEqual(sha256(live), digest)
                self.assertEqual(self.backups(), [])

    def test_a_waiting_backup_proceeds_when_the_lock_is_released_in_time(self) -> None:
        self.create()
        self.with_busy_timeout(10)
        holder = self.hold_lock()
        backup = self.start(*self.backup_script("backup", "dev"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.3)                     # let it start waiting (busy_timeout is 10 s)
        holder.stdin.close()
        holder.wait(SAFETY_TIMEOUT)
        out, err = backup.communicate(timeout=SAFETY_TIMEOUT)
        self.assertEqual(backup.returncode, 0, err)
        self.assertEqual(len(self.backups()), 1)

    def test_a_lock_left_by_a_killed_process_does_not_block(self) -> None:
        self.create()
        holder = self.hold_lock()
        holder.send_signal(signal.SIGKILL)
        holder.wait(SAFETY_TIMEOUT)
        lock = self.root / "backups" / "dev" / "lock"
        self.assertIn("migrate", lock.read_text(encoding="utf-8"))   # the file is still there
        result = self.run_script("safe_db_update.py", "backup", "dev")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(self.backups()), 1)

    def test_a_lock_held_by_a_thread_of_this_process_blocks_the_cli(self) -> None:
        self.create()
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with safe_db_update.instance_lock(self.instance(), "restore"):
                held.set()
                release.wait(SAFETY_TIMEOUT)

        thread = threading.Thread(target=hold)
        thread.start()
        self.addCleanup(thread.join, SAFETY_TIMEOUT)
        self.addCleanup(release.set)
        self.assertTrue(held.wait(SAFETY_TIMEOUT))
        started = time.monotonic()
        code, _, err = self.run_cli(safe_db_update, "backup", "dev")
        waited = time.monotonic() - started
        self.assertEqual(code, 1)
        self.assertIn("'restore'", err)
        self.assertGreaterEqual(waited, LOCK_WAIT, "gave up without waiting")
        self.assertEqual(self.backups(), [])
        release.set()
        thread.join(SAFETY_TIMEOUT)
        code, _, err = self.run_cli(safe_db_update, "backup", "dev")
        self.assertEqual(code, 0, err)

    def test_the_lock_file_lives_in_the_instance_backup_folder_and_is_flocked(self) -> None:
        import fcntl
        self.create()
        lock = self.root / "backups" / "dev" / "lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            started = time.monotonic()
            code, _, err = self.run_cli(safe_db_update, "backup", "dev")
            waited = time.monotonic() - started
        self.assertEqual(code, 1)
        self.assertIn("lock", err)
        self.assertNoTraceback(err)
        self.assertGreaterEqual(waited, LOCK_WAIT, "gave up without waiting")
        code, _, err = self.run_cli(safe_db_update, "backup", "dev")
        self.assertEqual(code, 0, err)


class CorruptDatabaseTests(SafetyTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.live = self.create()
        with closing(sqlite3.connect(self.live)) as conn:
            conn.executemany("INSERT INTO user (id, email, name) VALUES (?, ?, ?)",
                             [(i, f"u{i}@x", "n" * 300) for i in range(10, 3010)])
            conn.commit()
        result = self.run_script("safe_db_update.py", "backup", "dev", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.good = Path(json.loads(result.stdout)["path"])
        # Garbage over a run of pages in the middle of the file; the header stays.
        page_size = query(self.live, "PRAGMA page_size")[0][0]
        pages = self.live.stat().st_size // page_size
        garbage = random.Random(7).randbytes(page_size * 8)
        with open(self.live, "r+b") as handle:
            handle.seek(page_size * (pages // 2))
            handle.write(garbage)
        self.corrupt_digest = sha256(self.live)
        (self.root / "corrupt.db").write_bytes(self.live.read_bytes())

    def test_check_says_the_database_is_corrupt(self) -> None:
        for extra in ((), ("--quick",)):
            with self.subTest(extra=extra):
                result = self.run_script("safe_db_update.py", "check", "dev", *extra)
                self.assertEqual(result.returncode, 1)
                self.assertNotIn("Traceback", result.stdout + result.stderr)
                self.assertTrue(result.stdout.strip() or result.stderr.strip())
                self.assertNotIn("dev: ok", result.stdout)

    def test_backup_saves_a_copy_marked_unverified_and_exits_1(self) -> None:
        result = self.run_script("safe_db_update.py", "backup", "dev")
        self.assertEqual(result.returncode, 1)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn("integrity", result.stderr)
        [copy] = [b for b in self.backups() if b != self.good]
        manifest = self.manifest(copy)
        self.assertIs(manifest["verified"], False)
        self.assertEqual(manifest["sha256"], sha256(copy))
        self.assertEqual(copy.read_bytes()[100:], self.live.read_bytes()[100:])  # page for page
        self.assertEqual(sha256(self.live), self.corrupt_digest)

    def test_restore_refuses_an_unverified_backup(self) -> None:
        self.assertEqual(self.run_script("safe_db_update.py", "backup", "dev").returncode, 1)
        [copy] = [b for b in self.backups() if b != self.good]
        count = len(self.backups())
        for argv in (("restore", "dev", copy.name, "--yes"),):   # without FILE: the newest verified
            with self.subTest(argv=argv):
                result = self.run_script("safe_db_update.py", *argv)
                self.assertEqual(result.returncode, 1)
                self.assertNotIn("Traceback", result.stderr)
                self.assertIn(copy.name, result.stderr)
                self.assertEqual(sha256(self.live), self.corrupt_digest)
                self.assertEqual(len(self.backups()), count)
        verify = self.run_script("safe_db_update.py", "verify", "dev", copy.name)
        self.assertEqual(verify.returncode, 1)

    def test_restoring_the_last_good_backup_repairs_the_database(self) -> None:
        result = self.run_script("safe_db_update.py", "restore", "dev", self.good.name, "--yes")
        self.assertEqual(result.returncode, 0, result.stderr)
        check = self.run_script("safe_db_update.py", "check", "dev")
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        self.assertEqual(query(self.live, "SELECT COUNT(*) FROM user"), [(3002,)])
        [safety] = [b for b in self.backups() if b.name.endswith("-pre-restore.db")]
        self.assertEqual(safety.read_bytes()[100:], (self.root / "corrupt.db").read_bytes()[100:])
        self.assertIs(self.manifest(safety)["verified"], False)   # it kept the corrupt contents


if __name__ == "__main__":
    import unittest
    unittest.main()
