"""Fleets: a section whose path is a glob is a group of instances, one per matching file."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import tempfile
import unittest
from contextlib import closing
from pathlib import Path

from tests.support import ProjectTestCase, database_migration, query, safe_db_update, sha256

FLEET_INI = """[DEFAULT]
busy_timeout = 2

[dev]
path = instance/dev.db

[tenants]
path = tenants/*.db

[prod]
path = instance/prod.db
protected = yes
"""

ADD_LOAN_STATUS = "-- migrate:up\nALTER TABLE loan ADD COLUMN status TEXT DEFAULT 'open';\n"
AN_OLD_TIME = 1_000_000_000         # 2001: any write would move the mtime away from it


class FleetTestCase(ProjectTestCase):
    """dev, a [tenants] fleet (tenants/*.db) and prod, in that file order."""

    ini = FLEET_INI

    def setUp(self) -> None:
        super().setUp()
        self.tenants = self.root / "tenants"
        self.tenants.mkdir()

    def tenant(self, stem: str) -> Path:
        return self.tenants / f"{stem}.db"

    def add_tenants(self, *stems: str) -> list[Path]:
        """Tenant databases at the latest version with a few rows: copies of a migrated dev."""
        if not self.db("dev").exists():
            self.create("dev")
        paths = [self.tenant(stem) for stem in stems]
        for path in paths:
            shutil.copyfile(self.db("dev"), path)
        return paths

    def member_backups(self, stem: str) -> list[Path]:
        return self.backups(f"tenants/{stem}")

    def status_names(self, *argv: str) -> list[str]:
        code, out, err = self.run_cli(database_migration, "status", "--json", *argv)
        self.assertEqual(code, 0, err)
        return [entry["name"] for entry in json.loads(out)["instances"]]

    def snapshot(self, paths: list[Path]) -> dict[Path, tuple[str, int]]:
        """Each file's SHA-256 and modification time, after moving the mtime into the past."""
        for path in paths:
            os.utime(path, (AN_OLD_TIME, AN_OLD_TIME))
        return {path: (sha256(path), path.stat().st_mtime_ns) for path in paths}

    def assertUnchanged(self, before: dict[Path, tuple[str, int]]) -> None:
        for path, (digest, mtime) in before.items():
            self.assertEqual((sha256(path), path.stat().st_mtime_ns), (digest, mtime), path)

    def assertBackupName(self, path: Path, stem: str, reason: str) -> None:
        """<stem>-<UTC stamp>-<reason>.db, the stem without the fleet's name."""
        self.assertRegex(path.name, rf"\A{re.escape(stem)}-\d{{8}}T\d{{12}}Z-{reason}\.db\Z")

    def assertUsageError(self, code: int, err: str, *words: str) -> None:
        self.assertEqual(code, 2, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertNoTraceback(err)
        for word in words:
            self.assertIn(word, err)


class MembersTests(FleetTestCase):
    def test_a_glob_path_gives_one_instance_per_file_named_tenants_slash_stem(self) -> None:
        self.add_tenants("initech", "acme", "globex")
        instances = safe_db_update.load_instances(self.config)
        members = [i for i in instances if i.group == "tenants"]
        self.assertEqual([i.name for i in members], ["tenants/acme", "tenants/globex", "tenants/initech"])
        self.assertEqual([i.path for i in members],
                         [self.tenant("acme"), self.tenant("globex"), self.tenant("initech")])
        self.assertEqual([i.stem for i in members], ["acme", "globex", "initech"])

    def test_status_lists_the_members_sorted_between_the_sections_around_them(self) -> None:
        self.add_tenants("initech", "acme", "globex")
        expected = ["dev", "tenants/acme", "tenants/globex", "tenants/initech", "prod"]
        self.assertEqual(self.status_names(), expected)
        code, out, err = self.run_cli(database_migration, "status")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual([line.split()[0] for line in out.splitlines()[1:]], expected)

    def test_status_json_gives_each_member_its_own_absolute_path_and_state(self) -> None:
        self.add_tenants("acme")
        code, out, err = self.run_cli(database_migration, "status", "--json")
        self.assertEqual(code, 0, err)
        entry = {e["name"]: e for e in json.loads(out)["instances"]}["tenants/acme"]
        self.assertEqual(entry["path"], str(self.tenant("acme")))
        self.assertTrue(Path(entry["path"]).is_absolute())
        self.assertEqual((entry["state"], entry["current_version"], entry["pending"]),
                         ("up to date", 2, []))

    def test_status_of_the_group_lists_only_its_members(self) -> None:
        self.add_tenants("globex", "acme")
        self.assertEqual(self.status_names("tenants"), ["tenants/acme", "tenants/globex"])

    def test_status_of_one_member_lists_only_that_member(self) -> None:
        self.add_tenants("globex", "acme")
        self.assertEqual(self.status_names("tenants/globex"), ["tenants/globex"])

    def test_a_folder_that_matches_the_glob_is_not_a_member(self) -> None:
        self.add_tenants("acme")
        (self.tenants / "archive.db").mkdir()
        self.assertEqual(self.status_names("tenants"), ["tenants/acme"])

    def test_a_file_whose_stem_is_not_an_instance_name_is_a_configuration_error(self) -> None:
        for bad in ("bad name.db", "x.y.db", "caf\u00e9.db", "t" * 65 + ".db"):
            with self.subTest(file=bad):
                self.add_tenants("acme")
                path = self.tenants / bad
                shutil.copyfile(self.tenant("acme"), path)
                try:
                    for module, argv in ((database_migration, ["status"]),
                                         (database_migration, ["migrate", "tenants/acme"]),
                                         (safe_db_update, ["backup", "--all"])):
                        code, out, err = self.run_cli(module, *argv)
                        self.assertUsageError(code, err, bad, "[tenants]")
                        self.assertEqual(out, "")
                    self.assertFalse((self.root / "backups" / "tenants").exists())
                finally:
                    path.unlink()

    def test_a_stem_of_sixty_four_characters_is_a_valid_member_name(self) -> None:
        stem = "t" * 64
        self.add_tenants(stem)
        self.assertEqual(self.status_names("tenants"), [f"tenants/{stem}"])


class EmptyFleetTests(FleetTestCase):
    """A glob that matches nothing makes a group with no members."""

    def test_status_lists_the_other_sections_and_succeeds(self) -> None:
        self.assertEqual(self.status_names(), ["dev", "prod"])

    def test_the_empty_group_lists_nothing_and_migrating_it_does_nothing(self) -> None:
        for argv in (["status", "tenants", "--json"], ["migrate", "tenants", "--json"]):
            with self.subTest(argv=argv):
                code, out, err = self.run_cli(database_migration, *argv)
                self.assertEqual((code, err), (0, ""))
                self.assertEqual(json.loads(out)["instances"], [])
        self.assertEqual(list(self.tenants.iterdir()), [])

    def test_a_single_instance_command_on_the_empty_group_says_how_to_add_a_member(self) -> None:
        code, _, err = self.run_cli(database_migration, "check", "tenants")
        self.assertUsageError(code, err, "'tenants'", "--create")

    def test_migrate_all_migrates_the_other_sections_only(self) -> None:
        code, out, err = self.run_cli(database_migration, "migrate-all", "--create", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual([e["name"] for e in json.loads(out)["instances"]], ["dev", "prod"])
        self.assertEqual(list(self.tenants.iterdir()), [])

    def test_a_new_member_is_made_with_migrate_create_in_a_fleet_of_its_own(self) -> None:
        self.config.write_text("[tenants]\npath = tenants/*.db\n", encoding="utf-8")
        code, _, err = self.run_cli(database_migration, "migrate", "tenants/acme")
        self.assertEqual(code, 1)
        self.assertIn("--create", err)
        self.assertEqual(list(self.tenants.iterdir()), [])
        code, _, err = self.run_cli(database_migration, "migrate", "tenants/acme", "--create")
        self.assertEqual(code, 0, err)
        self.assertEqual(query(self.tenants / "acme.db", "SELECT MAX(version) FROM schema_migrations"),
                         [(2,)])
        self.assertEqual(self.status_names(), ["tenants/acme"])

    def test_a_new_member_name_must_be_a_valid_name(self) -> None:
        code, _, err = self.run_cli(database_migration, "migrate", "tenants/a.b", "--create")
        self.assertUsageError(code, err, "'tenants/a.b'")
        self.assertEqual(list(self.tenants.iterdir()), [])


class MemberCommandTests(FleetTestCase):
    def test_backup_of_a_member_goes_to_its_own_folder_named_after_its_stem(self) -> None:
        self.add_tenants("acme", "globex")
        for module in (safe_db_update, database_migration):
            with self.subTest(module=module.__name__):
                code, out, err = self.run_cli(module, "backup", "tenants/acme", "--json")
                self.assertEqual((code, err), (0, ""))
                path = Path(json.loads(out)["path"])
                self.assertEqual(path.parent, self.root / "backups" / "tenants" / "acme" / "database")
                self.assertBackupName(path, "acme", "manual")
                self.assertTrue(Path(f"{path}.json").is_file())
                self.assertEqual(query(path, "SELECT email FROM user ORDER BY id"),
                                 [("a@x",), ("b@x",)])
        self.assertEqual(len(self.member_backups("acme")), 2)
        self.assertEqual(self.member_backups("globex"), [])

    def test_backup_of_the_group_backs_up_every_member_and_nothing_else(self) -> None:
        self.add_tenants("globex", "acme")
        code, out, err = self.run_cli(safe_db_update, "backup", "tenants", "--json")
        self.assertEqual((code, err), (0, ""))
        backups = json.loads(out)["backups"]
        self.assertEqual([b["name"] for b in backups], ["tenants/acme", "tenants/globex"])
        for stem in ("acme", "globex"):
            with self.subTest(member=stem):
                files = self.member_backups(stem)
                self.assertEqual(len(files), 1)
                self.assertBackupName(files[0], stem, "manual")
                self.assertEqual(sha256(files[0]), {b["name"]: b for b in backups}[f"tenants/{stem}"]["sha256"])
        self.assertEqual(self.backups("dev"), [])

    def test_migrate_of_a_member_changes_that_member_only_after_a_backup_in_its_folder(self) -> None:
        acme, globex = self.add_tenants("acme", "globex")
        untouched = self.snapshot([globex, self.db("dev")])
        self.write_migration("0003_add_loan_status.sql", ADD_LOAN_STATUS)
        code, out, err = self.migrate("tenants/acme", "--json")
        self.assertEqual((code, err), (0, ""))
        result = json.loads(out)
        self.assertEqual((result["name"], result["from_version"], result["applied"]),
                         ("tenants/acme", 2, [3]))
        [backup] = self.member_backups("acme")
        self.assertEqual(result["backup"], str(backup))
        self.assertBackupName(backup, "acme", "pre-migrate")
        self.assertEqual(query(acme, "SELECT id, status FROM loan ORDER BY id"), [(1, "open"), (2, "open")])
        self.assertEqual(query(backup, "SELECT MAX(version) FROM schema_migrations"), [(2,)])
        self.assertUnchanged(untouched)
        self.assertEqual(self.member_backups("globex"), [])

    def test_check_of_a_member_reports_on_that_member(self) -> None:
        self.add_tenants("acme", "globex")
        self.write_migration("0003_add_loan_status.sql", ADD_LOAN_STATUS)
        self.migrate("tenants/acme")
        for stem, expected_code, consistent in (("acme", 0, True), ("globex", 1, False)):
            with self.subTest(member=stem):
                code, out, err = self.run_cli(database_migration, "check", f"tenants/{stem}", "--json")
                self.assertEqual((code, err), (expected_code, ""))
                report = json.loads(out)
                self.assertEqual((report["name"], report["consistent"]), (f"tenants/{stem}", consistent))

    def test_migrate_of_the_group_migrates_every_member_and_nothing_else(self) -> None:
        paths = self.add_tenants("acme", "globex")
        self.write_migration("0003_add_status.sql", "ALTER TABLE loan ADD COLUMN status TEXT;")
        code, out, err = self.run_cli(database_migration, "migrate", "tenants", "--json")
        self.assertEqual(code, 0, err)
        results = json.loads(out)["instances"]
        self.assertEqual([r["name"] for r in results], ["tenants/acme", "tenants/globex"])
        self.assertEqual([r["applied"] for r in results], [[3], [3]])
        for path in paths:
            self.assertEqual(query(path, "SELECT MAX(version) FROM schema_migrations"), [(3,)])
        self.assertEqual(query(self.db("dev"), "SELECT MAX(version) FROM schema_migrations"), [(2,)])

    def test_a_single_instance_command_given_the_group_names_a_member_to_use(self) -> None:
        paths = self.add_tenants("acme", "globex")
        untouched = self.snapshot(paths)
        commands = [(database_migration, argv) for argv in (
            ["check", "tenants"],
            ["rollback", "tenants", "--to", "1", "--yes"], ["baseline", "tenants", "--to", "1"],
            ["history", "tenants"], ["diff", "tenants", "dev"], ["diff", "dev", "tenants"])]
        commands += [(safe_db_update, argv) for argv in (
            ["list-backups", "tenants"], ["verify", "tenants"], ["restore", "tenants", "--yes"],
            ["check", "tenants"], ["info", "tenants"], ["prune", "tenants", "--keep", "1", "--yes"])]
        for module, argv in commands:
            with self.subTest(module=module.__name__, argv=argv):
                code, out, err = self.run_cli(module, *argv)
                self.assertUsageError(code, err, "'tenants'", "tenants/acme")
                self.assertEqual(out, "")
        self.assertUnchanged(untouched)
        self.assertFalse((self.root / "backups" / "tenants").exists())


class FleetStatusTests(FleetTestCase):
    """status over a large fleet: one line each, a summary, and nothing written."""

    count = 60

    def setUp(self) -> None:
        super().setUp()
        self.stems = [f"tenant{n:02d}" for n in range(self.count)]
        self.paths = self.add_tenants(*self.stems)
        self.names = ["dev"] + [f"tenants/{stem}" for stem in self.stems] + ["prod"]

    def test_text_has_one_line_per_instance_and_a_summary_line(self) -> None:
        code, out, err = self.run_cli(database_migration, "status")
        self.assertEqual((code, err), (0, ""))
        header, *lines = out.splitlines()
        self.assertEqual([line.split()[0] for line in lines[:-1]], self.names)
        self.assertEqual(lines[-1], f"{self.count + 2} instances: 1 missing, {self.count + 1} up to date")

    def test_json_has_one_entry_per_instance(self) -> None:
        code, out, err = self.run_cli(database_migration, "status", "--json")
        self.assertEqual((code, err), (0, ""))
        entries = json.loads(out)["instances"]
        self.assertEqual([e["name"] for e in entries], self.names)
        self.assertEqual({e["state"] for e in entries[1:-1]}, {"up to date"})

    def test_status_reads_every_member_without_writing_or_backing_up(self) -> None:
        self.write_migration("0003_add_loan_status.sql", ADD_LOAN_STATUS)
        before = self.snapshot(self.paths)
        listing = sorted(os.listdir(self.tenants))
        for argv in (["status"], ["status", "--json"], ["status", "tenants"]):
            with self.subTest(argv=argv):
                code, _, err = self.run_cli(database_migration, *argv)
                self.assertEqual((code, err), (0, ""))
        self.assertUnchanged(before)
        self.assertEqual(sorted(os.listdir(self.tenants)), listing)
        self.assertFalse((self.root / "backups" / "tenants").exists())

    def test_status_reports_a_pending_member_among_the_others(self) -> None:
        with closing(sqlite3.connect(self.tenant("tenant07"))) as conn:
            conn.execute("DELETE FROM schema_migrations WHERE version = 2")
            conn.execute("ALTER TABLE user DROP COLUMN reset_token_expires")
            conn.execute("ALTER TABLE user DROP COLUMN reset_token")
            conn.commit()
        code, out, err = self.run_cli(database_migration, "status", "--json")
        self.assertEqual(code, 0, err)
        states = {e["name"]: (e["state"], e["pending"]) for e in json.loads(out)["instances"]}
        self.assertEqual(states["tenants/tenant07"], ("pending", [2]))
        self.assertEqual(sum(state == "up to date" for state, _ in states.values()), self.count)


class MigrateAllFleetTests(FleetTestCase):
    """migrate-all --jobs 2 over a fleet with one broken member."""

    stems = ("acme", "broken", "globex", "initech")

    def setUp(self) -> None:
        super().setUp()
        self.add_tenants(*self.stems)
        self.write_migration("0003_add_loan_status.sql", ADD_LOAN_STATUS)
        self.order = ["dev"] + [f"tenants/{stem}" for stem in self.stems] + ["prod"]

    def break_not_sqlite(self, path: Path) -> str:
        path.write_bytes(b"these are the accounts, not a database\n" * 200)
        return "not an SQLite database"

    def break_unknown_version(self, path: Path) -> str:
        with closing(sqlite3.connect(path)) as conn:
            conn.execute("INSERT INTO schema_migrations (version, description) VALUES (99, 'newer')")
            conn.commit()
        return "99"

    def break_edited_migration(self, path: Path) -> str:
        with closing(sqlite3.connect(path)) as conn:
            conn.execute("UPDATE schema_migrations SET checksum = ? WHERE version = 2", ("0" * 64,))
            conn.commit()
        return "changed"

    def migrate_all_with_one_broken(self, breaker) -> tuple[dict, str]:
        broken = self.tenant("broken")
        words = breaker(broken)
        before = self.snapshot([broken])
        code, out, err = self.run_cli(database_migration, "migrate-all", "--jobs", "2", "--create",
                                      "--json")
        self.assertEqual(code, 1, err)
        self.assertNoTraceback(err)
        results = json.loads(out)["instances"]
        self.assertEqual([r["name"] for r in results], self.order)
        by_name = {r["name"]: r for r in results}
        self.assertEqual(by_name["tenants/broken"]["result"], "failed")
        self.assertIn(words, by_name["tenants/broken"]["error"])
        self.assertUnchanged(before)
        self.assertEqual(self.member_backups("broken"), [])
        return by_name, words

    def assertEveryOtherInstanceMigrated(self, by_name: dict) -> None:
        for name in self.order:
            if name == "tenants/broken":
                continue
            with self.subTest(instance=name):
                self.assertEqual((by_name[name]["result"], by_name[name]["to_version"]), ("ok", 3))
                path = self.instance(name).path
                self.assertEqual(query(path, "SELECT MAX(version) FROM schema_migrations"), [(3,)])
                self.assertIn("status", [c for (_, c, *_) in query(path, "PRAGMA table_info(loan)")])
                backups = self.backups(name)
                if name == "prod":       # created by this run: nothing to back up
                    self.assertEqual((backups, by_name[name]["backup"]), ([], None))
                    continue
                self.assertEqual(query(path, "SELECT COUNT(*) FROM user"), [(2,)])
                self.assertEqual([str(b) for b in backups], [by_name[name]["backup"]])
                self.assertBackupName(backups[0], self.instance(name).stem, "pre-migrate")
                self.assertEqual(query(backups[0], "SELECT MAX(version) FROM schema_migrations"), [(2,)])

    def test_a_member_that_is_not_an_sqlite_file_fails_alone(self) -> None:
        by_name, _ = self.migrate_all_with_one_broken(self.break_not_sqlite)
        self.assertEveryOtherInstanceMigrated(by_name)

    def test_a_member_holding_an_unknown_version_fails_alone(self) -> None:
        by_name, _ = self.migrate_all_with_one_broken(self.break_unknown_version)
        self.assertEveryOtherInstanceMigrated(by_name)

    def test_a_member_with_an_edited_migration_fails_alone(self) -> None:
        by_name, _ = self.migrate_all_with_one_broken(self.break_edited_migration)
        self.assertEveryOtherInstanceMigrated(by_name)

    def test_the_text_summary_lists_the_failed_member(self) -> None:
        self.break_not_sqlite(self.tenant("broken"))
        code, out, err = self.run_cli(database_migration, "migrate-all", "--jobs", "2", "--create")
        self.assertEqual(code, 1, err)
        self.assertNoTraceback(out + err)
        summary = out[out.index("migrate-all:"):]
        self.assertTrue(summary.startswith("migrate-all: 5 ok, 1 failed, 0 skipped"), summary)
        self.assertIn("\n  failed: tenants/broken (its error is above)", summary)
        self.assertEqual(err.count("not an SQLite database"), 1, err)      # each failure once

    def test_jobs_must_be_a_positive_number(self) -> None:
        before = self.snapshot([self.tenant(stem) for stem in self.stems] + [self.db("dev")])
        for jobs in ("0", "-1", "two"):
            with self.subTest(jobs=jobs):
                code, out, err = self.run_cli(database_migration, "migrate-all", "--jobs", jobs)
                self.assertEqual(code, 2, err)
                self.assertIn("--jobs", err)
                self.assertNoTraceback(err)
                self.assertEqual(out, "")
        self.assertUnchanged(before)
        self.assertFalse(self.db("prod").exists())


class DuplicateMemberNameTests(unittest.TestCase):
    def test_two_files_with_the_same_stem_are_a_configuration_error(self) -> None:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            (root / "tenants").mkdir()
            for name in ("acme.db", "acme.sqlite"):
                sqlite3.connect(root / "tenants" / name).close()
            config = root / "instances.ini"
            config.write_text("[tenants]\npath = tenants/*\n", encoding="utf-8")
            with self.assertRaises(safe_db_update.CommandError) as caught:
                safe_db_update.load_instances(config)
            self.assertEqual(caught.exception.exit_code, 2)
            self.assertIn("tenants/acme", str(caught.exception))
