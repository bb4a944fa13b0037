"""The foreign key check before COMMIT covers every table the run can have broken.

Foreign keys are off during a run, so a run can leave a reference dangling only in a
table it wrote, created, altered or dropped, or in a table whose foreign keys refer to
one of those. Those tables are checked (PRAGMA foreign_key_check(T)); a broken
reference elsewhere was there before the run, is not the run's doing, and no longer
blocks it (`safe_db_update.py check` still lists it). Each test makes the break for
real: through the run's own statements, a trigger it fires, a rename, a Python
migration, a dry run.
"""

from __future__ import annotations

import sqlite3
import sys
from contextlib import closing

from tests.support import database_migration, query, safe_db_update
from tests.test_apply import ApplyTestCase


class ForeignKeyScopeTests(ApplyTestCase):
    def plant_orphan_payment(self) -> None:
        """A payment that refers to a loan that does not exist, as the app left it."""
        with closing(sqlite3.connect(self.path)) as conn:
            conn.execute("PRAGMA foreign_keys = OFF")
            conn.execute("INSERT INTO payment (id, loan_id, amount) VALUES (9, 99, 1)")
            conn.commit()

    def test_a_broken_reference_in_a_table_the_run_does_not_touch_does_not_block_it(self) -> None:
        self.plant_orphan_payment()
        self.add(3, "CREATE TABLE audit (id INTEGER PRIMARY KEY, note TEXT);")
        code, out, err = self.migrate("dev")
        self.assertEqual(code, 0, out + err)
        self.assertEqual(self.versions(), [1, 2, 3])
        self.assertEqual(query(self.path, "PRAGMA foreign_key_check"), [("payment", 9, "loan", 0)])
        code, out, _ = self.run_cli(safe_db_update, "check", "dev")
        self.assertEqual(code, 1)
        self.assertIn("payment", out)

    def test_a_broken_reference_the_dry_run_did_not_make_does_not_fail_it(self) -> None:
        self.plant_orphan_payment()
        self.add(3, "CREATE TABLE audit (id INTEGER PRIMARY KEY, note TEXT);")
        code, out, err = self.migrate("dev", "--dry-run")
        self.assertEqual(code, 0, out + err)

    def test_a_broken_reference_in_a_table_the_run_writes_is_still_refused(self) -> None:
        self.plant_orphan_payment()
        self.add(3, "INSERT INTO payment (id, loan_id, amount) VALUES (10, 1, 5);")
        err = self.assertFailedAndRolledBack(words=("foreign key check failed", "payment row 9"))
        self.assertIn("migration 0003 step 3", err)

    def test_rows_of_a_table_the_run_creates_that_refer_to_nothing_are_refused(self) -> None:
        self.add(3, """
            CREATE TABLE note (id INTEGER PRIMARY KEY, loan_id INTEGER REFERENCES loan (id));
            INSERT INTO note (id, loan_id) VALUES (1, 1), (2, 99);
        """)
        self.assertFailedAndRolledBack(words=("foreign key check failed: note row 2", "loan"))

    def test_deleting_parent_rows_is_refused_in_the_child_the_run_never_names(self) -> None:
        self.add(3, "DELETE FROM user WHERE id = 1;")
        self.assertFailedAndRolledBack("--yes", words=("foreign key check failed: loan row 1",
                                                       "missing row in user"))

    def test_parent_rows_deleted_by_a_trigger_the_run_fires_are_seen(self) -> None:
        self.add(3, """
            CREATE TABLE departure (user_id INTEGER);
            CREATE TRIGGER departure_removes_user AFTER INSERT ON departure
            BEGIN DELETE FROM user WHERE id = new.user_id; END;
            INSERT INTO departure (user_id) VALUES (1);
        """)
        self.assertFailedAndRolledBack("--allow-row-loss", "user",
                                       words=("foreign key check failed: loan row 1",
                                              "missing row in user"))

    def test_a_trigger_on_a_view_that_rewrites_a_child_is_seen(self) -> None:
        self.add(3, """
            CREATE VIEW loan_owner AS SELECT id, user_id FROM loan;
            CREATE TRIGGER loan_owner_moves INSTEAD OF UPDATE ON loan_owner
            BEGIN UPDATE loan SET user_id = new.user_id WHERE id = old.id; END;
            UPDATE loan_owner SET user_id = 77 WHERE id = 2;
        """)
        self.assertFailedAndRolledBack(words=("foreign key check failed: loan row 2",))

    def test_a_parent_renamed_away_under_legacy_alter_table_is_refused(self) -> None:
        self.add(3, """
            PRAGMA legacy_alter_table = ON;
            ALTER TABLE user RENAME TO person;
        """)
        self.assertFailedAndRolledBack(words=("foreign key check failed: loan row 1",
                                              "missing row in user"))

    def test_a_python_migration_that_deletes_parent_rows_is_refused(self) -> None:
        self.add(3, "DESTRUCTIVE = True\n\n\ndef up(conn):\n"
                    "    conn.execute('DELETE FROM user WHERE id = 2')\n", suffix="py")
        self.assertFailedAndRolledBack("--yes", words=("foreign key check failed: loan row 2",))

    def test_a_rebuilt_parent_that_loses_a_key_is_refused(self) -> None:
        self.add(3, """
            CREATE TABLE new_user (id INTEGER PRIMARY KEY, email VARCHAR(120) NOT NULL UNIQUE,
                                   name VARCHAR(100) NOT NULL, password_hash VARCHAR(128),
                                   created_at DATETIME, reset_token TEXT,
                                   reset_token_expires DATETIME);
            INSERT INTO new_user (id, email, name) SELECT id + 10, email, name FROM user;
            DROP TABLE user;
            ALTER TABLE new_user RENAME TO user;
        """)
        self.assertFailedAndRolledBack("--yes", words=("foreign key check failed: loan row 1",))

    def test_the_rollback_checks_the_tables_its_down_parts_touch(self) -> None:
        self.add(3, "-- migrate:up\nCREATE TABLE audit (id INTEGER PRIMARY KEY);\n"
                    "-- migrate:down\nDELETE FROM user WHERE id = 1;\nDROP TABLE audit;\n")
        self.assertEqual(self.migrate("dev")[0], 0)
        before = query(self.path, "SELECT COUNT(*) FROM user")
        code, out, err = self.run_cli(database_migration, "rollback", "dev", "--to", "2", "--yes")
        self.assertEqual(code, 1, out + err)
        self.assertIn("foreign key check failed: loan row 1", err)
        self.assertEqual(query(self.path, "SELECT COUNT(*) FROM user"), before)
        self.assertEqual(self.versions(), [1, 2, 3])


# set_authorizer(None) removes the authorizer from Python 3.11 on; before, SQLite then
# calls None, which denies every statement: rolled back either way.
REMOVED = ("removed or replaced the tool's authorizer" if sys.version_info >= (3, 11)
           else "not authorized")


class GuardRemovedTests(ApplyTestCase):
    """What the check covers is what the authorizer saw: a migration that reaches the
    raw connection and takes the authorizer away leaves nothing that can be checked."""

    def test_a_python_migration_that_removes_the_authorizer_is_rolled_back(self) -> None:
        self.add(3, "DESTRUCTIVE = True\n\n\ndef up(conn):\n"
                    "    conn._conn.set_authorizer(None)\n"
                    "    conn.execute('DELETE FROM user WHERE id = 2')\n", suffix="py")
        err = self.assertFailedAndRolledBack("--yes", words=(REMOVED,))
        self.assertIn("dev: ", err)

    def test_one_that_puts_its_own_in_place_is_rolled_back_too(self) -> None:
        self.add(3, "DESTRUCTIVE = True\n\n\ndef up(conn):\n"
                    "    conn._conn.set_authorizer(lambda *request: 0)\n"
                    "    conn.execute('DELETE FROM user WHERE id = 2')\n", suffix="py")
        self.assertFailedAndRolledBack("--yes", words=("removed or replaced the tool's authorizer",))

    def test_the_dry_run_says_the_same(self) -> None:
        self.add(3, "DESTRUCTIVE = True\n\n\ndef up(conn):\n"
                    "    conn._conn.set_authorizer(None)\n", suffix="py")
        code, out, err = self.migrate("dev", "--dry-run", "--yes")
        self.assertEqual(code, 1, out + err)
        self.assertIn(REMOVED, out + err)
