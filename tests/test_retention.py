"""Retention that never loses the last good restore point: verified backups only,
identical copies, keep_daily/weekly/monthly, a clock stepped back, unverified copies,
leftovers of a killed backup, and restore verifying under the lock.

Failures are made for real: a page of garbage in the live file and nightly backups
run as subprocesses, migrations that fail, a clock shifted in the tool's own process
(a sitecustomize on PYTHONPATH), a SIGKILL, and a second process holding the lock.
"""

from __future__ import annotations

import datetime
import json
import os
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

try:
    import fcntl
except ImportError:     # pragma: no cover - Windows: no flock, no lock to hold
    fcntl = None

from tests.support import (ROOT, ProjectTestCase, damage_a_page, database_migration, query,
                           safe_db_update, sha256)

SAFETY_TIMEOUT = 30     # seconds; only so that a hang fails instead of blocking CI

# Put in the tool's own process (PYTHONPATH): the clock runs SHIFT_SECONDS ahead.
CLOCK_AHEAD = r"""
import datetime, os, time
_shift = float(os.environ["SHIFT_SECONDS"])
_time = time.time
time.time = lambda: _time() + _shift

class _ShiftedDateTime(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime.datetime.fromtimestamp(time.time(), tz)

    @classmethod
    def utcnow(cls):
        return datetime.datetime.utcfromtimestamp(time.time())

datetime.datetime = _ShiftedDateTime
"""

# Put in the tool's own process: SIGKILL right after a manifest is renamed into place,
# before its backup file is (the window a kill or a power cut can hit).
KILL_AFTER_MANIFEST = r"""
import os, pathlib, signal
_replace = pathlib.Path.replace
def _replace_then_die(self, target):
    result = _replace(self, target)
    if str(target).endswith(".db.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    return result
pathlib.Path.replace = _replace_then_die
"""


class RetentionTestCase(ProjectTestCase):
    ini = "[DEFAULT]\nkeep_backups = 3\nbusy_timeout = 10\n\n[dev]\npath = instance/dev.db\n"

    def setUp(self) -> None:
        super().setUp()
        self.live = self.create()
        self.next_user = 100

    def add_user(self) -> int:
        """A committed change, so that the next backup is a different restore point."""
        self.next_user += 1
        with closing(sqlite3.connect(self.live)) as conn:
            conn.execute("INSERT INTO user (id, email, name) VALUES (?, ?, 'n')",
                         (self.next_user, f"u{self.next_user}@x"))
            conn.commit()
        return self.next_user

    def nightly(self, env: dict | None = None) -> subprocess.CompletedProcess:
        """The cron line: backup --all --quiet in its own process."""
        return self.run_script("safe_db_update.py", "backup", "--all", "--quiet", env=env)

    def cli(self, *argv: str) -> tuple[int, str, str]:
        return self.run_cli(safe_db_update, *argv)

    def cli_json(self, module, *argv: str) -> dict:
        code, out, err = self.run_cli(module, *argv, "--json")
        self.assertEqual(code, 0, err)
        return json.loads(out)

    def listed(self) -> list[dict]:
        return self.cli_json(safe_db_update, "list-backups", "dev")["backups"]

    def manifest(self, backup: Path) -> dict:
        return json.loads(Path(f"{backup}.json").read_text(encoding="utf-8"))

    def damage_a_page(self) -> None:
        damage_a_page(self.live)


class DamagedDatabaseTests(RetentionTestCase):
    """Item 1: nights of failed backups never push out the last verified ones."""

    def test_nightly_backups_of_a_damaged_database_keep_every_verified_backup(self) -> None:
        good = []
        for _ in range(3):
            self.add_user()
            result = self.nightly()
            self.assertEqual((result.returncode, result.stderr), (0, ""))
            good.append(Path(self.listed()[0]["path"]))
        users = query(good[-1], "SELECT COUNT(*) FROM user")
        self.damage_a_page()
        for _ in range(3):
            result = self.nightly()
            self.assertEqual(result.returncode, 1)
            self.assertIn("unverified", result.stderr)
            self.assertNotIn("Traceback", result.stderr)
        listed = self.listed()
        self.assertEqual(len(listed), 6)
        self.assertEqual([Path(b["path"]) for b in listed if b["verified"]], good[::-1])
        for backup in good:
            self.assertEqual(self.run_script("safe_db_update.py", "verify", "dev",
                                             backup.name).returncode, 0)
        # Marked in the listing; 'the newest' is the newest verified one everywhere.
        code, text, _ = self.cli("list-backups", "dev")
        self.assertEqual(text.count("UNVERIFIED"), 4, text)     # three copies and the legend
        self.assertNotIn("UNVERIFIED", next(line for line in text.splitlines() if good[-1].name in line))
        code, out, _ = self.run_cli(database_migration, "status", "--json")
        status = json.loads(out)["instances"][0]
        self.assertEqual((code, status["state"]), (1, "error"))      # damaged: never 'up to date'
        self.assertEqual(status["last_backup"], self.manifest(good[-1])["created_at"])
        self.assertEqual(self.cli_json(safe_db_update, "verify", "dev")["path"], str(good[-1]))
        self.assertEqual(self.cli_json(safe_db_update, "info", "dev")["backups"],
                         {"count": 6, "newest": str(good[-1])})
        result = self.run_script("safe_db_update.py", "restore", "dev", "--yes", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["restored_from"], str(good[-1]))
        self.assertEqual(query(self.live, "SELECT COUNT(*) FROM user"), users)
        self.assertEqual(self.cli("check", "dev")[0], 0)

    def test_unverified_copies_go_once_the_verified_backups_around_them_have_gone(self) -> None:
        self.add_user()
        self.assertEqual(self.nightly().returncode, 0)
        good = Path(self.listed()[0]["path"])
        self.damage_a_page()
        self.assertEqual(self.nightly().returncode, 1)
        [copy] = [Path(b["path"]) for b in self.listed() if not b["verified"]]
        code, _, err = self.cli("restore", "dev", good.name, "--yes")
        self.assertEqual(code, 0, err)
        pre_restore = [Path(b["path"]) for b in self.listed() if b["reason"] == "pre-restore"]
        self.assertEqual([self.manifest(p)["verified"] for p in pre_restore], [False])
        for night in range(1, 5):
            self.add_user()
            code, _, err = self.cli("backup", "dev")
            self.assertEqual(code, 0, err)
            present = {Path(b["path"]) for b in self.listed()}
            # Kept while a verified backup older than them is kept (the first three nights).
            self.assertEqual(copy in present, night < 3, night)
            self.assertEqual(pre_restore[0] in present, night < 3, night)
        self.assertEqual([b["verified"] for b in self.listed()], [True] * 3)


class FailedMigrationTests(RetentionTestCase):
    """Item 1: failed migrations retried in a loop make identical copies."""

    def test_four_failed_migrations_do_not_push_out_three_manual_backups(self) -> None:
        manual = []
        for _ in range(3):
            self.add_user()
            manual.append(Path(self.cli_json(safe_db_update, "backup", "dev")["path"]))
        self.write_migration("0003_broken.sql", "-- migrate:up\nALTER TABLE nosuch ADD COLUMN x TEXT;\n")
        copies = []
        for _ in range(4):
            code, _, err = self.migrate("dev")
            self.assertEqual(code, 1)
            self.assertIn("nosuch", err)
            copies.append(Path(err.split("backup: ")[-1].strip()))
        self.assertEqual(len({sha256(p) for p in copies if p.exists()} | {sha256(manual[-1])}), 1)
        present = {Path(b["path"]) for b in self.listed()}
        for backup in manual:
            self.assertIn(backup, present)
            self.assertEqual(self.cli("verify", "dev", backup.name)[0], 0)
        # The copies are bounded: the newest keep_backups are kept, older ones go.
        self.assertEqual([p in present for p in copies], [False, True, True, True])
        self.assertEqual(len(present), 6)


class PolicyTests(RetentionTestCase):
    """Item 2: keep_daily, keep_weekly and keep_monthly, as restic's --keep-* do."""

    ini = ("[DEFAULT]\nkeep_backups = 2\nkeep_weekly = 3\nbusy_timeout = 10\n\n"
           "[dev]\npath = instance/dev.db\nkeep_daily = 5\nkeep_monthly = 2\n")

    def plant(self, when: datetime.datetime, reason: str = "manual") -> Path:
        """A real, verified backup of a new state, as if it had been made at `when`."""
        self.add_user()
        made = safe_db_update.create_backup(self.instance(), reason)
        path = made.path.with_name(f"dev-{when.strftime('%Y%m%dT%H%M%S%fZ')}-{reason}.db")
        manifest = {**made.manifest(), "created_at": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
        Path(f"{path}.json").write_text(json.dumps(manifest), encoding="utf-8")
        made.path.replace(path)
        Path(f"{made.path}.json").unlink()
        return path

    def make_nightlies(self) -> dict[str, Path]:
        """Nightly backups at 02:00 UTC from 2020-01-01 to 2020-03-31, and two made by day."""
        made = {}
        day = datetime.datetime(2020, 1, 1, 2, tzinfo=datetime.timezone.utc)
        while day.month <= 3:
            made[day.strftime("%m-%d")] = self.plant(day)
            day += datetime.timedelta(days=1)
        made["03-30 10:00"] = self.plant(datetime.datetime(2020, 3, 30, 10, tzinfo=datetime.timezone.utc),
                                         "pre-migrate")
        made["03-31 14:00"] = self.plant(datetime.datetime(2020, 3, 31, 14, tzinfo=datetime.timezone.utc))
        return made

    def test_prune_dry_run_names_the_rule_that_keeps_each_backup(self) -> None:
        made = self.make_nightlies()
        expected = {     # 2020-03-31 is a Tuesday of ISO week 14; 2020 is a leap year
            "03-31 14:00": ["newest", "keep_backups", "keep_daily 2020-03-31",
                            "keep_weekly 2020-W14", "keep_monthly 2020-03"],
            "03-31": ["keep_backups"],
            "03-30 10:00": ["keep_daily 2020-03-30"],
            "03-29": ["keep_daily 2020-03-29", "keep_weekly 2020-W13"],
            "03-28": ["keep_daily 2020-03-28"],
            "03-27": ["keep_daily 2020-03-27"],
            "03-22": ["keep_weekly 2020-W12"],
            "02-29": ["keep_monthly 2020-02"],
        }
        files = sorted(p.name for p in self.live.parent.parent.glob("backups/dev/database/*"))
        data = self.cli_json(safe_db_update, "prune", "dev", "--dry-run")
        self.assertEqual(data["policy"], {"keep_backups": 2, "keep_daily": 5, "keep_weekly": 3,
                                          "keep_monthly": 2})
        verdicts = {Path(v["path"]): v for v in data["backups"]}
        for label, path in made.items():
            with self.subTest(backup=label):
                self.assertEqual(verdicts[path]["kept_by"], expected.get(label, []))
                self.assertEqual(verdicts[path]["keep"], label in expected)
        self.assertEqual(len(data["removed"]), len(made) - len(expected))
        code, text, err = self.cli("prune", "dev", "--dry-run")
        self.assertEqual(code, 0, err)
        self.assertRegex(text, rf"dev: keep +{made['02-29'].name} +keep_monthly 2020-02\n")
        self.assertRegex(text, rf"dev: would remove +{made['02-28'].name}\n")
        self.assertIn(f"would remove {len(made) - len(expected)} backup(s), keeping 8 (keep_backups "
                      f"= 2, keep_daily = 5, keep_weekly = 3, keep_monthly = 2)", text)
        self.assertEqual(sorted(p.name for p in self.live.parent.parent.glob("backups/dev/database/*")),
                         files)
        code, _, err = self.cli("prune", "dev", "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual({Path(b["path"]) for b in self.listed()}, {made[k] for k in expected})

    def test_the_nightly_backup_applies_the_policy_too(self) -> None:
        made = self.make_nightlies()
        self.add_user()
        result = self.nightly()                     # today: a new day, week and month
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        kept = [Path(b["path"]) for b in self.listed()]
        self.assertEqual(kept[1:], [made[k] for k in ("03-31 14:00", "03-30 10:00", "03-29", "03-28")])

    def test_a_misspelt_policy_key_is_a_configuration_error(self) -> None:
        self.config.write_text(self.ini.replace("keep_daily", "keep_dayly"), encoding="utf-8")
        code, _, err = self.cli("prune", "dev", "--dry-run")
        self.assertEqual(code, 2)
        self.assertIn("keep_dayly", err)
        self.config.write_text(self.ini.replace("keep_daily = 5", "keep_daily = -1"), encoding="utf-8")
        code, _, err = self.cli("prune", "dev", "--dry-run")
        self.assertEqual(code, 2)
        self.assertIn("keep_daily must be a whole number", err)


class ClockSteppedBackTests(RetentionTestCase):
    """Item 3: a backup made while the clock was a year ahead."""

    ini = "[DEFAULT]\nkeep_backups = 2\nbusy_timeout = 10\n\n[dev]\npath = instance/dev.db\n"

    def test_a_future_dated_backup_is_kept_and_never_the_newest(self) -> None:
        shim = self.root / "clock"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(CLOCK_AHEAD, encoding="utf-8")
        ahead = {"PYTHONPATH": str(shim), "SHIFT_SECONDS": str(365 * 86400)}
        self.add_user()
        self.assertEqual(self.nightly().returncode, 0)
        self.add_user()
        result = self.run_script("safe_db_update.py", "backup", "dev", "--json", env=ahead)
        self.assertEqual(result.returncode, 0, result.stderr)
        future = Path(json.loads(result.stdout)["path"])
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        self.assertGreater(self.manifest(future)["created_at"], now)       # the shim worked
        real = []
        for _ in range(3):                          # the clock is right again
            self.add_user()
            users = query(self.live, "SELECT COUNT(*) FROM user")
            result = self.nightly()
            self.assertEqual((result.returncode, result.stderr), (0, ""))
            real.append(Path(next(b["path"] for b in self.listed() if not b["future"])))
        listed = self.listed()
        self.assertEqual([Path(b["path"]) for b in listed], [future, real[2], real[1]])
        self.assertEqual([b["future"] for b in listed], [True, False, False])
        code, text, _ = self.cli("list-backups", "dev")
        self.assertIn("DATED IN THE FUTURE", next(line for line in text.splitlines()
                                                  if future.name in line))
        status = self.cli_json(database_migration, "status")["instances"][0]
        self.assertEqual(status["last_backup"], self.manifest(real[2])["created_at"])
        self.assertEqual(self.cli_json(safe_db_update, "verify", "dev")["path"], str(real[2]))
        kept_by = {Path(v["path"]): v["kept_by"]
                   for v in self.cli_json(safe_db_update, "prune", "dev", "--dry-run")["backups"]}
        self.assertEqual(kept_by[future], ["future"])
        self.assertEqual(kept_by[real[2]], ["newest", "keep_backups"])
        self.add_user()
        result = self.run_script("safe_db_update.py", "restore", "dev", "--yes", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["restored_from"], str(real[2]))
        self.assertEqual(query(self.live, "SELECT COUNT(*) FROM user"), users)


class LeftoverTests(RetentionTestCase):
    """Item 10: what a killed backup leaves is cleared by the next one, under the lock."""

    def test_a_manifest_left_without_its_backup_by_a_kill_is_removed_by_the_next_backup(self) -> None:
        self.assertEqual(self.nightly().returncode, 0)
        shim = self.root / "kill"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(KILL_AFTER_MANIFEST, encoding="utf-8")
        result = self.run_script("safe_db_update.py", "backup", "dev", env={"PYTHONPATH": str(shim)})
        self.assertEqual(result.returncode, -9)
        folder = self.root / "backups" / "dev" / "database"
        [orphan] = [p for p in folder.glob("*.db.json") if not Path(str(p)[:-5]).exists()]
        hidden = list(folder.glob(".*.partial"))
        self.assertEqual(len(hidden), 1)                    # the copy never renamed into place
        draft = folder / "dev-20200101T000000000000Z-manual.db.json.partial"
        draft.write_text("{", encoding="utf-8")             # a manifest draft cut short
        self.assertEqual(len(self.listed()), 1)             # neither passes for a backup
        self.assertEqual(self.nightly().returncode, 0)
        self.assertFalse(orphan.exists())
        self.assertFalse(draft.exists())
        self.assertEqual([p for p in hidden if p.exists()], [])
        names = sorted(p.name for p in folder.iterdir())
        self.assertEqual(len(names), 4, names)              # two backups and their manifests
        self.assertEqual(len(self.listed()), 2)


class RestoreUnderLockTests(RetentionTestCase):
    """Item 10: restore verifies the backup only once it holds the instance's lock."""

    def restore_while_the_lock_is_held(self, change) -> subprocess.CompletedProcess:
        """Hold the lock; start restore; once it waits for the lock, change the backup."""
        lock = self.root / "backups" / "dev" / "lock"
        with open(lock, "a+") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            process = subprocess.Popen(
                [sys.executable, str(ROOT / "safe_db_update.py"), "--config", str(self.config),
                 "restore", "dev", self.backup.name, "--yes"], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.root)
            deadline = time.monotonic() + SAFETY_TIMEOUT
            while not self.has_open(process.pid, lock):
                self.assertIsNone(process.poll(), "restore ended before it asked for the lock")
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.01)
            change()
        out, err = process.communicate(timeout=SAFETY_TIMEOUT)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    @staticmethod
    def has_open(pid: int, path: Path) -> bool:
        try:
            return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path)
                       for fd in os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            return False

    def setUp(self) -> None:
        super().setUp()
        if fcntl is None or not Path("/proc/self/fd").is_dir():
            self.skipTest("needs /proc to see that restore waits for the lock")
        self.add_user()
        self.backup = Path(self.cli_json(safe_db_update, "backup", "dev")["path"])
        self.add_user()
        self.digest = sha256(self.live)

    def test_a_backup_damaged_while_restore_waits_for_the_lock_is_refused(self) -> None:
        def damage() -> None:
            with open(self.backup, "r+b") as handle:
                handle.seek(4096)
                handle.write(b"\xff" * 4096)
        result = self.restore_while_the_lock_is_held(damage)
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertIn("failed verification", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(sha256(self.live), self.digest)
        self.assertEqual([b["reason"] for b in self.listed()], ["manual"])   # no pre-restore

    def test_a_backup_removed_while_restore_waits_for_the_lock_is_refused(self) -> None:
        def remove() -> None:       # what a prune holding the lock would do
            self.backup.unlink()
            Path(f"{self.backup}.json").unlink()
        result = self.restore_while_the_lock_is_held(remove)
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertIn("nothing restored", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(sha256(self.live), self.digest)
