"""Restore and backup where SQLite itself draws a line: a schema written by a newer
SQLite, a WAL database whose page size differs from the backup's, a file that reaches
the disk's or the process's size limit."""

from __future__ import annotations

import os
import resource
import sqlite3
import subprocess
import sys
import unittest
from contextlib import closing
from pathlib import Path

from tests.support import ROOT, ProjectTestCase, query, safe_db_update, sha256

# The application, as a newer SQLite would run it: a view this SQLite cannot parse
# (written with writable_schema, which also lets this connection ignore it), 300 rows
# committed in WAL mode and left in the -wal file, and the connection kept open.
NEWER_APP = r"""
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode = WAL")
conn.execute("PRAGMA wal_autocheckpoint = 0")
conn.execute("PRAGMA writable_schema = ON")
conn.execute("INSERT INTO sqlite_master VALUES ('view', 'recent', 'recent', 0, "
             "'CREATE VIEW recent AS SELECT id FROM user FETCH FIRST 3 ROWS ONLY')")
for i in range(300):
    conn.execute("INSERT INTO user (email, name) VALUES (?, 'app')", (f"app{i}@x",))
print("ready", flush=True)
for line in sys.stdin:
    conn.execute("INSERT INTO user (email, name) VALUES (?, 'app')", (line.strip(),))
    print(conn.execute("SELECT COUNT(*) FROM user").fetchone()[0], flush=True)
"""


class NewerSchemaTests(ProjectTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.live = self.create("dev")
        result = self.run_script("safe_db_update.py", "backup", "dev")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.good = self.backups("dev")
        self.app = subprocess.Popen([sys.executable, "-c", NEWER_APP, str(self.live)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addCleanup(self.stop_app)
        self.assertEqual(self.app.stdout.readline().strip(), "ready")
        self.inode = self.live.stat().st_ino
        self.wal = Path(f"{self.live}-wal")
        self.assertGreater(self.wal.stat().st_size, 300 * 60)

    def stop_app(self) -> None:
        if self.app.poll() is None:
            self.app.stdin.close()
            self.app.wait(timeout=30)
        self.app.stdout.close()

    def app_commits(self, email: str) -> int:
        self.app.stdin.write(email + "\n")
        self.app.stdin.flush()
        return int(self.app.stdout.readline())

    def assertRefusedChangingNothing(self, result: subprocess.CompletedProcess) -> None:
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("cannot read the schema", result.stderr)
        self.assertIn("newer SQLite", result.stderr)
        self.assertIn("nothing changed", result.stderr)
        self.assertEqual(self.live.stat().st_ino, self.inode)
        self.assertTrue(self.wal.exists())
        self.assertEqual(self.backups("dev"), self.good)
        self.assertEqual([p.name for p in (self.root / "backups" / "dev" / "database").iterdir()
                          if not p.name.startswith(self.good[0].name)], [])
        self.assertEqual(self.app_commits(f"after{result.args[-1]}@x"), 2 + 300 + 1)

    def test_restore_refuses_and_the_applications_wal_rows_stay(self) -> None:
        result = self.run_script("safe_db_update.py", "restore", "dev", self.good[0].name, "--yes")
        self.assertRefusedChangingNothing(result)

    def test_backup_refuses_with_a_message_that_says_why(self) -> None:
        result = self.run_script("safe_db_update.py", "backup", "dev")
        self.assertRefusedChangingNothing(result)
        self.assertNotIn("free space", result.stderr)


class DamagedIsStillDamagedTests(ProjectTestCase):
    def test_a_file_that_is_not_a_database_is_still_replaced_by_restore(self) -> None:
        live = self.create("dev")
        self.assertEqual(self.run_script("safe_db_update.py", "backup", "dev").returncode, 0)
        backup = self.backups("dev")[0]
        live.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
        result = self.run_script("safe_db_update.py", "restore", "dev", backup.name, "--yes")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(sha256(live), sha256(backup))


class PageSizeTests(ProjectTestCase):
    """The backup has 4096-byte pages; the live database, in WAL mode, 8192."""

    def setUp(self) -> None:
        super().setUp()
        self.live = self.create("dev")
        self.assertEqual(self.run_script("safe_db_update.py", "backup", "dev").returncode, 0)
        self.backup = self.backups("dev")[0]
        with closing(sqlite3.connect(self.live, isolation_level=None)) as conn:
            conn.execute("INSERT INTO user (id, email, name) VALUES (3, 'c@x', 'Cy')")
            conn.execute("PRAGMA page_size = 8192")
            conn.execute("VACUUM")
            self.assertEqual(conn.execute("PRAGMA journal_mode = WAL").fetchone(), ("wal",))
        self.assertEqual(query(self.live, "PRAGMA page_size"), [(8192,)])

    def test_restore_across_a_page_size_change_works_when_nobody_has_it_open(self) -> None:
        result = self.run_script("safe_db_update.py", "restore", "dev", self.backup.name, "--yes")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(query(self.live, "SELECT id FROM user ORDER BY id"), [(1,), (2,)])
        self.assertEqual(query(self.live, "PRAGMA integrity_check"), [("ok",)])
        self.assertEqual(query(self.live, "PRAGMA journal_mode"), [("wal",)])
        saved = [p for p in self.backups("dev") if p.name.endswith("-pre-restore.db")]
        self.assertEqual(len(saved), 1)
        self.assertEqual(query(saved[0], "SELECT id FROM user ORDER BY id"), [(1,), (2,), (3,)])

    def test_with_the_application_connected_it_refuses_saying_why_and_changes_nothing(self) -> None:
        app = sqlite3.connect(self.live, isolation_level=None)
        self.addCleanup(app.close)
        app.execute("INSERT INTO user (id, email, name) VALUES (4, 'd@x', 'Di')")
        result = self.run_script("safe_db_update.py", "restore", "dev", self.backup.name, "--yes")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn("page size (4096 bytes) differs", result.stderr)
        self.assertIn("stop the application", result.stderr)
        self.assertIn("nothing changed", result.stderr)
        self.assertEqual(app.execute("SELECT id FROM user ORDER BY id").fetchall(),
                         [(1,), (2,), (3,), (4,)])
        self.assertEqual(app.execute("PRAGMA journal_mode").fetchone(), ("wal",))
        self.assertEqual(self.backups("dev"), [self.backup])


class WhatRanOutTests(ProjectTestCase):
    """RLIMIT_FSIZE in the tool's process: Python ignores SIGXFSZ, so writes get EFBIG."""

    def run_limited(self, limit: int, script: str, *argv: str) -> subprocess.CompletedProcess:
        def small_files() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return subprocess.run([sys.executable, str(ROOT / script), "--config", str(self.config),
                               *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              preexec_fn=small_files, timeout=60)

    def setUp(self) -> None:
        super().setUp()
        self.live = self.create("dev")
        with closing(sqlite3.connect(self.live)) as conn:
            conn.executemany("INSERT INTO user (email, name) VALUES (?, ?)",
                             [(f"u{i}@x", "x" * 200) for i in range(2000)])
            conn.commit()
        self.size = self.live.stat().st_size

    def assertSaysWhatRanOut(self, result: subprocess.CompletedProcess) -> None:
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("dev", result.stderr)
        self.assertIn("out of file size", result.stderr)
        self.assertIn("file size limit (ulimit -f = ", result.stderr)

    @unittest.skipUnless(os.path.exists("/dev/full"), "needs /dev/full")
    def test_a_full_disk_is_called_out_of_disk_space(self) -> None:
        with self.assertRaises(OSError) as caught:          # /dev/full: ENOSPC, for real
            with open("/dev/full", "wb") as full:
                full.write(b"x")
        self.assertTrue(safe_db_update.describe_error(caught.exception)
                        .startswith("out of disk space ("))

    def test_backup_names_the_instance_and_the_file_size_limit(self) -> None:
        before = sha256(self.live)
        self.assertSaysWhatRanOut(self.run_limited(self.size // 2, "safe_db_update.py",
                                                   "backup", "dev"))
        self.assertEqual(sha256(self.live), before)
        self.assertEqual(self.backups("dev"), [])

    def test_restore_over_a_deleted_file_names_the_instance_and_the_limit(self) -> None:
        self.assertEqual(self.run_script("safe_db_update.py", "backup", "dev").returncode, 0)
        self.live.unlink()
        self.assertSaysWhatRanOut(self.run_limited(self.size // 2, "safe_db_update.py",
                                                   "restore", "dev", "--yes"))
        self.assertFalse(self.live.exists())
        self.assertEqual(os.listdir(self.live.parent), [])

    def test_a_migration_that_reaches_the_limit_names_the_instance_and_the_limit(self) -> None:
        self.write_migration("0003_copy.sql", "CREATE TABLE copy AS SELECT * FROM user;\n")
        before = sha256(self.live)
        result = self.run_limited(self.size + 4096, "database_migration.py", "migrate", "dev")
        self.assertSaysWhatRanOut(result)
        self.assertIn("rolled back, nothing changed", result.stderr)
        self.assertEqual(sha256(self.live), before)


if __name__ == "__main__":
    unittest.main()
