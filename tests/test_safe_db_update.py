"""safe_db_update.py in-process: backups, manifests, retention, prune, verify, restore,
check, info and the history file, on real SQLite files in a temporary project."""

from __future__ import annotations

import io
import resource
import subprocess
import sys
import json
import shutil
import sqlite3
import stat
import time
from contextlib import closing, redirect_stderr
from pathlib import Path

from tests.support import ROOT, ProjectTestCase, dump, query, safe_db_update, sha256

MANIFEST_KEYS = {"sha256", "size", "created_at", "source", "schema_version", "reason",
                 "sqlite_version", "verified"}


class BackupTestCase(ProjectTestCase):
    """Helpers shared by the tests below."""

    def cli(self, *argv: str) -> tuple[int, str, str]:
        return self.run_cli(safe_db_update, *argv)

    def backup(self, name: str = "dev", *argv: str) -> dict:
        """Take a backup through the CLI and return its --json document."""
        code, out, err = self.cli("backup", name, "--json", *argv)
        self.assertEqual(code, 0, err)
        self.assertEqual(err, "")
        return json.loads(out)

    def manifest(self, backup: Path | str) -> dict:
        return json.loads(Path(f"{backup}.json").read_text(encoding="utf-8"))

    def history(self, name: str = "dev") -> list[dict]:
        path = self.root / "backups" / name / "history.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def add_user(self, user_id: int, path: Path | None = None) -> None:
        with closing(sqlite3.connect(path or self.db())) as conn:
            conn.execute("INSERT INTO user (id, email, name) VALUES (?, ?, ?)",
                         (user_id, f"u{user_id}@x", f"User {user_id}"))
            conn.commit()

    def flip_byte(self, path: Path, offset: int | None = None) -> None:
        data = bytearray(path.read_bytes())
        offset = len(data) // 2 if offset is None else offset
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))


class BackupCommandTests(BackupTestCase):
    def test_backup_copies_every_row_and_prints_the_path(self) -> None:
        self.create()
        code, out, err = self.cli("backup", "dev")
        self.assertEqual(code, 0, err)
        self.assertEqual(err, "")
        [backup] = self.backups()
        self.assertIn(str(backup), out)
        self.assertEqual(dump(backup), dump(self.db()))

    def test_backup_file_name_has_the_instance_a_utc_stamp_and_the_reason(self) -> None:
        self.create()
        result = self.backup()
        self.assertRegex(Path(result["path"]).name, r"^dev-\d{8}T\d{12}Z-manual\.db$")
        self.assertEqual(Path(result["path"]).parent, self.root / "backups" / "dev" / "database")

    def test_backup_json_reports_the_contract_keys_with_their_types(self) -> None:
        self.create()
        result = self.backup()
        for key in ("name", "path", "size", "sha256", "seconds", "reason", "verified"):
            self.assertIn(key, result)
        self.assertEqual(result["name"], "dev")
        self.assertTrue(Path(result["path"]).is_absolute())
        self.assertIsInstance(result["size"], int)
        self.assertIs(result["verified"], True)
        self.assertEqual(result["reason"], "manual")
        self.assertEqual(result["sha256"], sha256(Path(result["path"])))

    def test_backup_leaves_the_live_database_unchanged(self) -> None:
        live = self.create()
        before = sha256(live)
        self.backup()
        self.assertEqual(sha256(live), before)

    def test_backup_files_are_0600_and_folders_0700(self) -> None:
        self.create()
        backup = Path(self.backup()["path"])
        for path in (backup, Path(f"{backup}.json")):
            with self.subTest(path=path.name):
                self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        for folder in (self.root / "backups" / "dev", self.root / "backups" / "dev" / "database"):
            with self.subTest(folder=folder):
                self.assertEqual(stat.S_IMODE(folder.stat().st_mode), 0o700)

    def test_backup_of_a_missing_database_exits_1_without_a_traceback(self) -> None:
        code, out, err = self.cli("backup", "dev")
        self.assertEqual(code, 1)
        self.assertIn("dev", err)
        self.assertNoTraceback(err)
        self.assertEqual(self.backups(), [])

    def test_backup_all_backs_up_every_instance(self) -> None:
        self.create("dev")
        self.create("prod")
        code, out, err = self.cli("backup", "--all", "--json")
        self.assertEqual(code, 0, err)
        names = [b["name"] for b in json.loads(out)["backups"]]
        self.assertEqual(names, ["dev", "prod"])
        self.assertEqual(len(self.backups("dev")), 1)
        self.assertEqual(len(self.backups("prod")), 1)
        self.assertEqual(dump(self.backups("prod")[0]), dump(self.db("prod")))

    def test_backup_all_with_a_missing_database_exits_1_and_backs_up_the_others(self) -> None:
        self.create("prod")                     # dev, first in the file, has no database
        code, out, err = self.cli("backup", "--all")
        self.assertEqual(code, 1)
        self.assertIn("dev", err)
        self.assertNoTraceback(err)
        self.assertEqual(self.backups("dev"), [])
        [backup] = self.backups("prod")
        self.assertEqual(dump(backup), dump(self.db("prod")))
        self.assertIn(str(backup), out)


class ManifestTests(BackupTestCase):
    def test_manifest_sits_beside_the_backup_with_the_contract_keys(self) -> None:
        live = self.create()
        backup = Path(self.backup()["path"])
        manifest_path = backup.parent / f"{backup.name}.json"
        self.assertTrue(manifest_path.is_file())
        manifest = self.manifest(backup)
        self.assertEqual(set(manifest), MANIFEST_KEYS)
        self.assertEqual(manifest["source"], str(live))
        self.assertEqual(manifest["schema_version"], 2)
        self.assertEqual(manifest["reason"], "manual")
        self.assertEqual(manifest["sqlite_version"], sqlite3.sqlite_version)
        self.assertIs(manifest["verified"], True)
        self.assertRegex(manifest["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

    def test_manifest_sha256_and_size_are_those_of_the_backup_file(self) -> None:
        self.create()
        backup = Path(self.backup()["path"])
        manifest = self.manifest(backup)
        self.assertEqual(manifest["sha256"], sha256(backup))
        self.assertRegex(manifest["sha256"], r"^[0-9a-f]{64}$")
        self.assertEqual(manifest["size"], backup.stat().st_size)

    def test_each_reason_is_recorded_in_the_manifest_and_the_file_name(self) -> None:
        self.create()
        self.backup()                                                       # manual
        self.write_migration("0003_add_note.sql", "ALTER TABLE loan ADD COLUMN note TEXT;\n")
        code, _, err = self.migrate("dev")                                  # pre-migrate
        self.assertEqual(code, 0, err)
        oldest = self.backups()[0]
        code, _, err = self.cli("restore", "dev", oldest.name, "--yes")    # pre-restore
        self.assertEqual(code, 0, err)
        reasons = sorted(self.manifest(b)["reason"] for b in self.backups())
        self.assertEqual(reasons, ["manual", "pre-migrate", "pre-restore"])
        for backup in self.backups():
            with self.subTest(backup=backup.name):
                self.assertTrue(backup.name.endswith(f"-{self.manifest(backup)['reason']}.db"))


class RetentionTests(BackupTestCase):
    ini = "[DEFAULT]\nkeep_backups = 3\nbusy_timeout = 2\n\n[dev]\npath = instance/dev.db\n"

    def test_retention_keeps_exactly_the_newest_n(self) -> None:
        live = self.create()
        made = []
        for user_id in range(10, 15):
            self.add_user(user_id)
            made.append(Path(self.backup()["path"]))
        self.assertEqual(self.backups(), sorted(made[-3:]))
        for gone in made[:2]:
            self.assertFalse(Path(f"{gone}.json").exists())
        self.assertEqual(query(self.backups()[-1], "SELECT MAX(id) FROM user"), [(14,)])
        self.assertEqual(query(live, "SELECT COUNT(*) FROM user"), [(7,)])

    def test_retention_never_removes_the_backup_just_made(self) -> None:
        self.create()
        first = Path(self.backup()["path"])
        # Three backups that claim to be newer than anything made now (a clock set wrong).
        for year in (2997, 2998, 2999):
            future = first.with_name(f"dev-{year}0101T000000000000Z-manual.db")
            shutil.copyfile(first, future)
            manifest = self.manifest(first)
            manifest["created_at"] = f"{year}-01-01T00:00:00.000000Z"
            Path(f"{future}.json").write_text(json.dumps(manifest), encoding="utf-8")
        just_made = Path(self.backup()["path"])
        self.assertTrue(just_made.is_file())
        self.assertTrue(Path(f"{just_made}.json").is_file())
        self.assertEqual(len(self.backups()), 5)        # future-dated backups are kept, too
        self.assertIn(just_made, self.backups())

    def test_retention_never_touches_the_live_database(self) -> None:
        live = self.create()
        for user_id in range(10, 15):
            self.add_user(user_id)      # different states: identical copies do not count
            digest = sha256(live)
            self.backup()
        self.assertEqual(sha256(live), digest)
        self.assertEqual(len(self.backups()), 3)

    def test_retention_spares_a_live_database_kept_in_the_backup_folder(self) -> None:
        # An unusual layout: the live file sits in its own backup folder with a
        # backup-like name and a manifest. Retention must still leave it alone.
        folder = self.root / "backups" / "dev" / "database"
        live = folder / "dev-20000101T000000000000Z-manual.db"
        self.config.write_text("[DEFAULT]\nkeep_backups = 2\nbusy_timeout = 2\n\n"
                               f"[dev]\npath = {live}\n", encoding="utf-8")
        folder.mkdir(parents=True)
        with closing(sqlite3.connect(live)) as conn:
            conn.execute("CREATE TABLE t (x)")
            conn.execute("INSERT INTO t VALUES (1)")
            conn.commit()
        Path(f"{live}.json").write_text(json.dumps({
            "sha256": sha256(live), "size": live.stat().st_size,
            "created_at": "2000-01-01T00:00:00.000000Z", "source": str(live),
            "schema_version": 0, "reason": "manual", "sqlite_version": sqlite3.sqlite_version,
            "verified": True}), encoding="utf-8")
        digest = sha256(live)
        for _ in range(3):
            self.backup()
        self.assertTrue(live.is_file())
        self.assertEqual(sha256(live), digest)
        code, _, err = self.cli("prune", "dev", "--keep", "1", "--yes")
        self.assertEqual(code, 0, err)
        self.assertTrue(live.is_file())
        self.assertEqual(query(live, "SELECT x FROM t"), [(1,)])


class PruneTests(BackupTestCase):
    ini = "[DEFAULT]\nkeep_backups = 0\nbusy_timeout = 2\n\n[dev]\npath = instance/dev.db\n"

    def make_backups(self, count: int) -> list[Path]:
        self.create()
        made = []
        for user_id in range(10, 10 + count):
            self.add_user(user_id)      # different states: identical copies do not count
            made.append(Path(self.backup()["path"]))
        return made

    def test_keep_0_in_the_ini_keeps_every_backup(self) -> None:
        made = self.make_backups(4)
        self.assertEqual(self.backups(), sorted(made))

    def test_prune_dry_run_lists_what_would_go_and_removes_nothing(self) -> None:
        made = self.make_backups(5)
        files = sorted(p.name for p in (self.root / "backups" / "dev" / "database").iterdir())
        code, out, err = self.cli("prune", "dev", "--keep", "2", "--dry-run")
        self.assertEqual(code, 0, err)
        for doomed in made[:3]:
            self.assertIn(f"would remove {doomed.name}", out)
        for kept in made[3:]:
            self.assertIn(f"keep         {kept.name}", out)
        self.assertEqual(sorted(p.name for p in (self.root / "backups" / "dev" / "database").iterdir()),
                         files)

    def test_prune_without_a_terminal_and_without_yes_is_refused(self) -> None:
        made = self.make_backups(3)
        code, out, err = self.cli("prune", "dev", "--keep", "1")
        self.assertEqual(code, 1)
        self.assertIn("--yes", err)
        self.assertNoTraceback(err)
        self.assertEqual(self.backups(), sorted(made))

    def test_prune_with_yes_keeps_the_newest_n_and_the_live_database(self) -> None:
        made = self.make_backups(4)
        digest = sha256(self.db())
        code, out, err = self.cli("prune", "dev", "--keep", "2", "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.backups(), sorted(made[2:]))
        for gone in made[:2]:
            self.assertFalse(Path(f"{gone}.json").exists())
        self.assertEqual(sha256(self.db()), digest)


class ListBackupsTests(BackupTestCase):
    def test_list_backups_shows_the_newest_first(self) -> None:
        self.create()
        made = [Path(self.backup()["path"]) for _ in range(3)]
        code, out, err = self.cli("list-backups", "dev", "--json")
        self.assertEqual(code, 0, err)
        listed = json.loads(out)
        self.assertEqual(listed["name"], "dev")
        self.assertEqual([Path(b["path"]) for b in listed["backups"]], made[::-1])
        created = [b["created_at"] for b in listed["backups"]]
        self.assertEqual(created, sorted(created, reverse=True))
        code, out, err = self.cli("list-backups", "dev")
        self.assertEqual(code, 0, err)
        positions = [out.index(p.name) for p in made]
        self.assertEqual(positions, sorted(positions, reverse=True))

    def test_list_backups_reports_size_schema_version_reason_and_sha256(self) -> None:
        self.create()
        backup = Path(self.backup()["path"])
        code, out, err = self.cli("list-backups", "dev", "--json")
        self.assertEqual(code, 0, err)
        [entry] = json.loads(out)["backups"]
        self.assertEqual(entry["size"], backup.stat().st_size)
        self.assertEqual(entry["schema_version"], 2)
        self.assertEqual(entry["reason"], "manual")
        self.assertEqual(entry["sha256"], sha256(backup))

    def test_a_database_file_without_a_manifest_is_listed_as_unverified(self) -> None:
        self.create()
        backup = Path(self.backup()["path"])
        orphan = backup.with_name("dev-20200101T000000000000Z-manual.db")
        shutil.copyfile(backup, orphan)
        code, out, err = self.cli("list-backups", "dev", "--json")
        listed = json.loads(out)["backups"]
        self.assertEqual([(Path(b["path"]), b["verified"]) for b in listed],
                         [(backup, True), (orphan, False)])


class VerifyTests(BackupTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.create()
        self.older = Path(self.backup()["path"])
        self.add_user(3)
        self.newer = Path(self.backup()["path"])

    def test_verify_checks_the_newest_backup_by_default(self) -> None:
        code, out, err = self.cli("verify", "dev")
        self.assertEqual(code, 0, err)
        self.assertIn(self.newer.name, out)
        self.assertNotIn(self.older.name, out)

    def test_verify_takes_a_bare_file_name_or_a_path(self) -> None:
        for argument in (self.older.name, str(self.older)):
            with self.subTest(argument=argument):
                code, out, err = self.cli("verify", "dev", argument)
                self.assertEqual(code, 0, err)
                self.assertIn(self.older.name, out)

    def test_a_flipped_byte_is_caught_by_verify(self) -> None:
        self.flip_byte(self.older)
        for argument in (self.older.name, str(self.older)):
            with self.subTest(argument=argument):
                code, out, err = self.cli("verify", "dev", argument)
                self.assertEqual(code, 1)
                self.assertIn("SHA-256", out + err)
                self.assertNoTraceback(out + err)
        code, _, err = self.cli("verify", "dev")               # the newest is still sound
        self.assertEqual(code, 0, err)

    def test_verify_json_says_whether_the_backup_is_sound(self) -> None:
        self.flip_byte(self.newer)
        code, out, _ = self.cli("verify", "dev", "--json")
        self.assertEqual(code, 1)
        result = json.loads(out)
        self.assertIs(result["verified"], False)
        self.assertTrue(result["problems"])

    def test_a_backup_whose_manifest_is_missing_is_refused_by_verify(self) -> None:
        Path(f"{self.older}.json").unlink()
        code, out, err = self.cli("verify", "dev", self.older.name)
        self.assertEqual(code, 1)
        self.assertIn("manifest", err)
        self.assertNoTraceback(err)

    def test_a_flipped_byte_makes_restore_refuse_and_leave_the_live_database_alone(self) -> None:
        self.flip_byte(self.older)
        self.add_user(4)
        before = sha256(self.db())
        count = len(self.backups())
        code, out, err = self.cli("restore", "dev", self.older.name, "--yes")
        self.assertEqual(code, 1)
        self.assertIn(self.older.name, err)
        self.assertNoTraceback(err)
        self.assertEqual(sha256(self.db()), before)
        self.assertEqual(len(self.backups()), count)    # no pre-restore backup either

    def test_verify_with_no_backups_exits_1(self) -> None:
        shutil.rmtree(self.root / "backups")
        code, out, err = self.cli("verify", "dev")
        self.assertEqual(code, 1)
        self.assertIn("no backups", err)


class RestoreTests(BackupTestCase):
    def test_restore_brings_the_older_contents_back(self) -> None:
        live = self.create()
        original = dump(live)
        self.backup()
        with closing(sqlite3.connect(live)) as conn:
            conn.execute("INSERT INTO user (id, email, name) VALUES (7, 'g@x', 'Gus')")
            conn.execute("DELETE FROM payment")
            conn.commit()
        replaced = dump(live)
        code, out, err = self.cli("restore", "dev", "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual(dump(live), original)
        self.assertEqual(query(live, "SELECT COUNT(*) FROM payment"), [(2,)])
        [safety] = [b for b in self.backups() if b.name.endswith("-pre-restore.db")]
        self.assertEqual(dump(safety), replaced)
        self.assertIn(str(safety), out)

    def test_restore_of_a_named_backup_restores_that_one(self) -> None:
        live = self.create()
        older = Path(self.backup()["path"])
        self.add_user(3)
        self.backup()
        self.add_user(4)
        code, _, err = self.cli("restore", "dev", str(older), "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual(query(live, "SELECT id FROM user ORDER BY id"), [(1,), (2,)])

    def test_restore_deletes_no_backup(self) -> None:
        self.create()
        made = [Path(self.backup()["path"]) for _ in range(2)]
        code, _, err = self.cli("restore", "dev", "--yes")
        self.assertEqual(code, 0, err)
        for backup in made:
            self.assertTrue(backup.is_file())
        self.assertEqual(len(self.backups()), 3)

    def test_restore_without_yes_and_without_a_terminal_is_refused(self) -> None:
        live = self.create()
        self.backup()
        self.add_user(3)
        before = sha256(live)
        count = len(self.backups())
        code, out, err = self.cli("restore", "dev")
        self.assertEqual(code, 1)
        self.assertIn("--yes", err)
        self.assertNoTraceback(err)
        self.assertEqual(sha256(live), before)
        self.assertEqual(len(self.backups()), count)

    def test_restore_of_a_protected_instance_without_yes_is_refused(self) -> None:
        live = self.create("prod")
        self.backup("prod")
        self.add_user(3, live)
        before = sha256(live)
        code, out, err = self.cli("restore", "prod")
        self.assertEqual(code, 1)
        self.assertEqual(sha256(live), before)


class EmergencyRestoreTests(BackupTestCase):
    def test_restore_brings_back_a_database_file_that_was_deleted(self) -> None:
        live = self.create()
        original = dump(live)
        self.backup()
        live.unlink()
        code, out, err = self.cli("restore", "dev", "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual(dump(live), original)
        self.assertIn("no file to keep", out)

    def test_restore_over_an_unreadable_file_keeps_its_bytes_as_the_pre_restore_backup(self) -> None:
        live = self.create()
        original = dump(live)
        self.backup()
        garbage = b"this is not a database" * 100
        live.write_bytes(garbage)
        Path(f"{live}-journal").write_bytes(b"stale journal")
        code, _, err = self.cli("restore", "dev", "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual(dump(live), original)
        self.assertFalse(Path(f"{live}-journal").exists())
        [safety] = [b for b in self.backups() if b.name.endswith("-pre-restore.db")]
        self.assertEqual(safety.read_bytes(), garbage)
        self.assertIs(self.manifest(safety)["verified"], False)
        [journal] = (self.root / "backups" / "dev" / "database").glob("*-replaced.db-journal")
        self.assertEqual(journal.read_bytes(), b"stale journal")

    def test_a_restore_over_an_unreadable_file_that_runs_out_of_space_leaves_the_file_alone(self) -> None:
        live = self.create()
        with closing(sqlite3.connect(live)) as conn:
            conn.executemany("INSERT INTO user (email, name) VALUES (?, ?)",
                             [(f"u{i}@x", "x" * 200) for i in range(2000)])
            conn.commit()
        self.backup()
        garbage = b"not a database" * 300                   # about 4 KiB, under the limit
        live.write_bytes(garbage)
        limit = 256 * 1024                                  # the backup is larger than this

        def small_files() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        result = subprocess.run([sys.executable, str(ROOT / "safe_db_update.py"), "--config",
                                 str(self.config), "restore", "dev", "--yes"],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                preexec_fn=small_files, timeout=60)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn("restore failed", result.stderr)
        self.assertEqual(live.read_bytes(), garbage)
        self.assertEqual([p.name for p in live.parent.iterdir()], [live.name])

    def test_a_refused_restore_is_recorded_in_the_history(self) -> None:
        self.create()
        self.backup()
        code, _, _ = self.cli("restore", "dev")
        self.assertEqual(code, 1)
        last = self.history()[-1]
        self.assertEqual(last["operation"], "restore")
        self.assertTrue(last["outcome"].startswith("failed"), last)

    def test_a_partial_file_left_by_a_killed_backup_is_removed_by_the_next_backup(self) -> None:
        self.create()
        self.backup()
        folder = self.root / "backups" / "dev" / "database"
        stale = folder / ".dev-20260101T000000000000Z-manual.db.partial"
        stale.write_bytes(b"half a copy")
        self.backup()
        self.assertFalse(stale.exists())
        self.assertEqual(len(self.backups()), 2)


class CheckTests(BackupTestCase):
    def add_orphan_loan(self) -> None:
        with closing(sqlite3.connect(self.db())) as conn:   # foreign keys are off by default
            conn.execute("INSERT INTO loan (id, user_id, amount) VALUES (9, 99, 5)")
            conn.commit()

    def test_check_of_a_healthy_database_exits_0(self) -> None:
        self.create()
        for extra in ((), ("--quick",)):
            with self.subTest(extra=extra):
                code, out, err = self.cli("check", "dev", *extra)
                self.assertEqual(code, 0, err)
                self.assertEqual(err, "")
                self.assertIn("ok", out)

    def test_check_lists_a_foreign_key_violation_and_exits_1(self) -> None:
        self.create()
        self.add_orphan_loan()
        for extra in ((), ("--quick",)):
            with self.subTest(extra=extra):
                code, out, err = self.cli("check", "dev", *extra)
                self.assertEqual(code, 1)
                self.assertIn("loan", out)
                self.assertIn("user", out)
                self.assertNoTraceback(out + err)

    def test_check_json_lists_every_problem(self) -> None:
        self.create()
        self.add_orphan_loan()
        with closing(sqlite3.connect(self.db())) as conn:
            conn.execute("INSERT INTO payment (id, loan_id, amount) VALUES (9, 77, 1)")
            conn.commit()
        code, out, _ = self.cli("check", "dev", "--json")
        self.assertEqual(code, 1)
        result = json.loads(out)
        self.assertIs(result["ok"], False)
        self.assertEqual(len(result["problems"]), 2)
        self.assertTrue(any("loan" in p for p in result["problems"]))
        self.assertTrue(any("payment" in p for p in result["problems"]))

    def test_check_changes_no_byte_of_the_database(self) -> None:
        live = self.create()
        before, mtime = sha256(live), live.stat().st_mtime_ns
        self.cli("check", "dev")
        self.assertEqual(sha256(live), before)
        self.assertEqual(live.stat().st_mtime_ns, mtime)

    def test_check_of_a_missing_database_exits_1_and_creates_nothing(self) -> None:
        code, _, err = self.cli("check", "dev")
        self.assertEqual(code, 1)
        self.assertNoTraceback(err)
        self.assertFalse(self.db().exists())


class InfoTests(BackupTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.create()
        with closing(sqlite3.connect(self.db())) as conn:
            conn.execute("CREATE INDEX loan_by_user ON loan (user_id)")
            conn.execute("CREATE VIEW big_loans AS SELECT * FROM loan WHERE amount > 200")
            conn.execute("CREATE TRIGGER no_negative BEFORE INSERT ON payment "
                         "WHEN NEW.amount < 0 BEGIN SELECT RAISE(ABORT, 'negative'); END")
            conn.execute("INSERT INTO payment (id, loan_id, amount) VALUES (3, 1, 5)")
            conn.commit()

    def test_info_json_describes_tables_indexes_views_triggers_and_backups(self) -> None:
        self.backup()
        newest = Path(self.backup()["path"])
        code, out, err = self.cli("info", "dev", "--json")
        self.assertEqual(code, 0, err)
        info = json.loads(out)
        self.assertEqual(info["name"], "dev")
        self.assertEqual(info["path"], str(self.db()))
        self.assertEqual(info["size"], self.db().stat().st_size)
        self.assertEqual(info["sqlite_version"], sqlite3.sqlite_version)
        self.assertEqual(info["page_size"] * info["page_count"], info["size"])
        self.assertIsInstance(info["freelist_count"], int)
        self.assertEqual(info["journal_mode"], "delete")
        self.assertEqual(info["schema_version"], 2)
        tables = {t["name"]: t for t in info["tables"]}
        self.assertEqual(set(tables), {"user", "loan", "payment", "schema_migrations"})
        self.assertEqual(tables["payment"]["rows"], 3)
        self.assertEqual(tables["user"]["rows"], 2)
        self.assertEqual(tables["schema_migrations"]["rows"], 2)
        self.assertEqual(tables["user"]["columns"],
                         ["id", "email", "name", "reset_token", "reset_token_expires"])
        self.assertIn("loan_by_user", info["indexes"])
        self.assertEqual(info["views"], ["big_loans"])
        self.assertEqual(info["triggers"], ["no_negative"])
        self.assertEqual(info["backups"], {"count": 2, "newest": str(newest)})

    def test_info_text_shows_the_same_facts(self) -> None:
        newest = Path(self.backup()["path"])
        code, out, err = self.cli("info", "dev")
        self.assertEqual(code, 0, err)
        self.assertEqual(err, "")
        for word in (str(self.db()), sqlite3.sqlite_version, "loan_by_user", "big_loans",
                     "no_negative", "reset_token_expires", newest.name):
            self.assertIn(word, out)
        payment_line = next(line for line in out.splitlines() if line.strip().startswith("payment"))
        self.assertIn("3 rows", payment_line)
        self.assertIn("loan_id", payment_line)
        self.assertRegex(out, r"backups:\s+1\b")

    def test_info_without_backups_says_none(self) -> None:
        code, out, err = self.cli("info", "dev", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["backups"], {"count": 0, "newest": None})

    def test_info_changes_no_byte_of_the_database(self) -> None:
        before = sha256(self.db())
        self.cli("info", "dev")
        self.assertEqual(sha256(self.db()), before)


class HistoryTests(BackupTestCase):
    def test_history_gets_one_line_per_backup_restore_and_prune(self) -> None:
        self.create()
        skip = len(self.history())                              # the migrate --create line
        first = Path(self.backup()["path"])
        self.add_user(3)                # different states: identical copies do not count
        self.backup()
        self.add_user(4)
        code, _, err = self.cli("restore", "dev", first.name, "--yes")
        self.assertEqual(code, 0, err)
        code, _, err = self.cli("prune", "dev", "--keep", "1", "--yes")
        self.assertEqual(code, 0, err)
        entries = self.history()[skip:]
        self.assertEqual([e["operation"] for e in entries], ["backup", "backup", "restore", "prune"])
        self.assertEqual([e["outcome"] for e in entries], ["ok"] * 4)
        for entry in entries:
            with self.subTest(operation=entry["operation"]):
                for key in ("created_at", "name", "user", "host", "command", "backup", "outcome",
                            "seconds") + (("version_before", "version_after")
                                          if entry["operation"] != "prune" else ()):
                    self.assertIn(key, entry)
        self.assertEqual(entries[0]["backup"], str(first))
        self.assertTrue(entries[2]["backup"].endswith("-pre-restore.db"))
        self.assertEqual(entries[2]["version_after"], 2)
        self.assertEqual(len(entries[3]["removed"]), 2)

    def test_a_failed_backup_is_recorded_too(self) -> None:
        code, _, _ = self.cli("backup", "dev")                 # no database yet
        self.assertEqual(code, 1)
        [entry] = self.history()
        self.assertEqual(entry["operation"], "backup")
        self.assertTrue(entry["outcome"].startswith("failed"), entry)

    def test_read_only_commands_write_no_history(self) -> None:
        self.create()
        self.backup()
        count = len(self.history())
        for argv in (("list-backups", "dev"), ("verify", "dev"), ("check", "dev"),
                     ("info", "dev"), ("prune", "dev", "--keep", "1", "--dry-run")):
            code, _, err = self.cli(*argv)
            self.assertEqual(code, 0, err)
        self.assertEqual(len(self.history()), count)


class FunctionTests(BackupTestCase):
    def test_create_backup_returns_a_record_that_matches_its_manifest(self) -> None:
        self.create()
        backup = safe_db_update.create_backup(self.instance(), "pre-rollback")
        self.assertTrue(backup.path.name.endswith("-pre-rollback.db"))
        self.assertEqual(backup.manifest(), self.manifest(backup.path))
        self.assertEqual(safe_db_update.verify_backup(backup), [])

    def test_list_backups_ignores_hidden_partial_files(self) -> None:
        self.create()
        backup = safe_db_update.create_backup(self.instance())
        partial = backup.path.parent / f".{backup.path.name}.partial"
        shutil.copyfile(backup.path, partial)
        shutil.copyfile(f"{backup.path}.json", f"{partial}.json")
        self.assertEqual([b.path for b in safe_db_update.list_backups(self.instance())],
                         [backup.path])

    def test_prune_backups_never_returns_the_spared_backup(self) -> None:
        self.create()
        made = []
        for user_id in range(10, 13):
            self.add_user(user_id)      # different states: identical copies do not count
            made.append(safe_db_update.create_backup(self.instance()).path)
        doomed = safe_db_update.prune_backups(self.instance(), 1, spare=made[0])
        self.assertEqual(sorted(b.path for b in doomed), [made[1]])     # made[2] is the newest

    def test_check_database_returns_no_problems_for_a_healthy_database(self) -> None:
        self.create()
        self.assertEqual(safe_db_update.check_database(self.instance()), [])
        self.assertEqual(safe_db_update.check_database(self.instance(), quick=True), [])


if __name__ == "__main__":
    import unittest
    unittest.main()


class ProgressLineTests(BackupTestCase):
    """The progress line of a long backup: on a terminal only, after a while."""

    def setUp(self) -> None:
        super().setUp()
        self.create()
        self.partial = self.root / "copy.partial"
        delay = safe_db_update.PROGRESS_AFTER_SECONDS
        self.addCleanup(setattr, safe_db_update, "PROGRESS_AFTER_SECONDS", delay)
        safe_db_update.PROGRESS_AFTER_SECONDS = 0.0

    def copy_slowly(self, enabled: bool) -> str:
        err = io.StringIO()
        with redirect_stderr(err):
            with safe_db_update.progress_line(self.instance(), self.partial, enabled):
                for _ in range(4):
                    with open(self.partial, "ab") as handle:
                        handle.write(b"x" * 4096)
                    time.sleep(0.2)
        return err.getvalue()

    def test_a_long_copy_shows_how_much_is_written(self) -> None:
        shown = self.copy_slowly(enabled=True)
        self.assertIn("dev: backing up:", shown)
        self.assertIn("%)", shown)
        self.assertIn("verifying", shown)

    def test_nothing_is_shown_when_progress_is_off(self) -> None:
        self.assertEqual(self.copy_slowly(enabled=False), "")

    def test_a_backup_without_a_terminal_prints_nothing_on_stderr(self) -> None:
        result = self.run_script("safe_db_update.py", "backup", "dev")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr, "")
