"""A faster migrate-all keeps every guarantee (issue 12): what each shortcut must not lose.

- the parents of new backup folders are synced once, right after the backup's own folder,
  and still before the live database is written (strace, skipped where it cannot run);
- each folder is vouched for once per command on one instance, never across commands: a
  link planted between two runs of one process is still refused;
- private modes whatever the umask, and an audit line for every member;
- the destructive-statement check is worked out once per statement text;
- retention tells the live database by its inode (a hard link is the live file too);
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import unittest
from dataclasses import replace
from pathlib import Path

from tests.support import ROOT, database_migration, query, safe_db_update
from tests.test_fleets import FleetTestCase
from tests.test_power_cut_durability import (STRACE_MISSING, Calls, creates_journal, paths,
                                             renames, writes_stdout)

ADD_LOAN_STATUS = "-- migrate:up\nALTER TABLE loan ADD COLUMN status TEXT DEFAULT 'open';\n"
ZERO_EVERY_AMOUNT = "-- migrate:up\nUPDATE loan SET amount = 0 WHERE 1 = 1;\n"
STEMS = ("acme", "globex", "initech")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class PendingFleetTestCase(FleetTestCase):
    """Three tenants at version 2, one migration pending, no backups of theirs yet."""

    ini = "[DEFAULT]\nbusy_timeout = 2\n\n[dev]\npath = instance/dev.db\n\n[tenants]\npath = tenants/*.db\n"

    def setUp(self) -> None:
        super().setUp()
        self.add_tenants(*STEMS)
        self.write_migration("0003_add_loan_status.sql", ADD_LOAN_STATUS)

    def home(self, stem: str) -> Path:
        return self.root / "backups" / "tenants" / stem

    def version(self, path: Path) -> int:
        return query(path, "SELECT MAX(version) FROM schema_migrations")[0][0]


@unittest.skipIf(STRACE_MISSING, STRACE_MISSING)
class DurableInTheRightOrderTests(PendingFleetTestCase):
    """strace -f -y of migrate-all over three new tenants, as a real subprocess."""

    def trace_migrate_all(self) -> Calls:
        log = self.root.parent / f"{self.root.name}.strace"
        self.addCleanup(lambda: log.unlink() if log.exists() else None)
        result = subprocess.run(["strace", "-f", "-y", "-o", str(log), "-e",
                                 "trace=%file,fsync,fdatasync,write",
                                 sys.executable, str(ROOT / "database_migration.py"),
                                 "--config", str(self.config), "migrate", "tenants"],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                cwd=self.root, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        return Calls(log.read_text(encoding="utf-8", errors="replace"))

    def test_copy_manifest_folder_and_new_folders_are_synced_before_the_live_write(self) -> None:
        calls = self.trace_migrate_all()
        for stem in STEMS:
            with self.subTest(tenant=stem):
                folder = self.home(stem) / "database"
                live_journal = calls.first(lambda n, a, l, s=stem: creates_journal(n, a, l)
                                           and f'tenants/{s}.db-journal"' in a)
                self.assertLess(live_journal, len(calls.calls), "the migration never wrote")
                copy = calls.first(lambda n, a, l, f=folder: renames()(n, a, l)
                                   and Path(paths(a)[1]).parent == f and paths(a)[1].endswith(".db"))
                manifest = calls.first(lambda n, a, l, f=folder: renames()(n, a, l)
                                       and Path(paths(a)[1]).parent == f
                                       and paths(a)[1].endswith(".db.json"))
                partial = Path(paths(calls.calls[copy][1])[0])
                manifest_partial = Path(paths(calls.calls[manifest][1])[0])
                # Each file synced before its name appears; the manifest named first.
                self.assertLess(calls.synced(partial, after=-1), copy)
                self.assertLess(calls.synced(manifest_partial, after=-1), manifest)
                self.assertLess(manifest, copy)
                # The folder synced after both names, before the live database is written.
                self.assertLess(calls.synced(folder, after=copy), live_journal)
                # Both new folders' parents synced after their mkdir, before the write too.
                for made in (self.home(stem), folder):
                    mkdir = calls.first(lambda n, a, l, m=made: n in ("mkdir", "mkdirat")
                                        and paths(a)[-1:] == [str(m)] and l.endswith("= 0"))
                    self.assertLess(mkdir, len(calls.calls), f"{made} was not made")
                    synced = calls.synced(made.parent, after=mkdir)
                    self.assertIsNotNone(synced, f"{made.parent} never synced after mkdir {made}")
                    self.assertLess(synced, live_journal)
                    self.assertLess(synced, calls.first(writes_stdout, after=mkdir))
                self.assertEqual(self.version(self.tenant(stem)), 3)

    def test_an_existing_folder_is_looked_at_not_made_again(self) -> None:
        calls = self.trace_migrate_all()
        again = calls.where(lambda n, a, l: n in ("mkdir", "mkdirat") and "EEXIST" in l)
        self.assertEqual([calls.calls[i][2] for i in again], [])


class VouchedOncePerCommandTests(PendingFleetTestCase):
    def test_a_link_planted_between_two_runs_of_one_process_is_refused(self) -> None:
        code, _, err = self.run_cli(database_migration, "migrate-all")
        self.assertEqual(code, 0, err)
        folder = self.home("globex") / "database"
        elsewhere = self.root / "elsewhere"
        shutil.move(folder, elsewhere)
        folder.symlink_to(elsewhere)
        self.write_migration("0004_more.sql", "-- migrate:up\nCREATE TABLE more (id INTEGER);\n")
        code, out, err = self.run_cli(database_migration, "migrate-all", "--keep-going", "--json")
        self.assertEqual(code, 1, err)
        self.assertIn(f"{folder} is a symbolic link", err)
        rows = {row["name"]: row["result"] for row in json.loads(out)["instances"]}
        self.assertEqual(rows, {"dev": "ok", "tenants/acme": "ok", "tenants/globex": "failed",
                                "tenants/initech": "ok"})
        self.assertEqual(self.version(self.tenant("globex")), 3)       # nothing changed
        self.assertEqual(len(list(elsewhere.glob("*.db"))), 1)         # nothing written there
        self.assertEqual(self.version(self.tenant("initech")), 4)

    def test_every_member_gets_its_audit_line(self) -> None:
        code, _, err = self.run_cli(database_migration, "migrate", "tenants")
        self.assertEqual(code, 0, err)
        for stem in STEMS:
            with self.subTest(tenant=stem):
                lines = (self.home(stem) / "history.jsonl").read_text().splitlines()
                entry = json.loads(lines[-1])
                self.assertEqual((entry["operation"], entry["outcome"], entry["name"]),
                                 ("migrate", "ok", f"tenants/{stem}"))
                self.assertEqual((entry["version_before"], entry["version_after"]), (2, 3))
                self.assertTrue(entry["user"])
                self.assertTrue(Path(entry["backup"]).is_file())

    def test_folders_0700_and_files_0600_for_every_member_under_umask_000(self) -> None:
        result = subprocess.run([sys.executable, str(ROOT / "database_migration.py"), "--config",
                                 str(self.config), "migrate", "tenants"], capture_output=True,
                                text=True, stdin=subprocess.DEVNULL, cwd=self.root, umask=0,
                                timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        for stem in STEMS:
            home = self.home(stem)
            for folder in (home, home / "database"):
                self.assertEqual(mode(folder), 0o700, folder)
            files = [home / "lock", home / "history.jsonl", *(home / "database").iterdir()]
            self.assertEqual(len(files), 4)
            for path in files:
                self.assertEqual(mode(path), 0o600, path)


class WorkedOutOnceTests(PendingFleetTestCase):
    def test_the_destructive_check_runs_once_per_statement_and_holds_for_every_member(self) -> None:
        self.write_migration("0004_zero_every_amount.sql", ZERO_EVERY_AMOUNT)
        database_migration.destructive_kind.cache_clear()
        code, _, err = self.run_cli(database_migration, "migrate", "tenants", "--keep-going")
        self.assertEqual(code, 1)
        for stem in STEMS:                      # refused for each, not only the first
            self.assertIn(f"tenants/{stem}: these statements can destroy data", err)
            self.assertEqual(self.version(self.tenant(stem)), 2)
        info = database_migration.destructive_kind.cache_info()
        self.assertEqual(info.misses, 2)        # the two pending statements, once each
        self.assertGreaterEqual(info.hits, 4)


class LiveDatabaseByInodeTests(FleetTestCase):
    def test_a_hard_link_to_a_backup_is_the_live_database_and_is_kept(self) -> None:
        self.create("dev")
        for _ in range(2):
            code, _, err = self.run_cli(safe_db_update, "backup", "dev")
            self.assertEqual(code, 0, err)
        oldest = self.backups("dev")[0]
        live = self.root / "instance" / "linked.db"
        os.link(oldest, live)
        instance = replace(self.instance("dev"), path=live)
        verdicts = safe_db_update.plan_retention(instance, safe_db_update.Policy(1, 0, 0, 0))
        rules = {v.backup.path.name: v.kept_by for v in verdicts}
        self.assertIn("live database", rules[oldest.name])
        self.assertTrue(all("live database" not in r for n, r in rules.items() if n != oldest.name))


if __name__ == "__main__":
    unittest.main()
