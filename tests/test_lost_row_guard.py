"""The lost-row guard: a confirmation covers the statement it confirms, not every loss in the run.

Also: an UPDATE whose WHERE is always true (WHERE 1) is destructive like one without WHERE.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import unittest

from tests.support import ROOT, database_migration, dump, query
from tests.test_apply import ApplyTestCase

destructive_kind = database_migration.destructive_kind

# The real-world rebuild: is_admin was stored as 't'/'f' and, for some users, as 0.
# Copying WHERE is_admin = 't' and WHERE is_admin = 'f' leaves the 0 rows behind.
USERS_REBUILD = """
CREATE TABLE user_new (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
                       reset_token VARCHAR(100), reset_token_expires DATETIME,
                       is_admin INTEGER NOT NULL DEFAULT 0);
INSERT INTO user_new (id, email, name, reset_token, reset_token_expires, is_admin)
    SELECT id, email, name, reset_token, reset_token_expires, 1 FROM user WHERE is_admin = 't';
INSERT INTO user_new (id, email, name, reset_token, reset_token_expires, is_admin)
    SELECT id, email, name, reset_token, reset_token_expires, 0 FROM user WHERE is_admin = 'f';
DROP TABLE user;
ALTER TABLE user_new RENAME TO user;
"""


DELETING_PYTHON = "DESTRUCTIVE = True\n\ndef up(conn):\n    conn.execute('DELETE FROM payment WHERE id = 1')\n"


class GuardTestCase(ApplyTestCase):
    """dev at version 3 (user.is_admin as text), three users, one stored with is_admin = 0."""

    def setUp(self) -> None:
        super().setUp()
        self.add(3, "ALTER TABLE user ADD COLUMN is_admin TEXT;")
        code, _, err = self.migrate("dev")
        self.assertEqual(code, 0, err)
        self.execute("UPDATE user SET is_admin = 't' WHERE id = 1",
                     "UPDATE user SET is_admin = 'f' WHERE id = 2",
                     "INSERT INTO user (id, email, name, is_admin) VALUES (3, 'c@x', 'Cy', 0)")

    def assertRefusedForRowLoss(self, err: str, table: str, before: int, after: int) -> None:
        self.assertIn("lost-row guard", err)
        self.assertIn(f"table {table} had {before} rows before the run and has {after}", err)
        self.assertIn(f"--allow-row-loss {table}", err)
        self.assertNoTraceback(err)


class RealWorldRebuildTests(GuardTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.add(4, USERS_REBUILD)

    def test_a_rebuild_that_leaves_rows_behind_is_refused_even_with_yes(self) -> None:
        err = self.assertFailedAndRolledBack("--yes", words=("lost-row guard",))
        self.assertRefusedForRowLoss(err, "user", 3, 2)
        self.assertEqual(self.versions(), [1, 2, 3])
        self.assertEqual(self.count("user"), 3)

    def test_the_refusal_names_the_backup_and_the_history_says_failed(self) -> None:
        err = self.assertFailedAndRolledBack("--yes")
        self.assertIn(str(self.backups()[-1]), err)
        entries, = [self.run_cli(database_migration, "history", "dev", "--json")[1]]
        last = json.loads(entries)["entries"][-1]
        self.assertEqual((last["version_after"], last["outcome"][:6]), (3, "failed"))

    def test_it_is_refused_as_a_script_with_yes_and_no_terminal(self) -> None:
        before = dump(self.path)
        result = self.run_script("database_migration.py", "migrate", "dev", "--yes")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertRefusedForRowLoss(result.stderr, "user", 3, 2)
        self.assertEqual(dump(self.path), before)

    def test_it_is_refused_after_y_at_a_real_terminal_prompt(self) -> None:
        before = dump(self.path)
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        try:
            process = subprocess.Popen(
                [sys.executable, str(ROOT / "database_migration.py"), "--config", str(self.config),
                 "migrate", "dev"], stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, cwd=self.root)
        finally:
            os.close(slave)
        os.write(master, b"y\n")
        out, err = process.communicate(timeout=60)
        self.assertIn("[y/N]", err)             # it really asked, on a terminal
        self.assertEqual(process.returncode, 1, out + err)
        self.assertRefusedForRowLoss(err, "user", 3, 2)
        self.assertEqual(dump(self.path), before)
        self.assertEqual(len(self.backups()), 2)    # version 3's and this run's pre-migrate

    def test_allow_row_loss_names_the_table_and_lets_the_run_commit(self) -> None:
        code, _, err = self.migrate("dev", "--yes", "--allow-row-loss", "user")
        self.assertEqual(code, 0, err)
        self.assertEqual(query(self.path, "SELECT id, is_admin FROM user ORDER BY id"), [(1, 1), (2, 0)])
        self.assertEqual(self.versions(), [1, 2, 3, 4])

    def test_allow_row_loss_for_another_table_does_not_cover_it(self) -> None:
        err = self.assertFailedAndRolledBack("--yes", "--allow-row-loss", "payment")
        self.assertRefusedForRowLoss(err, "user", 3, 2)

    def test_the_dry_run_exits_1_naming_the_table_and_the_flag_and_changes_nothing(self) -> None:
        files, mtime = self.files(), os.stat(self.path).st_mtime_ns
        code, out, err = self.migrate("dev", "--dry-run")
        self.assertEqual(code, 1, out + err)
        self.assertIn("FAILED", out)
        self.assertIn("table user had 3 rows before the run and has 2", out)
        self.assertIn("--allow-row-loss user", out)
        self.assertEqual((self.files(), os.stat(self.path).st_mtime_ns), (files, mtime))

    def test_the_dry_run_honours_allow_row_loss(self) -> None:
        code, out, err = self.migrate("dev", "--dry-run", "--allow-row-loss", "user")
        self.assertEqual(code, 0, out + err)
        self.assertIn("rows in user: 3 -> 2", out)
        self.assertEqual(self.count("user"), 3)

    def test_migrate_all_refuses_it_and_takes_the_flag_too(self) -> None:
        def dev_result(*argv: str) -> dict:
            _, out, _ = self.run_cli(database_migration, "migrate-all", "--keep-going", "--json", *argv)
            return json.loads(out)["instances"][0]      # prod has no database: it fails alone
        refused = dev_result("--yes")
        self.assertEqual(refused["result"], "failed")
        self.assertIn("--allow-row-loss user", refused["error"])
        self.assertEqual(self.count("user"), 3)
        self.assertEqual(dev_result("--yes", "--allow-row-loss", "user")["result"], "ok")
        self.assertEqual(self.count("user"), 2)


class CoverageTests(GuardTestCase):
    """What each kind of confirmation covers, and what it does not."""

    def test_a_confirmed_delete_covers_only_the_table_it_deletes_from(self) -> None:
        self.add(4, "DELETE FROM payment WHERE id = 1;\n" + USERS_REBUILD)
        err = self.assertFailedAndRolledBack("--yes")
        self.assertRefusedForRowLoss(err, "user", 3, 2)
        self.assertNotIn("table payment", err)

    def test_a_confirmed_delete_covers_only_the_rows_it_removed(self) -> None:
        self.execute("INSERT INTO payment (id, loan_id, amount) VALUES (3, 1, 30)")
        self.add(4, "DELETE FROM payment WHERE id = 3;\n"
                    "UPDATE OR REPLACE payment SET id = 1 WHERE id = 2;")
        err = self.assertFailedAndRolledBack("--yes")
        self.assertRefusedForRowLoss(err, "payment", 3, 1)
        self.assertIn("confirmed statements removed 1", err)

    def test_a_confirmed_delete_may_remove_its_rows(self) -> None:
        self.add(4, 'DELETE FROM "Payment" WHERE id = 1;')
        code, _, err = self.migrate("dev", "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.count("payment"), 1)

    def test_rows_a_trigger_removes_behind_a_confirmed_delete_are_refused(self) -> None:
        self.add(4, """
            CREATE TRIGGER loan_gone AFTER DELETE ON loan BEGIN
                DELETE FROM payment WHERE loan_id = old.id;
            END;
            DELETE FROM loan WHERE id = 2;
        """)
        err = self.assertFailedAndRolledBack("--yes")
        self.assertRefusedForRowLoss(err, "payment", 2, 1)
        self.assertNotIn("table loan", err)

    def test_a_confirmed_drop_table_covers_a_table_that_stays_dropped(self) -> None:
        self.add(4, "DROP TABLE payment;")
        code, _, err = self.migrate("dev", "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual(query(self.path, "SELECT name FROM sqlite_master WHERE name = 'payment'"), [])

    def test_a_drop_and_re_create_under_the_same_name_must_keep_every_row(self) -> None:
        self.add(4, """
            CREATE TABLE payment_copy AS SELECT * FROM payment WHERE amount > 15;
            DROP TABLE payment;
            CREATE TABLE payment (id INTEGER PRIMARY KEY, loan_id INTEGER NOT NULL, amount NUMERIC);
            INSERT INTO payment SELECT * FROM payment_copy;
            DROP TABLE payment_copy;
        """)
        err = self.assertFailedAndRolledBack("--yes")
        self.assertRefusedForRowLoss(err, "payment", 2, 1)

    def test_a_confirmed_delete_from_the_renamed_old_table_does_not_cover_the_new_one(self) -> None:
        self.add(4, """
            ALTER TABLE payment RENAME TO payment_old;
            CREATE TABLE payment (id INTEGER PRIMARY KEY, loan_id INTEGER NOT NULL, amount NUMERIC);
            INSERT INTO payment SELECT * FROM payment_old WHERE amount > 15;
            DELETE FROM payment_old;
            DROP TABLE payment_old;
        """)
        err = self.assertFailedAndRolledBack("--yes")
        self.assertRefusedForRowLoss(err, "payment", 2, 1)

    def test_a_table_renamed_away_keeps_its_rows_under_its_new_name(self) -> None:
        self.add(4, "ALTER TABLE payment RENAME TO payments;")
        code, _, err = self.migrate("dev")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.count("payments"), 2)

    def test_a_table_that_vanishes_without_a_confirmed_drop_table_is_refused(self) -> None:
        self.add(4, "def up(conn):\n    conn.execute('DROP TABLE payment')\n", suffix="py")
        err = self.assertFailedAndRolledBack("--yes")
        self.assertIn("table payment had 2 rows before the run and no longer exists", err)
        self.assertIn("--allow-row-loss payment", err)

    def test_a_destructive_python_migration_covers_what_it_removes(self) -> None:
        self.add(4, DELETING_PYTHON, suffix="py")
        code, _, err = self.migrate("dev", "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.count("payment"), 1)

    def test_a_destructive_python_migration_does_not_cover_a_later_rebuild(self) -> None:
        self.add(4, DELETING_PYTHON, suffix="py")
        self.add(5, USERS_REBUILD)
        err = self.assertFailedAndRolledBack("--yes")
        self.assertRefusedForRowLoss(err, "user", 3, 2)

    def test_a_python_migration_not_marked_destructive_cannot_remove_rows(self) -> None:
        self.add(4, "def up(conn):\n    conn.execute('DELETE FROM payment WHERE id = 1')\n", suffix="py")
        err = self.assertFailedAndRolledBack("--yes")
        self.assertRefusedForRowLoss(err, "payment", 2, 1)

    def test_allow_row_loss_is_repeatable_and_case_insensitive(self) -> None:
        self.add(4, "UPDATE OR REPLACE payment SET id = 1 WHERE id = 2;\n" + USERS_REBUILD)
        err = self.assertFailedAndRolledBack("--yes", "--allow-row-loss", "USER")
        self.assertRefusedForRowLoss(err, "payment", 2, 1)
        code, _, err = self.migrate("dev", "--yes", "--allow-row-loss", "USER",
                                    "--allow-row-loss", "payment")
        self.assertEqual(code, 0, err)
        self.assertEqual((self.count("user"), self.count("payment")), (2, 1))


class RollbackGuardTests(GuardTestCase):
    """rollback follows the same rule for its down parts."""

    def setUp(self) -> None:
        super().setUp()
        self.add(4, """-- migrate:up
ALTER TABLE payment ADD COLUMN memo TEXT;
-- migrate:down
CREATE TABLE payment_new (id INTEGER PRIMARY KEY,
                          loan_id INTEGER NOT NULL REFERENCES loan (id) ON DELETE CASCADE,
                          amount NUMERIC NOT NULL);
INSERT INTO payment_new SELECT id, loan_id, amount FROM payment WHERE memo IS NULL;
DROP TABLE payment;
ALTER TABLE payment_new RENAME TO payment;
""")
        code, _, err = self.migrate("dev")
        self.assertEqual(code, 0, err)
        self.execute("UPDATE payment SET memo = 'late' WHERE id = 2")

    def test_a_down_part_that_leaves_rows_behind_is_refused_with_yes(self) -> None:
        before = dump(self.path)
        code, out, err = self.run_cli(database_migration, "rollback", "dev", "--to", "3", "--yes")
        self.assertEqual(code, 1, out + err)
        self.assertRefusedForRowLoss(err, "payment", 2, 1)
        self.assertEqual(dump(self.path), before)

    def test_rollback_takes_allow_row_loss(self) -> None:
        code, out, err = self.run_cli(database_migration, "rollback", "dev", "--to", "3", "--yes",
                                      "--allow-row-loss", "payment")
        self.assertEqual(code, 0, out + err)
        self.assertEqual(query(self.path, "SELECT id FROM payment"), [(1,)])
        self.assertEqual(self.versions(), [1, 2, 3])


class AlwaysTrueWhereTests(ApplyTestCase):
    def test_an_update_whose_where_is_always_true_is_destructive(self) -> None:
        for condition in ("1", "1=1", "TRUE", "'a' = 'a'", "1 -- every row", "NOT 0", "2 > 1",
                          "1 OR 0", "(1)", "EXISTS (SELECT 1)"):
            with self.subTest(condition=condition):
                self.assertEqual(destructive_kind(f"UPDATE loan SET amount = 0 WHERE {condition}"),
                                 "UPDATE whose WHERE is always true")

    def test_a_real_or_false_condition_is_not(self) -> None:
        for condition in ("id = 1", "0", "'a' = 'b'", "amount > 1 OR 1", "NULL",
                          "id IN (SELECT loan_id FROM payment)", "load_extension('x')",
                          "id = 1 RETURNING id"):
            with self.subTest(condition=condition):
                self.assertEqual(destructive_kind(f"UPDATE loan SET amount = 0 WHERE {condition}"), "")

    def test_a_where_inside_a_sub_select_still_does_not_count(self) -> None:
        self.assertEqual(destructive_kind("UPDATE loan SET amount = (SELECT 1 WHERE 1)"),
                         "UPDATE without WHERE")
        self.assertEqual(destructive_kind("UPDATE loan SET amount = 0 WHERE 1 LIMIT 5"),
                         "UPDATE whose WHERE is always true")

    def test_update_where_1_needs_confirmation_and_without_it_changes_nothing(self) -> None:
        self.add(3, "UPDATE loan SET amount = 0 WHERE 1;")
        self.assertRefusedUnchanged(words=("UPDATE whose WHERE is always true", "--yes"))
        code, _, err = self.migrate("dev", "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual(query(self.path, "SELECT amount FROM loan"), [(0,), (0,)])


if __name__ == "__main__":
    unittest.main()
