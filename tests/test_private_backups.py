"""Backups no one else can touch: private modes whatever the umask, no write through a
symbolic link, folders another user owns or can write refused, and a restore that keeps
the live file's owner and mode."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import unittest
from pathlib import Path

from tests.support import ROOT, ProjectTestCase, safe_db_update, sha256

try:
    import pwd
    NOBODY = pwd.getpwnam("nobody")
except (ImportError, KeyError):
    NOBODY = None
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class PrivateTestCase(ProjectTestCase):
    def run_with_umask(self, script: str, *argv: str, umask: int = 0) -> subprocess.CompletedProcess:
        """A CLI as a real subprocess started with the given umask (000: everyone may write)."""
        return subprocess.run([sys.executable, str(ROOT / script), "--config", str(self.config),
                               *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              cwd=self.root, umask=umask, timeout=60)

    def ok(self, result: subprocess.CompletedProcess) -> None:
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


class ModesWhateverTheUmaskTests(PrivateTestCase):
    ini = """[DEFAULT]
backup_dir = store/backups
busy_timeout = 2

[dev]
path = data/dev.db

[tenants]
path = fleet/*.db
"""

    def test_every_folder_made_is_0700_and_every_file_0600_under_umask_000(self) -> None:
        self.ok(self.run_with_umask("database_migration.py", "migrate", "dev", "--create"))
        self.ok(self.run_with_umask("database_migration.py", "migrate", "tenants/acme", "--create"))
        self.ok(self.run_with_umask("safe_db_update.py", "backup", "--all"))
        self.ok(self.run_with_umask("database_migration.py", "migrate", "dev"))
        self.ok(self.run_with_umask("safe_db_update.py", "restore", "dev", "--yes"))
        self.ok(self.run_with_umask("safe_db_update.py", "prune", "dev", "--keep", "1", "--yes"))
        made = [self.root / "store", self.root / "data", self.root / "fleet"]
        for top in made:
            for path in [top, *top.rglob("*")]:
                with self.subTest(path=str(path.relative_to(self.root))):
                    self.assertEqual(mode(path), 0o700 if path.is_dir() else 0o600)
        home = self.root / "store" / "backups"
        for path in (home / "dev" / "lock", home / "dev" / "history.jsonl",
                     home / "tenants", home / "tenants" / "acme" / "database",
                     self.root / "data" / "dev.db", self.root / "fleet" / "acme.db"):
            self.assertTrue(path.exists(), path)
        self.assertTrue(list((home / "dev" / "database").glob("*.db.json")))

    def test_a_new_migration_file_is_0600_under_umask_000(self) -> None:
        self.ok(self.run_with_umask("database_migration.py", "new", "add notes"))
        self.assertEqual(mode(self.migrations_dir / "0003_add_notes.sql"), 0o600)


class NoWriteThroughASymbolicLinkTests(PrivateTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.create("dev")
        self.ok(self.run_script("safe_db_update.py", "backup", "dev"))
        self.write_migration("0003_extra.sql", "CREATE TABLE extra (id INTEGER PRIMARY KEY);\n")
        self.target = self.root / "precious.txt"
        self.target.write_text("not yours to overwrite\n", encoding="utf-8")
        self.home = self.root / "backups" / "dev"

    def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(self) -> None:
        (self.home / "lock").unlink()
        (self.home / "lock").symlink_to(self.target)
        for script, argv in (("safe_db_update.py", ["backup", "dev"]),
                             ("database_migration.py", ["migrate", "dev"]),
                             ("safe_db_update.py", ["restore", "dev", "--yes"])):
            with self.subTest(argv=argv):
                result = self.run_script(script, *argv)
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertIn("symbolic link", result.stderr)
                self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(self.target.read_text(encoding="utf-8"), "not yours to overwrite\n")

    def test_an_audit_trail_that_is_a_link_is_not_written_through(self) -> None:
        (self.home / "history.jsonl").unlink()
        (self.home / "history.jsonl").symlink_to(self.target)
        result = self.run_script("safe_db_update.py", "backup", "dev")
        self.assertIn("history not written", result.stderr)
        self.assertIn("symbolic link", result.stderr)
        self.assertEqual(self.target.read_text(encoding="utf-8"), "not yours to overwrite\n")

    def test_a_backup_folder_others_can_write_is_refused_with_one_line_naming_it(self) -> None:
        os.chmod(self.root / "backups", 0o777)
        before = sha256(self.db("dev"))
        result = self.run_script("safe_db_update.py", "backup", "dev")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn(f"{self.root / 'backups'} can be written by other users", result.stderr)
        self.assertEqual(len(self.backups("dev")), 1)
        self.assertEqual(sha256(self.db("dev")), before)

    def test_group_write_is_refused_unless_the_group_is_the_owners_own(self) -> None:
        backups = self.root / "backups"
        os.chmod(backups, 0o770)
        own = safe_db_update.private_group(os.getuid(), backups.stat().st_gid)
        result = self.run_script("safe_db_update.py", "backup", "dev")
        if own:                     # umask 002 with user private groups: nobody else in it
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(len(self.backups("dev")), 2)
        else:
            self.assertEqual(result.returncode, 1, result.stderr)
            self.assertIn("can be written by other users (mode 0770)", result.stderr)
        if NOBODY is not None and AS_ROOT:      # a group with someone else in it
            os.chown(backups, 0, NOBODY.pw_gid)
            result = self.run_script("safe_db_update.py", "backup", "dev")
            self.assertEqual(result.returncode, 1, result.stderr)
            self.assertIn("can be written by other users", result.stderr)


@unittest.skipUnless(AS_ROOT and NOBODY is not None,
                     "needs root and a 'nobody' user to prepare a folder as another user")
class AnotherUsersFolderTests(PrivateTestCase):
    """Another local user makes backups/prod first, with links to a file root owns."""

    def setUp(self) -> None:
        super().setUp()
        self.create("prod")
        shutil.rmtree(self.root / "backups")        # the first create's audit trail
        self.write_migration("0003_extra.sql", "CREATE TABLE extra (id INTEGER PRIMARY KEY);\n")
        os.chmod(self.root, 0o755)                  # others may look in, as in /srv/app
        self.target = self.root / "root-owned.conf"
        self.target.write_text("root's file\n", encoding="utf-8")
        os.chmod(self.target, 0o644)
        backups = self.root / "backups"
        backups.mkdir(mode=0o777)
        os.chmod(backups, 0o777)                    # as an older version left it under umask 000
        prepare = 'mkdir -m 777 "$1" && ln -s "$2" "$1/lock" && ln -s "$2" "$1/history.jsonl"'
        subprocess.run(["/bin/sh", "-c", prepare, "sh", str(backups / "prod"), str(self.target)],
                       check=True, user=NOBODY.pw_uid, group=NOBODY.pw_gid, timeout=30)
        self.assertEqual((backups / "prod").stat().st_uid, NOBODY.pw_uid)
        self.before = (self.target.read_bytes(), self.target.stat().st_mtime_ns)

    def assertRefused(self, folder: Path, words: str) -> None:
        for script, argv in (("safe_db_update.py", ["backup", "prod"]),
                             ("database_migration.py", ["backup", "prod", "--quiet"]),
                             ("database_migration.py", ["migrate", "prod"])):
            with self.subTest(argv=argv):
                result = self.run_script(script, *argv)
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertNotIn("Traceback", result.stderr)
                self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
                self.assertIn(f"{folder} {words}", result.stderr)
        self.assertEqual((self.target.read_bytes(), self.target.stat().st_mtime_ns), self.before)
        self.assertTrue((self.root / "backups" / "prod" / "lock").is_symlink())

    def test_a_folder_everyone_can_write_is_refused(self) -> None:
        self.assertRefused(self.root / "backups", "can be written by other users")

    def test_a_folder_another_user_owns_is_refused(self) -> None:
        os.chmod(self.root / "backups", 0o755)
        self.assertRefused(self.root / "backups" / "prod", "belongs to another user (nobody")


class RestoreKeepsOwnerAndModeTests(PrivateTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.live = self.create("dev")
        self.ok(self.run_script("safe_db_update.py", "backup", "dev"))
        self.backup = self.backups("dev")[0].name

    def test_restore_over_a_deleted_file_makes_it_0600_under_umask_000(self) -> None:
        self.live.unlink()
        self.ok(self.run_with_umask("safe_db_update.py", "restore", "dev", self.backup, "--yes"))
        self.assertEqual(mode(self.live), 0o600)

    def test_restore_over_a_damaged_file_keeps_its_mode_under_umask_000(self) -> None:
        self.live.write_bytes(b"garbage, not a database" * 100)
        os.chmod(self.live, 0o640)
        self.ok(self.run_with_umask("safe_db_update.py", "restore", "dev", self.backup, "--yes"))
        self.assertEqual(mode(self.live), 0o640)
        self.assertEqual(sha256(self.live), sha256(self.backups("dev")[0]))
        self.assertEqual(self.backups("dev")[0].name, self.backup)

    @unittest.skipUnless(AS_ROOT and NOBODY is not None, "chown needs root and a 'nobody' user")
    def test_restore_as_root_keeps_the_applications_user(self) -> None:
        self.live.write_bytes(b"garbage, not a database" * 100)
        os.chown(self.live, NOBODY.pw_uid, NOBODY.pw_gid)
        os.chmod(self.live, 0o600)
        self.ok(self.run_with_umask("safe_db_update.py", "restore", "dev", self.backup, "--yes"))
        found = self.live.stat()
        self.assertEqual((found.st_uid, found.st_gid, mode(self.live)),
                         (NOBODY.pw_uid, NOBODY.pw_gid, 0o600))
        self.live.unlink()                          # deleted: the folder's owner gets it
        os.chown(self.live.parent, NOBODY.pw_uid, NOBODY.pw_gid)
        self.ok(self.run_with_umask("safe_db_update.py", "restore", "dev", self.backup, "--yes"))
        found = self.live.stat()
        self.assertEqual((found.st_uid, found.st_gid, mode(self.live)),
                         (NOBODY.pw_uid, NOBODY.pw_gid, 0o600))


if __name__ == "__main__":
    unittest.main()
