"""Edges of everyday operation: a dry run with no room in the temporary folder,
migrate-all's summary and JSON rows for failed and skipped instances, and the
leftovers of a killed --create.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

from tests.support import ROOT, ProjectTestCase, database_migration, query, sha256

MIGRATE_KEYS = {"name", "from_version", "to_version", "applied", "backup", "dry_run", "seconds"}
SMALL = 256 * 1024          # bytes of room in the "temporary folder"
SAFETY_TIMEOUT = 60


def can_mount_a_small_tmpfs() -> bool:
    """A private mount namespace with a tmpfs (root, or unprivileged user namespaces)."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, stdin=subprocess.DEVNULL)
    return probe.returncode == 0


class DryRunWithoutRoomTests(ProjectTestCase):
    """TMPDIR on a full little file system (or, where none can be mounted, RLIMIT_FSIZE)."""

    def setUp(self) -> None:
        super().setUp()
        self.write_migration("0003_add_status.sql", "ALTER TABLE loan ADD COLUMN status TEXT;\n")
        for name in ("dev", "prod"):
            code, _, err = self.migrate(name, "--create", "--to", "2")
            self.assertEqual(code, 0, err)
            with closing(sqlite3.connect(self.db(name))) as conn:   # 2 MB: more than there is room for
                conn.executemany("INSERT INTO user (email, name) VALUES (?, ?)",
                                 [(f"{i}@x", "n" * 1000) for i in range(2000)])
                conn.commit()
        self.before = {name: sha256(self.db(name)) for name in ("dev", "prod")}
        self.small = self.root / "small-tmp"
        self.small.mkdir()

    def ways_to_run_out_of_room(self):
        """(label, how to run a CLI with a temporary folder that has no room)."""
        script = str(ROOT / "database_migration.py")
        env = {**os.environ, "TMPDIR": str(self.small)}

        def limited(*argv: str) -> subprocess.CompletedProcess:
            def limit() -> None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (SMALL, SMALL))
            return subprocess.run([sys.executable, script, "--config", str(self.config), *argv],
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  env=env, preexec_fn=limit, timeout=SAFETY_TIMEOUT)
        yield "RLIMIT_FSIZE", limited
        if can_mount_a_small_tmpfs():
            def full_tmpfs(*argv: str) -> subprocess.CompletedProcess:
                mount = f'mount -t tmpfs -o size={SMALL} tmpfs "$0" && exec "$@"'
                return subprocess.run(["unshare", "-rm", "sh", "-c", mount, str(self.small),
                                       sys.executable, script, "--config", str(self.config), *argv],
                                      capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                      env=env, timeout=SAFETY_TIMEOUT)
            yield "a full tmpfs", full_tmpfs

    def assertNothingChanged(self) -> None:
        self.assertEqual({name: sha256(self.db(name)) for name in ("dev", "prod")}, self.before)
        self.assertEqual(self.backups("dev") + self.backups("prod"), [])
        self.assertEqual(list(self.small.iterdir()), [])

    def test_migrate_dry_run_says_so_in_one_line(self) -> None:
        for label, run in self.ways_to_run_out_of_room():
            with self.subTest(label):
                result = run("migrate", "dev", "--dry-run")
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertNoTraceback(result.stderr)
                self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
                self.assertIn("dev: dry run: cannot copy the database into the temporary folder",
                              result.stderr)
                self.assertIn("TMPDIR", result.stderr)
                self.assertNothingChanged()

    def test_migrate_all_dry_run_still_prints_its_summary(self) -> None:
        for label, run in self.ways_to_run_out_of_room():
            with self.subTest(label):
                result = run("migrate-all", "--dry-run")
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertNoTraceback(result.stderr)
                self.assertIn("migrate-all: 0 ok, 1 failed, 1 skipped", result.stdout)
                self.assertIn("failed: dev (its error is above)", result.stdout)
                self.assertEqual(result.stderr.count("dev: dry run: cannot copy"), 1, result.stderr)
                result = run("migrate-all", "--dry-run", "--keep-going", "--json")
                self.assertEqual(result.returncode, 1, result.stderr)
                rows = json.loads(result.stdout)["instances"]
                self.assertEqual([(r["name"], r["result"]) for r in rows],
                                 [("dev", "failed"), ("prod", "failed")])
                for row in rows:
                    self.assertLessEqual(MIGRATE_KEYS, set(row))
                    self.assertEqual((row["from_version"], row["dry_run"]), (2, True))
                self.assertNothingChanged()


class MigrateAllRowsTests(ProjectTestCase):
    """migrate-all --json: a failed or skipped instance's row has every key of migrate --json."""

    def test_failed_and_skipped_rows_carry_every_key(self) -> None:
        self.create("dev")
        self.create("prod")
        self.write_migration("0003_broken.sql", "ALTER TABLE loan ADD COLUMN status TEXT;\n"
                                                "INSERT INTO no_such_table VALUES (1);\n")
        code, out, err = self.run_cli(database_migration, "migrate-all", "--json")
        self.assertEqual(code, 1, err)
        dev, prod = json.loads(out)["instances"]
        ok_keys = MIGRATE_KEYS | {"result", "error"}
        self.assertEqual(set(dev), ok_keys)
        self.assertEqual(set(prod), ok_keys)
        [backup] = self.backups("dev")
        self.assertEqual({k: dev[k] for k in ("name", "from_version", "to_version", "applied",
                                              "backup", "dry_run", "result")},
                         {"name": "dev", "from_version": 2, "to_version": 2, "applied": [],
                          "backup": str(backup), "dry_run": False, "result": "failed"})
        self.assertIn("no_such_table", dev["error"])
        self.assertIsInstance(dev["seconds"], float)
        self.assertEqual(prod, {"name": "prod", "from_version": None, "to_version": None,
                                "applied": [], "backup": None, "dry_run": False, "seconds": 0.0,
                                "result": "skipped", "error": None})
        self.assertEqual(query(self.db("dev"), "SELECT MAX(version) FROM schema_migrations"), [(2,)])


class KilledCreateTests(ProjectTestCase):
    """SIGKILL during migrate --create; the next run removes what it left, under the lock."""

    SLOW = ("CREATE TABLE numbers (n INTEGER);\n"
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 5000000)\n"
            "INSERT INTO numbers SELECT n FROM c;\n")

    def kill_during_create(self) -> list[Path]:
        self.write_migration("0003_numbers.sql", self.SLOW)
        process = subprocess.Popen([sys.executable, str(ROOT / "database_migration.py"), "--config",
                                    str(self.config), "migrate", "dev", "--create"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        self.addCleanup(process.kill)
        journal = self.db().with_name(f".dev.db.creating-{process.pid}-journal")
        deadline = time.monotonic() + SAFETY_TIMEOUT
        while not journal.exists():
            self.assertIsNone(process.poll(), "the run ended before it could be killed")
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=SAFETY_TIMEOUT)
        return sorted(self.db().parent.glob(".dev.db.creating-*"))

    def test_the_next_create_removes_the_draft_and_its_journal(self) -> None:
        leftovers = self.kill_during_create()
        self.assertEqual([p.name.rsplit("-", 1)[-1] for p in leftovers][-1:], ["journal"])
        self.assertGreaterEqual(len(leftovers), 2, leftovers)
        self.assertFalse(self.db().exists())
        self.write_migration("0003_numbers.sql", "CREATE TABLE numbers (n INTEGER);\n")
        code, out, err = self.migrate("dev", "--create")
        self.assertEqual(code, 0, err)
        self.assertEqual(sorted(p.name for p in self.db().parent.iterdir()), ["dev.db"])
        self.assertEqual(query(self.db(), "SELECT MAX(version) FROM schema_migrations"), [(3,)])
        self.assertEqual(query(self.db(), "PRAGMA integrity_check"), [("ok",)])

    def test_a_draft_of_another_instance_is_left_alone(self) -> None:
        others = [self.db().with_name(name) for name in
                  (".prod.db.creating-12345", ".dev.db.creating-notapid", "dev.db.creating-1")]
        for other in others:
            other.write_bytes(b"not ours")
        code, _, err = self.migrate("dev", "--create")
        self.assertEqual(code, 0, err)
        self.assertTrue(all(other.exists() for other in others))
