"""migrate-all --jobs 2 when a worker or the parent process is killed or interrupted.

Every instance runs a Python migration that writes the pid of the worker running it
beside the database (<db>.worker) and, for the instances named slow*, sleeps: the
moment to send a real signal to a real process. No test hook in the product.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import ROOT, database_migration, query
from tests.test_fleets import FleetTestCase

SAFETY_TIMEOUT = 60
PROMPT = 5.0                # seconds within which a reader must see EOF, and workers be gone

SLOW_OR_MARKED = '''"""Marks which worker ran it; sleeps on instances named slow*."""
import os
import time
from pathlib import Path


def up(conn):
    path = Path(conn.execute("PRAGMA database_list").fetchone()[2])
    conn.execute("CREATE TABLE ran_in (pid INTEGER)")
    conn.execute("INSERT INTO ran_in VALUES (?)", (os.getpid(),))
    Path(f"{path}.worker").write_text(str(os.getpid()))
    if path.stem.startswith("slow"):
        time.sleep(60)
'''


def alive(pid: int) -> bool:
    """Running (a zombie that nobody has reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


class WorkerKillTests(FleetTestCase):
    def add_tenants(self, *stems: str) -> list[Path]:
        """The tenants at version 2; then the migration that marks (and sleeps) as 0003."""
        paths = super().add_tenants(*stems)
        shutil.copyfile(self.db("dev"), self.db("prod"))
        self.write_migration("0003_mark_the_worker.py", SLOW_OR_MARKED)
        return paths

    def start_migrate_all(self) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, str(ROOT / "database_migration.py"),
                                    "--config", str(self.config), "migrate-all", "--jobs", "2",
                                    "--json"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=self.root)
        self.addCleanup(self.kill_everything, process)
        return process

    def kill_everything(self, process: subprocess.Popen) -> None:
        for pid in {process.pid, *self.worker_pids().values()} - {os.getpid()}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.communicate()

    def worker_pids(self) -> dict[str, int]:
        """Instance file stem -> the pid of the worker that started migrating it."""
        found = {}
        for marker in list(self.tenants.glob("*.db.worker")) + list(self.db().parent.glob("*.worker")):
            text = marker.read_text()
            if text:
                found[marker.name.split(".")[0]] = int(text)
        return found

    def wait_for_workers(self, *stems: str) -> dict[str, int]:
        deadline = time.monotonic() + SAFETY_TIMEOUT
        while not set(stems) <= set(self.worker_pids()):
            self.assertLess(time.monotonic(), deadline, "the slow instances never started")
            time.sleep(0.01)
        return self.worker_pids()

    def assertAllGone(self, pids) -> None:
        deadline = time.monotonic() + PROMPT
        while any(alive(pid) for pid in pids):
            self.assertLess(time.monotonic(), deadline,
                            f"still running: {[pid for pid in pids if alive(pid)]}")
            time.sleep(0.02)

    def version(self, path: Path) -> int:
        return query(path, "SELECT MAX(version) FROM schema_migrations")[0][0]

    def test_a_killed_worker_fails_its_own_instance_only(self) -> None:
        self.add_tenants("slow", "acme", "globex", "initech", "umbrella")
        process = self.start_migrate_all()
        victim = self.wait_for_workers("slow")["slow"]
        os.kill(victim, signal.SIGKILL)
        out, err = process.communicate(timeout=SAFETY_TIMEOUT)
        self.assertEqual(process.returncode, 1, err)
        self.assertNoTraceback(err)
        rows = {row["name"]: row for row in json.loads(out)["instances"]}
        self.assertEqual(list(rows), ["dev", "tenants/acme", "tenants/globex", "tenants/initech",
                                      "tenants/slow", "tenants/umbrella", "prod"])
        slow = rows.pop("tenants/slow")
        self.assertEqual(slow["result"], "failed")
        self.assertIn("the worker migrating it died (killed by signal 9 (SIGKILL))", slow["error"])
        self.assertIn("tenants/slow: the worker migrating it died", err)
        for name, row in rows.items():
            with self.subTest(instance=name):
                self.assertEqual((row["result"], row["error"], row["to_version"]), ("ok", None, 3))
                self.assertEqual(self.version(self.instance(name).path), 3)
        self.assertEqual(self.version(self.tenant("slow")), 2)      # rolled back by SQLite
        self.assertEqual(query(self.tenant("slow"), "PRAGMA integrity_check"), [("ok",)])
        self.assertAllGone(self.worker_pids().values())
        code, _, err = self.run_cli(database_migration, "check", "tenants/slow")
        self.assertEqual(code, 1, err)          # pending again; nothing half-done to clear

    def parallel_run_with_two_sleepers(self) -> tuple[subprocess.Popen, dict[str, int]]:
        """slow1 and slow2 first in the fleet: both workers busy sleeping; three waiting."""
        self.add_tenants("slow1", "slow2", "tail1", "tail2", "tail3")
        (self.root / "instances.ini").write_text(
            "[tenants]\npath = tenants/*.db\n\n[DEFAULT]\nbusy_timeout = 2\n", encoding="utf-8")
        process = self.start_migrate_all()
        return process, self.wait_for_workers("slow1", "slow2")

    def assertStoppedWithoutStartingAnother(self, pids: dict[str, int]) -> None:
        self.assertAllGone(pids.values())
        self.assertEqual(set(self.worker_pids()), {"slow1", "slow2"})
        for stem in ("slow1", "slow2", "tail1", "tail2", "tail3"):
            with self.subTest(instance=stem):
                self.assertEqual(self.version(self.tenant(stem)), 2)
                self.assertEqual(query(self.tenant(stem), "PRAGMA integrity_check"), [("ok",)])
        for stem in ("slow1", "slow2"):
            history = self.root / "backups" / "tenants" / stem / "history.jsonl"
            last = json.loads(history.read_text(encoding="utf-8").splitlines()[-1])
            self.assertEqual((last["operation"], last["version_after"]), ("migrate", 2))
            self.assertTrue(last["outcome"].startswith("failed"), last)

    def test_a_killed_parent_leaves_no_worker_and_its_reader_sees_the_end(self) -> None:
        process, pids = self.parallel_run_with_two_sleepers()
        os.kill(process.pid, signal.SIGKILL)
        started = time.monotonic()
        process.communicate(timeout=SAFETY_TIMEOUT)     # EOF on stdout and stderr
        self.assertLess(time.monotonic() - started, PROMPT, "a worker kept the pipes open")
        self.assertEqual(process.returncode, -signal.SIGKILL)
        self.assertStoppedWithoutStartingAnother(pids)

    def test_an_interrupted_parent_interrupts_its_workers_and_exits_130(self) -> None:
        process, pids = self.parallel_run_with_two_sleepers()
        os.kill(process.pid, signal.SIGINT)             # the parent alone, not its group
        started = time.monotonic()
        out, err = process.communicate(timeout=SAFETY_TIMEOUT)
        self.assertLess(time.monotonic() - started, PROMPT)
        self.assertEqual(process.returncode, 130, err)
        self.assertIn("interrupted", err)
        self.assertNoTraceback(err)
        self.assertStoppedWithoutStartingAnother(pids)
