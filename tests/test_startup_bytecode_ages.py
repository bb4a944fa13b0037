"""Three loose ends, from outside: Ctrl-C while a command starts, bytecode beside the
migrations, and backup ages east of UTC (issue 13); real subprocesses throughout."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import unittest
from pathlib import Path

from tests.support import ROOT, ProjectTestCase, database_migration, query, sha256

SCRIPTS = ("database_migration.py", "safe_db_update.py")

# What pip writes for a console script (pyproject's [project.scripts]).
CONSOLE_SCRIPT = """# -*- coding: utf-8 -*-
import re
import sys
from database_migration import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""

# Sends SIGINT to itself when the script named by $INTERRUPT_IN reaches its first import
# after `from __future__` (which must come first, so nothing can catch an interrupt there).
SEND_SIGINT_AT_FIRST_IMPORT = """
import os, signal, sys
def trace(frame, event, arg):
    if frame.f_code.co_name == "<module>" and frame.f_code.co_filename.endswith(
            os.environ["INTERRUPT_IN"]):
        return on_line
def on_line(frame, event, arg):
    if event == "line" and open(frame.f_code.co_filename).read().splitlines()[
            frame.f_lineno - 1].strip() == "import os":
        sys.settrace(None)
        os.kill(os.getpid(), signal.SIGINT)
        return None
    return on_line
sys.settrace(trace)
"""

OUR_FRAME = re.compile(r'File "[^"]*?(database_migration|safe_db_update)\.py", line (\d+)')


def hold_line(script: str) -> int:
    """The line where the script holds Ctrl-C back (0 if it does not)."""
    lines = (ROOT / script).read_text(encoding="utf-8").splitlines()
    return next((n for n, text in enumerate(lines, 1)
                 if "pthread_sigmask(signal.SIG_BLOCK" in text), 0)


@unittest.skipUnless(hasattr(signal, "pthread_sigmask"), "POSIX signals only")
class InterruptAtStartUpTests(ProjectTestCase):
    """SIGINT sent at growing delays after start, until it lands while the command starts."""

    WANTED = 3                      # landings during start-up per way of starting
    MOST = 60                       # trials per way of starting, at most

    def setUp(self) -> None:
        super().setUp()
        self.database = self.create()
        self.before = sha256(self.database)
        shutil.rmtree(self.root / "backups")            # the --create's audit line
        self.holds = {name: hold_line(f"{name}.py") for name in ("database_migration",
                                                                 "safe_db_update")}

    def touched(self) -> bool:
        return (self.root / "backups").exists() or sha256(self.database) != self.before

    def interrupt(self, command: list[str], delay: float | None) -> tuple[int, str]:
        """Run the command, with SIGINT sent after delay seconds (None: not sent)."""
        # -S: no site import, which on many machines is most of Python's own start-up;
        # an interrupt there is Python's ('Fatal Python error: init_import_site').
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        process = subprocess.Popen([sys.executable, "-S", *command, "--config", str(self.config),
                                    "backup", "dev", "-q"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=self.root, env=env)
        if delay is not None:
            time.sleep(delay)
            process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        self.assertEqual(out, "")
        return process.returncode, err

    def run_time(self, command: list[str]) -> float:
        """How long the whole command takes here and now, without an interrupt."""
        shutil.rmtree(self.root / "backups", ignore_errors=True)
        started = time.monotonic()
        code, err = self.interrupt(command, None)
        self.assertEqual((code, err), (0, ""))
        return time.monotonic() - started

    def landed_before_the_hold(self, err: str) -> bool:
        """Python's own start-up, or our first lines before Ctrl-C is held back."""
        return all(int(line) <= self.holds[name] for name, line in OUR_FRAME.findall(err))

    def assertInterruptsEndInOneLine(self, command: list[str], prog: str) -> None:
        """Delays spread over the whole run (a golden-ratio sweep of its measured length,
        so it scales with the machine's load) until WANTED land while the command starts."""
        landed, seen = 0, []
        for trial in range(self.MOST):
            if trial % 20 == 0:
                took = self.run_time(command)
            shutil.rmtree(self.root / "backups", ignore_errors=True)
            code, err = self.interrupt(command, took * ((trial * 0.6180339887) % 1.0))
            seen.append(code)
            if code == 130 and err == f"{prog}: interrupted\n":
                landed += not self.touched()            # else: during the command itself
            elif code == 0:
                # The command ran to its end: the signal came after it was done, or Python
                # swallowed it while starting (printing a traceback of its own, at times).
                self.assertTrue(self.landed_before_the_hold(err), err)
                self.assertTrue(self.touched())
            else:
                # Before the script held Ctrl-C back (Python starting, the script's first
                # lines): killed by the signal before Python could handle it, or Python's
                # own KeyboardInterrupt (exit 1 in its start-up, else 130 or by signal).
                self.assertIn(code, (-signal.SIGINT, 1, 130), err)
                self.assertTrue(self.landed_before_the_hold(err),
                                f"an interrupt while the command started gave:\n{err}")
                self.assertFalse(self.touched())
            self.assertEqual(sha256(self.database), self.before)
            if landed >= self.WANTED:
                return
        self.fail(f"only {landed} interrupt(s) landed while {command} started, in "
                  f"{self.MOST} trials (exit codes {seen})")

    def test_an_interrupt_while_either_script_starts_is_one_line_and_exit_130(self) -> None:
        for script in SCRIPTS:
            with self.subTest(script=script):
                self.assertInterruptsEndInOneLine([str(ROOT / script)], script)

    def test_an_interrupt_while_the_console_script_starts_is_one_line_and_exit_130(self) -> None:
        wrapper = self.root / "bin" / "database-migration"
        wrapper.parent.mkdir()
        wrapper.write_text(CONSOLE_SCRIPT, encoding="utf-8")
        self.assertInterruptsEndInOneLine([str(wrapper)], "database-migration")   # its own name

    def test_an_interrupt_held_back_at_start_up_is_raised_before_the_command_touches_anything(
            self) -> None:
        # The command's own code runs with Ctrl-C delivered: a held one is raised at once.
        code, out, err = self.run_cli(database_migration, "backup", "dev")
        self.assertEqual(code, 0, err)
        shutil.rmtree(self.root / "backups")
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        self.addCleanup(self.release_interrupts)
        os.kill(os.getpid(), signal.SIGINT)             # pending, as if sent at start-up
        code, out, err = self.run_cli(database_migration, "backup", "dev")
        self.assertEqual((code, out, err), (130, "", "database_migration.py: interrupted\n"))
        self.assertFalse(self.touched())
        self.assertIn(signal.SIGINT, signal.pthread_sigmask(signal.SIG_BLOCK, ()),
                      "held back again once the command is over")


    def test_an_interrupt_before_the_script_holds_ctrl_c_back_is_one_line_and_exit_130(
            self) -> None:
        # A sitecustomize sends SIGINT from a trace function as the script's first import
        # runs (the moment before the signal is held back), every time, not by chance.
        site = self.root / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SEND_SIGINT_AT_FIRST_IMPORT, encoding="utf-8")
        for script in SCRIPTS:
            with self.subTest(script=script):
                result = subprocess.run([sys.executable, str(ROOT / script), "--config",
                                         str(self.config), "backup", "dev"],
                                        capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                        env={**os.environ, "PYTHONPATH": str(site),
                                             "INTERRUPT_IN": script}, timeout=60)
                self.assertEqual((result.returncode, result.stderr),
                                 (130, f"{script}: interrupted\n"))
                self.assertFalse(self.touched())

    def release_interrupts(self) -> None:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)    # drops one still pending
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, previous)


class InterruptDuringMigrationTests(ProjectTestCase):
    """A real SIGINT in the middle of a migration's transaction."""

    ini = """[DEFAULT]
busy_timeout = 2

[a]
path = instance/a.db

[b]
path = instance/b.db
"""

    def test_ctrl_c_mid_transaction_rolls_back_and_stops_migrate_all(self) -> None:
        for name in ("a", "b"):
            self.create(name)
        self.write_migration("0003_interrupted.py", """import os
import signal
import time


def up(conn):
    conn.execute("DELETE FROM payment WHERE id > 0")
    os.kill(os.getpid(), signal.SIGINT)         # Ctrl-C, in the middle of the transaction
    time.sleep(5)
""")
        before = {name: sha256(self.db(name)) for name in ("a", "b")}
        result = self.run_script("database_migration.py", "migrate-all", "--yes")
        self.assertEqual(result.returncode, 130, result.stderr)
        self.assertEqual(result.stderr, "database_migration.py: interrupted\n")
        self.assertEqual({name: sha256(self.db(name)) for name in ("a", "b")}, before)
        self.assertEqual(query(self.db("a"), "SELECT COUNT(*) FROM payment"), [(2,)])
        self.assertEqual(len(self.backups("a")), 1)             # the pre-migrate backup
        self.assertEqual(self.backups("b"), [])                 # never started
        history = (self.root / "backups" / "a" / "history.jsonl").read_text(encoding="utf-8")
        self.assertEqual(json.loads(history.splitlines()[-1])["outcome"],
                         "failed: interrupted (Ctrl-C or SIGINT)")


@unittest.skipUnless(hasattr(signal, "pthread_sigmask"), "POSIX signals only")
class InterruptParallelRunTests(ProjectTestCase):
    """Ctrl-C on a terminal reaches the whole process group: migrate-all --jobs' workers too."""

    ini = """[DEFAULT]
busy_timeout = 1

[a]
path = instance/a.db

[b]
path = instance/b.db
"""

    def test_ctrl_c_during_migrate_all_jobs_is_one_line_and_no_worker_traceback(self) -> None:
        import fcntl
        lock = self.root / "backups" / "a" / "lock"
        lock.parent.mkdir(parents=True)
        with open(lock, "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)            # a's worker waits for it; b's finishes
            process = subprocess.Popen([sys.executable, str(ROOT / "database_migration.py"),
                                        "--config", str(self.config), "migrate-all", "--create",
                                        "--jobs", "2", "-q"], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       cwd=self.root, start_new_session=True)
            deadline = time.monotonic() + 30
            while not (self.root / "backups" / "b" / "history.jsonl").exists():
                self.assertLess(time.monotonic(), deadline, "b was never migrated")
                time.sleep(0.02)
            time.sleep(0.2)                             # b's worker is idle now
            os.killpg(process.pid, signal.SIGINT)       # as Ctrl-C on a terminal does
            try:
                out, err = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                self.fail("migrate-all --jobs hung after Ctrl-C")
        self.assertEqual(process.returncode, 130, err)
        self.assertNoTraceback(err)
        self.assertEqual(err.splitlines()[-1], "database_migration.py: interrupted")
        self.assertEqual(query(self.db("b"), "SELECT MAX(version) FROM schema_migrations"), [(2,)])
        self.assertFalse(self.db("a").exists())


class BytecodeTests(ProjectTestCase):
    """Python migrations are loaded without writing bytecode, PYTHONDONTWRITEBYTECODE or not."""

    MIGRATION = '''"""Names in capitals."""


def up(conn):
    conn.execute("UPDATE user SET name = upper(name) WHERE id > 0")


def down(conn):
    conn.execute("UPDATE user SET name = lower(name) WHERE id > 0")
'''

    def bytecode(self, folder: Path) -> list[Path]:
        return [p for p in folder.rglob("*") if p.name == "__pycache__" or p.suffix == ".pyc"]

    def test_dry_run_and_migrate_with_a_python_migration_leave_no_bytecode(self) -> None:
        self.create()
        self.write_migration("0003_names_in_capitals.py", self.MIGRATION)
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
        for argv in (("migrate", "dev", "--dry-run"), ("status",), ("check", "dev"),
                     ("migrate", "dev")):
            with self.subTest(argv=argv):
                result = subprocess.run([sys.executable, str(ROOT / "database_migration.py"),
                                         "--config", str(self.config), *argv],
                                        capture_output=True, text=True, env=env, cwd=self.root,
                                        stdin=subprocess.DEVNULL, timeout=60)
                self.assertIn(result.returncode, (0, 1), result.stderr)
                self.assertNoTraceback(result.stderr)
                self.assertEqual(self.bytecode(self.root), [])
        self.assertEqual(query(self.db(), "SELECT name FROM user ORDER BY id"), [("ANN",), ("BOB",)])
        self.assertEqual(query(self.db(), "SELECT MAX(version) FROM schema_migrations"), [(3,)])

    def test_no_bytecode_of_a_migration_goes_to_a_pycache_prefix_either(self) -> None:
        self.create()
        self.write_migration("0003_names_in_capitals.py", self.MIGRATION)
        cache = self.root.parent / f"{self.root.name}-pycache"
        self.addCleanup(shutil.rmtree, cache, True)
        env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
               "PYTHONPYCACHEPREFIX": str(cache)}
        result = subprocess.run([sys.executable, str(ROOT / "database_migration.py"), "--config",
                                 str(self.config), "migrate", "dev", "--dry-run"],
                                capture_output=True, text=True, env=env, cwd=self.root,
                                stdin=subprocess.DEVNULL, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual([p for p in cache.rglob("*") if p.name.startswith("0003")], [])
        self.assertEqual(self.bytecode(self.root), [])

    def test_a_python_migration_saved_with_a_byte_order_mark_loads_as_an_import_would(self) -> None:
        self.create()
        path = self.migrations_dir / "0003_names_in_capitals.py"
        path.write_bytes(b"\xef\xbb\xbf" + self.MIGRATION.encode("utf-8"))
        code, out, err = self.migrate("dev")
        self.assertEqual(code, 0, err)
        self.assertEqual(query(self.db(), "SELECT name FROM user ORDER BY id"), [("ANN",), ("BOB",)])


class BackupAgeTimeZoneTests(ProjectTestCase):
    """status shows the same backup ages whatever TZ says, across a daylight-saving change."""

    ZONES = ("UTC", "Australia/Sydney", "Pacific/Auckland", "America/New_York", "Asia/Kolkata",
             "America/St_Johns",
             # The same rules written out, so they hold on a machine without tzdata:
             "AEST-10AEDT,M10.1.0,M4.1.0/3", "NZST-12NZDT,M9.5.0,M4.1.0/3", "EST5EDT,M3.2.0,M11.1.0")

    def status_ages(self, tz: str) -> dict[str, str]:
        result = self.run_script("database_migration.py", "status", env={"TZ": tz})
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = [line.split() for line in result.stdout.splitlines()[1:]]
        return {row[0]: " ".join(row[-2:]) for row in rows}

    def backdate(self, name: str, seconds: int) -> None:
        """Make the instance's only backup `seconds` older: its manifest and its file name."""
        [backup] = self.backups(name)
        created = time.gmtime(time.time() - seconds)
        stamp = time.strftime("%Y%m%dT%H%M%S", created) + "000000Z"
        manifest = json.loads(Path(f"{backup}.json").read_text(encoding="utf-8"))
        manifest["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", created)
        older = backup.with_name(f"{name}-{stamp}-manual.db")
        Path(f"{older}.json").write_text(json.dumps(manifest), encoding="utf-8")
        Path(f"{backup}.json").unlink()
        backup.rename(older)

    def dst_started_minutes_ago(self, minutes: int, hours_east: int) -> str:
        """A POSIX TZ whose daylight-saving time began `minutes` ago (and ends in two days)."""
        start = time.gmtime(time.time() + hours_east * 3600 - minutes * 60)  # its standard time
        end_day = (start.tm_yday + 1) % 365
        return (f"XST{-hours_east}XDT,{start.tm_yday - 1}/{start.tm_hour}:{start.tm_min:02d}:"
                f"{start.tm_sec:02d},{end_day}/0")

    def assertChangedBetween(self, tz: str, seconds: int) -> None:
        """tz is in standard time `seconds` ago and in daylight-saving time now."""
        probe = subprocess.run([sys.executable, "-c", f"import json, time; t = time.time(); "
                                f"print(json.dumps([time.localtime(t - {seconds}).tm_isdst, "
                                f"time.localtime(t).tm_isdst]))"], capture_output=True, text=True,
                               env={**os.environ, "TZ": tz})
        self.assertEqual(json.loads(probe.stdout), [0, 1], f"{tz}: no change in between")

    def test_a_backup_just_made_and_one_ninety_minutes_old_read_the_same_in_every_zone(self) -> None:
        for name in ("dev", "prod"):
            self.create(name)
            code, _, err = self.run_cli(database_migration, "backup", name)
            self.assertEqual(code, 0, err)
        self.backdate("prod", 90 * 60)
        dst_changes = [self.dst_started_minutes_ago(45, hours) for hours in (10, -10)]
        for tz in dst_changes:
            self.assertChangedBetween(tz, 90 * 60)
        for tz in (*self.ZONES, *dst_changes):
            with self.subTest(TZ=tz):
                ages = self.status_ages(tz)
                self.assertRegex(ages["dev"], r"^\d+s ago$|^1m ago$")
                self.assertEqual(ages["prod"], "1h ago")


if __name__ == "__main__":
    unittest.main()
