"""Issue 12, fleet status: the faster paths give exactly the answers of the slower ones.

Real files in a temporary folder. status reads a database once per instance; what it
shows must not depend on which path found it: the drift check's exact-text shortcut,
another runner's tables looked for only when ours holds no row, and all of an
instance's reads in one read transaction.
"""

from __future__ import annotations

import json
import sqlite3
import unittest
from contextlib import closing
from pathlib import Path

from tests.support import ProjectTestCase, damage_a_page, database_migration

FLEET_INI = """[DEFAULT]
keep_backups = 30
busy_timeout = 2

[tenants]
path = tenants/*.db
"""

# One change by hand per tenant, and the state status must show for it.
BY_HAND = {
    "column": ("ALTER TABLE user ADD COLUMN nickname TEXT", "drift"),
    "index": ("CREATE INDEX ix_loan_amount ON loan (amount)", "drift"),
    "view": ("CREATE VIEW big_loans AS SELECT id FROM loan WHERE amount > 100", "drift"),
    "trigger": ("CREATE TRIGGER no_zero BEFORE INSERT ON payment WHEN NEW.amount = 0 "
                "BEGIN SELECT RAISE(ABORT, 'zero'); END", "drift"),
    "table": ("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)", "drift"),
    "dropped_index": ("DROP INDEX ix_payment_loan", "drift"),
    "index_other_column": ("DROP INDEX ix_payment_loan; "
                           "CREATE INDEX ix_payment_loan ON payment (amount)", "drift"),
    # The same objects written another way: not drift, as before the shortcut.
    "index_white_space": ("DROP INDEX ix_payment_loan; "
                          "CREATE INDEX ix_payment_loan\n     ON   payment (loan_id)", "up to date"),
    "table_type_case": ("DROP TABLE payment; CREATE TABLE payment (id integer PRIMARY KEY, "
                        "loan_id INTEGER NOT NULL REFERENCES loan (id) ON DELETE CASCADE, "
                        "amount numeric NOT NULL); "
                        "CREATE INDEX ix_payment_loan ON payment (loan_id)", "up to date"),
    "column_name_case": ("DROP TABLE payment; CREATE TABLE payment (ID INTEGER PRIMARY KEY, "
                         "loan_id INTEGER NOT NULL REFERENCES loan (id) ON DELETE CASCADE, "
                         "amount NUMERIC NOT NULL); "
                         "CREATE INDEX ix_payment_loan ON payment (loan_id)", "drift"),
    "column_type": ("DROP TABLE payment; CREATE TABLE payment (id INTEGER PRIMARY KEY, "
                    "loan_id INTEGER NOT NULL REFERENCES loan (id) ON DELETE CASCADE, "
                    "amount REAL NOT NULL); "
                    "CREATE INDEX ix_payment_loan ON payment (loan_id)", "drift"),
}
INDEX_MIGRATION = ("0003_index_payment_loan.sql",
                   "-- migrate:up\nCREATE INDEX ix_payment_loan ON payment (loan_id);\n"
                   "-- migrate:down\nDROP INDEX ix_payment_loan;\n")


def old_schema_drift(conn, migrations, applied, records):
    """schema_drift as it was before the exact-text shortcut: normalised text first, then
    the shapes of what differs. The reference the shortcut must agree with."""
    dm = database_migration
    known = {m.version for m in migrations}
    versions = tuple(sorted(a.version for a in applied))
    if not versions or not set(versions) <= known:
        return (), ""
    expected = dm.expected_schemas(migrations, versions, records)
    if expected is None:
        return (), dm.unchecked_reason(migrations, versions, records)
    shape, sql = expected[0], expected[1]
    actual_sql = {f"{kind} {name}": " ".join((text or "").split())
                  for kind, name, text in conn.execute(dm.MASTER_ROWS)}
    changed = {key for key in set(sql) | set(actual_sql) if sql.get(key) != actual_sql.get(key)}
    if not changed:
        return (), ""
    return dm.compare_schemas({k: v for k, v in shape.items() if k in changed},
                              dm.schema_of(conn, only=changed)), ""


class FleetCase(ProjectTestCase):
    """A [tenants] fleet whose members are made one by one."""

    ini = FLEET_INI

    def setUp(self) -> None:
        super().setUp()
        self.write_migration(*INDEX_MIGRATION)
        (self.root / "tenants").mkdir()

    def tenant(self, name: str) -> Path:
        return self.root / "tenants" / f"{name}.db"

    def made(self, name: str, *argv: str) -> Path:
        """A tenant built by migrate --create (the fleet's other files are left alone)."""
        code, _, err = self.migrate(f"tenants/{name}", "--create", *argv)
        self.assertEqual(code, 0, err)
        return self.tenant(name)

    def by_hand(self, path: Path, script: str) -> None:
        with closing(sqlite3.connect(path)) as conn:
            conn.executescript(script)

    def status(self, *argv: str) -> tuple[int, dict]:
        code, out, err = self.run_cli(database_migration, "--json", "status", *argv)
        self.assertNotIn("Traceback", err)
        return code, {row["name"].split("/", 1)[1]: row for row in json.loads(out)["instances"]}


class FleetStatusStatesTests(FleetCase):
    """Every state of the contract, each on its own tenant of one fleet."""

    def test_each_change_by_hand_shows_the_state_it_showed_before(self) -> None:
        for name, (script, _) in BY_HAND.items():
            self.by_hand(self.made(name), script)
        self.made("untouched")
        code, rows = self.status()
        self.assertEqual(code, 0)
        expected = {name: state for name, (_, state) in BY_HAND.items()}
        self.assertEqual({name: row["state"] for name, row in rows.items()},
                         {**expected, "untouched": "up to date"})

    def test_the_shortcut_agrees_with_the_comparison_it_skips(self) -> None:
        """Line for line, what drift says of each tenant is what the code before said."""
        for name, (script, _) in BY_HAND.items():
            self.by_hand(self.made(name), script)
        self.made("untouched")
        dm = database_migration
        for name in [*BY_HAND, "untouched"]:
            with self.subTest(name):
                instance = self.instance(f"tenants/{name}")
                migrations = dm.all_migrations(instance)
                with closing(sqlite3.connect(self.tenant(name))) as conn:
                    applied = dm.read_applied(conn)
                    now = dm.schema_drift(conn, migrations, applied, {})
                    before = old_schema_drift(conn, migrations, applied, {})
                self.assertEqual(now, before)
                self.assertEqual(bool(now[0]), BY_HAND.get(name, ("", ""))[1] == "drift")

    def test_error_ahead_modified_untracked_pending_and_up_to_date(self) -> None:
        damage_a_page(self.made("damaged"))
        self.made("pending", "--to", "1")
        self.made("ahead")
        with closing(sqlite3.connect(self.tenant("ahead"))) as conn:
            conn.execute("INSERT INTO schema_migrations (version, description) VALUES (9, 'x')")
            conn.commit()
        self.made("modified")
        with closing(sqlite3.connect(self.tenant("untracked"))) as conn:
            conn.execute("CREATE TABLE things (id INTEGER PRIMARY KEY)")
        with closing(sqlite3.connect(self.tenant("dbmate"))) as conn:
            conn.executescript("CREATE TABLE schema_migrations (version VARCHAR(128) PRIMARY KEY);"
                               "INSERT INTO schema_migrations VALUES ('1');"
                               "CREATE TABLE user (id INTEGER PRIMARY KEY);")
        code, rows = self.status()
        self.assertEqual(code, 1)          # the damaged one
        self.assertEqual({name: row["state"] for name, row in rows.items()},
                         {"damaged": "error", "pending": "pending", "ahead": "ahead",
                          "modified": "up to date", "untracked": "untracked",
                          "dbmate": "untracked"})
        self.assertIn("damaged", rows["damaged"]["error"])
        self.assertEqual(rows["dbmate"]["runner"], "dbmate")     # looked for: ours holds no row
        self.assertNotIn("runner", rows["untracked"])
        self.assertEqual(rows["pending"]["pending"], [2, 3])
        # Migration 3 edited after it was applied.
        self.write_migration(INDEX_MIGRATION[0], INDEX_MIGRATION[1].replace(
            "(loan_id)", "(loan_id, amount)"))
        _, rows = self.status()
        self.assertEqual({name: row["state"] for name, row in rows.items()},
                         {"damaged": "error", "pending": "pending", "ahead": "ahead",
                          "modified": "modified", "untracked": "untracked",
                          "dbmate": "untracked"})

    def test_a_missing_member_of_a_named_instance_is_missing(self) -> None:
        self.config.write_text(FLEET_INI + "\n[solo]\npath = instance/solo.db\n", encoding="utf-8")
        self.made("fine")
        code, out, _ = self.run_cli(database_migration, "--json", "status")
        rows = {row["name"]: row["state"] for row in json.loads(out)["instances"]}
        self.assertEqual(code, 0)
        self.assertEqual(rows, {"tenants/fine": "up to date", "solo": "missing"})


class OneSnapshotTests(FleetCase):
    """status reads each database in one read transaction: one snapshot, no write lock."""

    def test_a_writers_open_transaction_neither_blocks_status_nor_shows_in_it(self) -> None:
        path = self.made("busy")
        writer = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(writer.close)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("CREATE TABLE half_done (id INTEGER PRIMARY KEY)")
        code, rows = self.status()
        self.assertEqual((code, rows["busy"]["state"]), (0, "up to date"))
        writer.execute("COMMIT")
        self.assertEqual(self.status()[1]["busy"]["state"], "drift")

    def test_a_wal_database_nobody_has_open_is_read_and_left_without_wal_files(self) -> None:
        path = self.made("wal")
        with closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA journal_mode = WAL")
        code, rows = self.status()
        self.assertEqual((code, rows["wal"]["state"]), (0, "up to date"))
        self.assertFalse([p.name for p in path.parent.iterdir() if p.name != "wal.db"])


if __name__ == "__main__":
    unittest.main()
