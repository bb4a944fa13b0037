"""migrate checks the database's snapshot once: the pre-migrate backup's integrity_check
of its copy stands in for a quick_check of the live file (issue 12, item 1)."""

from __future__ import annotations

import json
import sqlite3
import unittest
from contextlib import closing
from pathlib import Path

from tests.support import (ProjectTestCase, damage_a_page, database_migration, query,
                           safe_db_update, sha256)

ADD_PHONE = """-- migrate:up
ALTER TABLE user ADD COLUMN phone TEXT;
"""


class CheckOnceTestCase(ProjectTestCase):

    def setUp(self) -> None:
        super().setUp()
        self.live = self.create()

    def add_pending(self) -> None:
        self.write_migration("0003_add_phone.sql", ADD_PHONE)

    def damage_a_page(self) -> None:
        damage_a_page(self.live)

    def point_index_at_another_column(self) -> None:
        """An index whose entries no longer match its table: quick_check passes, only
        integrity_check (which the pre-migrate backup runs) sees it."""
        with closing(sqlite3.connect(self.live)) as conn:
            conn.execute("CREATE INDEX ix_user_name ON user (name)")
            conn.commit()
            conn.execute("PRAGMA writable_schema = ON")
            conn.execute("UPDATE sqlite_master SET sql = 'CREATE INDEX ix_user_name ON user (email)'"
                         " WHERE name = 'ix_user_name'")
            conn.commit()
        with closing(sqlite3.connect(self.live)) as conn:
            self.assertEqual(conn.execute("PRAGMA quick_check").fetchall(), [("ok",)])
            self.assertNotEqual(conn.execute("PRAGMA integrity_check").fetchall(), [("ok",)])

    def manifests(self) -> list[dict]:
        return [json.loads(Path(f"{b}.json").read_text(encoding="utf-8")) for b in self.backups()]

    def assertRefusedAsDamaged(self, code: int, err: str) -> None:
        self.assertEqual(code, 1, err)
        self.assertIn("the database is damaged; nothing changed", err)
        self.assertIn("emergency procedures", err)
        self.assertIn("nothing changed", err)
        self.assertNoTraceback(err)


class DamagedDatabaseTests(CheckOnceTestCase):

    def test_a_damaged_page_is_refused_and_its_copy_is_kept_unverified(self) -> None:
        self.damage_a_page()
        self.add_pending()
        before = sha256(self.live)
        code, _, err = self.migrate("dev")
        self.assertRefusedAsDamaged(code, err)
        self.assertEqual(sha256(self.live), before)
        # The copy of the damaged snapshot is evidence, never a restore point.
        self.assertEqual([m["verified"] for m in self.manifests()], [False])
        self.assertIn(str(self.backups()[0]), err)
        history, _ = database_migration.read_history(self.instance())
        self.assertTrue(history[-1]["outcome"].startswith("failed"), history[-1])

    def test_an_index_that_only_integrity_check_sees_is_refused_as_damage(self) -> None:
        self.point_index_at_another_column()
        self.add_pending()
        before = sha256(self.live)
        result = self.run_script("database_migration.py", "migrate", "dev")
        self.assertRefusedAsDamaged(result.returncode, result.stderr)
        self.assertIn("integrity_check", result.stderr)
        self.assertEqual(sha256(self.live), before)
        self.assertNotIn("phone", [c[1] for c in query(self.live, "PRAGMA table_info(user)")])
        self.assertEqual([m["verified"] for m in self.manifests()], [False])

    def test_migrate_all_refuses_a_damaged_member_and_goes_on_with_keep_going(self) -> None:
        other = self.create("prod")
        self.damage_a_page()
        self.add_pending()
        code, _, err = self.run_cli(database_migration, "migrate-all", "--keep-going", "--yes")
        self.assertEqual(code, 1, err)
        self.assertIn("dev: ", err)
        self.assertIn("the database is damaged", err)
        self.assertIn("phone", [c[1] for c in query(other, "PRAGMA table_info(user)")])

    def test_with_nothing_pending_the_live_file_is_still_checked(self) -> None:
        self.damage_a_page()
        before = sha256(self.live)
        code, _, err = self.migrate("dev")
        self.assertRefusedAsDamaged(code, err)
        self.assertIn("quick_check", err)
        self.assertEqual(self.backups(), [])
        self.assertEqual(sha256(self.live), before)

    def test_a_dry_run_still_checks_the_live_file(self) -> None:
        self.damage_a_page()
        self.add_pending()
        code, _, err = self.migrate("dev", "--dry-run")
        self.assertRefusedAsDamaged(code, err)
        self.assertEqual(self.backups(), [])


class EveryChangeStartsWithAVerifiedBackupTests(CheckOnceTestCase):
    """rollback, baseline and adopt share migrate's rule: a pre-change backup whose copy
    fails integrity_check means the database is damaged, and nothing is changed."""

    def test_rollback_of_a_database_only_integrity_check_sees_as_damaged_is_refused(self) -> None:
        self.write_migration("0003_add_phone.sql", ADD_PHONE + "-- migrate:down\n"
                             "ALTER TABLE user DROP COLUMN phone;\n")
        code, _, err = self.migrate("dev")
        self.assertEqual(code, 0, err)
        self.point_index_at_another_column()
        before = sha256(self.live)
        code, _, err = self.run_cli(database_migration, "rollback", "dev", "--to", "2", "--yes")
        self.assertRefusedAsDamaged(code, err)
        self.assertEqual(sha256(self.live), before)
        self.assertIn("phone", [c[1] for c in query(self.live, "PRAGMA table_info(user)")])

    def test_baseline_of_a_damaged_database_records_nothing(self) -> None:
        with closing(sqlite3.connect(self.live)) as conn:     # a database made without the tool
            conn.execute("DROP TABLE schema_migrations")
            conn.commit()
        damage_a_page(self.live)
        before = sha256(self.live)
        code, _, err = self.run_cli(database_migration, "baseline", "dev", "--to", "2", "--force")
        self.assertRefusedAsDamaged(code, err)
        self.assertEqual(sha256(self.live), before)
        self.assertEqual([m["verified"] for m in self.manifests()], [False])


class HealthyDatabaseTests(CheckOnceTestCase):

    def test_a_healthy_database_is_migrated_after_one_verified_backup(self) -> None:
        self.add_pending()
        code, out, err = self.migrate("dev", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["applied"], [3])
        self.assertEqual([m["verified"] for m in self.manifests()], [True])
        self.assertIn("phone", [c[1] for c in query(self.live, "PRAGMA table_info(user)")])


class VerifyQuickTests(CheckOnceTestCase):
    """verify = quick: nightly backups checked with quick_check, what it does not see."""

    def set_verify(self, value: str) -> None:
        self.config.write_text(self.config.read_text(encoding="utf-8").replace(
            "[dev]\n", f"[dev]\nverify = {value}\n"), encoding="utf-8")

    def test_a_nightly_backup_says_it_was_checked_with_quick_check_only(self) -> None:
        self.set_verify("quick")
        result = self.run_script("safe_db_update.py", "backup", "dev", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        data = json.loads(result.stdout)
        self.assertEqual((data["verified"], data["checked_with"]), (True, "quick_check"))
        self.assertEqual(self.manifests()[0]["checked_with"], "quick_check")
        text = self.run_script("safe_db_update.py", "backup", "dev")
        self.assertIn("verify = quick: quick_check only", text.stdout)

    def test_the_default_manifest_is_unchanged(self) -> None:
        code, out, err = self.run_cli(safe_db_update, "backup", "dev", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["checked_with"], "integrity_check")
        self.assertNotIn("checked_with", self.manifests()[0])

    def test_quick_does_not_see_an_index_out_of_step_but_migrate_still_does(self) -> None:
        self.set_verify("quick")
        self.point_index_at_another_column()
        code, out, err = self.run_cli(safe_db_update, "backup", "dev", "--json")
        self.assertEqual((code, json.loads(out)["verified"]), (0, True), err)   # documented
        code, _, err = self.run_cli(safe_db_update, "verify", "dev")
        self.assertEqual(code, 1, err)                 # verify runs the full check
        self.add_pending()
        before = sha256(self.live)
        code, _, err = self.migrate("dev")
        self.assertRefusedAsDamaged(code, err)         # pre-migrate: always integrity_check
        self.assertEqual(sha256(self.live), before)

    def test_an_unknown_value_is_a_configuration_error(self) -> None:
        self.set_verify("sometimes")
        result = self.run_script("safe_db_update.py", "backup", "dev")
        self.assertEqual(result.returncode, 2)
        self.assertIn("[dev]: verify must be full", result.stderr)
        self.assertNoTraceback(result.stderr)


if __name__ == "__main__":
    unittest.main()
