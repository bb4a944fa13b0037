"""Coming from another tool: dbmate, golang-migrate, sqlx and Diesel folders read as they
are, and databases those runners (and Rails) built taken over with 'adopt'.

The tracking tables below are made and filled as each runner does it, looked up in
the runners' own sources (the statements are written out here, not copied):

- dbmate, pkg/driver/sqlite/sqlite.go (amacneil/dbmate): CreateMigrationsTable runs
  `create table if not exists "schema_migrations" (version varchar(128) primary key)`;
  InsertMigration `insert into "schema_migrations" (version) values (?)` with the file's
  leading digits as a string (pkg/dbmate: migrationFileRegexp `^(\\d+).*\\.sql$`).
- golang-migrate, database/sqlite3/sqlite3.go (golang-migrate/migrate): ensureVersionTable
  runs `CREATE TABLE IF NOT EXISTS schema_migrations (version uint64,dirty bool)` and
  `CREATE UNIQUE INDEX IF NOT EXISTS version_unique ON schema_migrations (version)`;
  SetVersion deletes every row and inserts the one (version, dirty) in a transaction;
  it marks dirty before running a migration and clears it after.
- sqlx, sqlx-sqlite/src/migrate.rs (launchbadge/sqlx): ensure_migrations_table creates
  `_sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, installed_on
  TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL, checksum BLOB NOT
  NULL, execution_time BIGINT NOT NULL)`; apply inserts (version, description, TRUE,
  checksum, -1) with the script, then sets execution_time in nanoseconds; dirty_version
  looks for `success = false`. The checksum is SHA-384 of the file's text, the
  description the name with '_' as spaces (sqlx-core/src/migrate/source.rs).
- Diesel, diesel_migrations/src/migration/setup_migration_table.sql (diesel-rs/diesel):
  `__diesel_schema_migrations (version VARCHAR(50) PRIMARY KEY NOT NULL, run_on TIMESTAMP
  NOT NULL DEFAULT CURRENT_TIMESTAMP)`; migration_harness.rs inserts only the version,
  which migrations_internals' version_from_string takes from the folder name before the
  first '_' with the dashes removed.
- Rails, activerecord/lib/active_record/schema_migration.rb (rails/rails): create_table
  with `t.string :version` as primary key, in SQLite `CREATE TABLE "schema_migrations"
  ("version" varchar NOT NULL PRIMARY KEY)`, beside `ar_internal_metadata`; Rails 4 had
  `("version" varchar NOT NULL)` with a unique index `unique_schema_migrations`.
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import sqlite3
import subprocess
import sys
import unittest
from contextlib import closing
from pathlib import Path

from tests.support import ROOT, ProjectTestCase, database_migration, dump, query, sha256

# A small history with the kinds of change a real one has: tables, an added column, an
# index, a table rebuild, a trigger (with ';' inside a string), a comment-only migration.
HISTORY = (
    ("create tables",
     "CREATE TABLE user (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE);\n"
     "CREATE TABLE loan (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES user (id),\n"
     "                   amount NUMERIC NOT NULL);\n",
     "DROP TABLE loan;\nDROP TABLE user;\n"),
    ("add phone", "ALTER TABLE user ADD COLUMN phone TEXT;\n",
     "ALTER TABLE user DROP COLUMN phone;\n"),
    ("index loans", "CREATE INDEX ix_loan_user ON loan (user_id);\n", "DROP INDEX ix_loan_user;\n"),
    ("rebuild loan",
     "CREATE TABLE loan_new (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES user (id),\n"
     "                       amount NUMERIC NOT NULL CHECK (amount > 0),\n"
     "                       status TEXT NOT NULL DEFAULT 'open');\n"
     "INSERT INTO loan_new (id, user_id, amount) SELECT id, user_id, amount FROM loan;\n"
     "DROP TABLE loan;\nALTER TABLE loan_new RENAME TO loan;\n"
     "CREATE INDEX ix_loan_user ON loan (user_id);\n",
     "CREATE TABLE loan_old (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES user (id),\n"
     "                       amount NUMERIC NOT NULL);\n"
     "INSERT INTO loan_old (id, user_id, amount) SELECT id, user_id, amount FROM loan;\n"
     "DROP TABLE loan;\nALTER TABLE loan_old RENAME TO loan;\n"
     "CREATE INDEX ix_loan_user ON loan (user_id);\n"),
    ("guard amounts",
     "CREATE TRIGGER loan_positive BEFORE UPDATE OF amount ON loan WHEN NEW.amount <= 0\n"
     "BEGIN\n    SELECT RAISE(ABORT, 'amount must be positive; nothing changed');\nEND;\n",
     "DROP TRIGGER loan_positive;\n"),
    ("keep history", "-- Production had a hot fix here; nothing to change any more.\n",
     "-- Nothing to undo.\n"),
)
NOTE_UP, NOTE_DOWN = "ALTER TABLE loan ADD COLUMN note TEXT;", "ALTER TABLE loan DROP COLUMN note;"
TOOL_TABLES = ("schema_migrations", "__diesel_schema_migrations", "_sqlx_migrations",
               "ar_internal_metadata")


def app_schema(path: Path) -> list[tuple]:
    """sqlite_master without any tracking table, white space normalised."""
    rows = query(path, "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")
    return [(kind, name, " ".join((sql or "").split())) for kind, name, table, sql in rows
            if table not in TOOL_TABLES]


def slug(name: str, sep: str = "_") -> str:
    return name.replace(" ", sep)


class Runner:
    """One runner: how it lays out a folder and how it fills its tracking table."""

    name = ""
    versions = [20240105093001 + n for n in range(len(HISTORY))]

    def write_folder(self, folder: Path) -> None:
        raise NotImplementedError

    def recorded(self, version: int) -> str:
        return str(version)

    def create_table(self, conn: sqlite3.Connection) -> None:
        raise NotImplementedError

    def record(self, conn: sqlite3.Connection, version: int, description: str, up: str) -> None:
        raise NotImplementedError

    def build(self, path: Path, upto: int | None = None, track: bool = True) -> None:
        """Run the up parts one by one with plain sqlite3, recording each as the runner does."""
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            if track:
                self.create_table(conn)
            for version, (description, up, _) in list(zip(self.versions, HISTORY))[:upto]:
                conn.executescript(up)
                if track:
                    self.record(conn, version, description, up)


class Dbmate(Runner):
    name = "dbmate"

    def write_folder(self, folder: Path) -> None:
        for n, (version, (description, up, down)) in enumerate(zip(self.versions, HISTORY)):
            name = f"{version}_{slug(description)}.sql" if n % 2 else f"{version}-{slug(description, '-')}.sql"
            (folder / name).write_text(f"-- migrate:up\n{up}\n-- migrate:down\n{down}", encoding="utf-8")

    def create_table(self, conn: sqlite3.Connection) -> None:
        conn.execute('create table if not exists "schema_migrations" (version varchar(128) primary key)')

    def record(self, conn, version, description, up) -> None:
        conn.execute('insert into "schema_migrations" (version) values (?)', (str(version),))


class Rails(Dbmate):
    """Rails' table shape; its history (Ruby) is translated into SQL files by the team."""
    name = "Rails"

    def create_table(self, conn: sqlite3.Connection) -> None:
        conn.execute('CREATE TABLE "schema_migrations" ("version" varchar NOT NULL PRIMARY KEY)')
        conn.execute('CREATE TABLE "ar_internal_metadata" ("key" varchar NOT NULL PRIMARY KEY, '
                     '"value" varchar, "created_at" datetime(6) NOT NULL, '
                     '"updated_at" datetime(6) NOT NULL)')
        conn.execute('INSERT INTO "ar_internal_metadata" ("key", "value", "created_at", "updated_at") '
                     "VALUES ('environment', 'production', '2024-01-05 09:30:00', '2024-01-05 09:30:00')")

    def record(self, conn, version, description, up) -> None:
        conn.execute('INSERT INTO "schema_migrations" ("version") VALUES (?)', (str(version),))


class GolangMigrate(Runner):
    name = "golang-migrate"
    versions = list(range(1, len(HISTORY) + 1))

    def write_folder(self, folder: Path) -> None:
        for version, (description, up, down) in zip(self.versions, HISTORY):
            (folder / f"{version:06d}_{slug(description)}.up.sql").write_text(up, encoding="utf-8")
            (folder / f"{version:06d}_{slug(description)}.down.sql").write_text(down, encoding="utf-8")

    def create_table(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version uint64,dirty bool)")
        conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS version_unique ON schema_migrations (version)")

    def set_version(self, conn: sqlite3.Connection, version: int, dirty: bool) -> None:
        conn.execute("BEGIN")
        conn.execute("DELETE FROM schema_migrations")
        conn.execute("INSERT INTO schema_migrations (version, dirty) VALUES (?, ?)", (version, dirty))
        conn.execute("COMMIT")

    def build(self, path: Path, upto: int | None = None, track: bool = True) -> None:
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            if track:
                self.create_table(conn)
            for version, (_, up, _) in list(zip(self.versions, HISTORY))[:upto]:
                if track:
                    self.set_version(conn, version, True)       # dirty while it runs
                conn.executescript(up)
                if track:
                    self.set_version(conn, version, False)


class Sqlx(Runner):
    name = "sqlx"

    def write_folder(self, folder: Path) -> None:
        for version, (description, up, down) in zip(self.versions, HISTORY):
            (folder / f"{version}_{slug(description)}.up.sql").write_text(up, encoding="utf-8")
            (folder / f"{version}_{slug(description)}.down.sql").write_text(down, encoding="utf-8")

    def create_table(self, conn: sqlite3.Connection) -> None:
        conn.execute("""
            CREATE TABLE IF NOT EXISTS _sqlx_migrations (
                version BIGINT PRIMARY KEY,
                description TEXT NOT NULL,
                installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
                success BOOLEAN NOT NULL,
                checksum BLOB NOT NULL,
                execution_time BIGINT NOT NULL
            )""")

    def record(self, conn, version, description, up) -> None:
        conn.execute("INSERT INTO _sqlx_migrations (version, description, success, checksum, "
                     "execution_time) VALUES (?1, ?2, TRUE, ?3, -1)",
                     (version, description, hashlib.sha384(up.encode()).digest()))
        conn.execute("UPDATE _sqlx_migrations SET execution_time = ?1 WHERE version = ?2",
                     (1_234_567, version))


class Diesel(Runner):
    name = "Diesel"

    @staticmethod
    def dashed(version: int) -> str:
        text = str(version)
        return f"{text[:4]}-{text[4:6]}-{text[6:8]}-{text[8:]}"

    def write_folder(self, folder: Path) -> None:
        for version, (description, up, down) in zip(self.versions, HISTORY):
            migration = folder / f"{self.dashed(version)}_{slug(description)}"
            migration.mkdir()
            (migration / "up.sql").write_text(up, encoding="utf-8")
            (migration / "down.sql").write_text(down, encoding="utf-8")
        (folder / ".keep").write_text("", encoding="utf-8")

    def create_table(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS __diesel_schema_migrations (\n"
                     "       version VARCHAR(50) PRIMARY KEY NOT NULL,\n"
                     "       run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP\n)")

    def record(self, conn, version, description, up) -> None:
        conn.execute("INSERT INTO __diesel_schema_migrations (version) VALUES (?)",
                     (self.dashed(version).replace("-", ""),))


class RunnerTestCase(ProjectTestCase):
    """A project whose migrations folder is in one runner's layout."""

    migrations: dict = {}
    runner: Runner = Dbmate()

    def setUp(self) -> None:
        super().setUp()
        self.runner.write_folder(self.migrations_dir)
        self.versions = self.runner.versions

    def cli(self, *argv: str) -> tuple[int, str, str]:
        return self.run_cli(database_migration, *argv)

    def cli_json(self, *argv: str) -> tuple[int, dict, str]:
        code, out, err = self.cli("--json", *argv)
        self.assertNoTraceback(err)
        return code, json.loads(out) if out.strip() else {}, err

    def tracked(self, name: str = "dev") -> list[tuple]:
        return query(self.db(name), "SELECT version, description, checksum FROM schema_migrations "
                                    "ORDER BY version")

    def loaded(self) -> dict[int, database_migration.Migration]:
        database_migration._loaded.clear()
        return {m.version: m for m in database_migration.all_migrations(self.instance())}

    def assertRefusedUnchanged(self, argv: tuple, *words: str, code: int = 1) -> str:
        before = sha256(self.db())
        actual, out, err = self.cli(*argv)
        self.assertEqual(actual, code, out + err)
        self.assertNoTraceback(err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        for word in words:
            self.assertIn(word, err)
        self.assertEqual(sha256(self.db()), before)
        return err


class RunnerCases:
    """The same tests for every runner (a mixin, so that the base class is not run itself)."""

    def test_its_folder_is_read_as_it_is_with_descriptions_and_checksums(self) -> None:
        loaded = self.loaded()
        self.assertEqual(sorted(loaded), self.versions)
        for version, (description, up, down) in zip(self.versions, HISTORY):
            migration = loaded[version]
            self.assertEqual(migration.description, description)
            expected = database_migration.split_statements(up)
            self.assertEqual(migration.up, tuple(expected))
            text = "\n".join(expected)
            self.assertEqual(migration.checksum, hashlib.sha256(text.encode()).hexdigest())
            self.assertTrue(migration.has_down)
        self.assertEqual(loaded[self.versions[-1]].up, ())        # the comment-only one

    def test_migrate_create_builds_the_schema_the_up_parts_build_one_by_one(self) -> None:
        code, out, err = self.cli("migrate", "dev", "--create", "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual([v for v, _, _ in self.tracked()], self.versions)   # the no-op too
        by_hand = self.root / "by-hand.db"
        self.runner.build(by_hand, track=False)
        self.assertEqual(app_schema(self.db()), app_schema(by_hand))

    def test_a_database_it_built_is_untracked_until_adopted_then_carries_on(self) -> None:
        db = self.db()
        self.runner.build(db)
        with closing(sqlite3.connect(db)) as conn:
            conn.execute("INSERT INTO user (id, email) VALUES (1, 'a@x')")
            conn.execute("INSERT INTO loan (id, user_id, amount) VALUES (1, 1, 100)")
            conn.commit()
        code, data, err = self.cli_json("status", "dev")
        self.assertEqual(code, 0, err)
        self.assertEqual(data["instances"][0]["state"], "untracked")
        self.assertEqual(data["instances"][0]["runner"], self.runner.name)
        code, out, err = self.cli("status", "dev")
        self.assertIn("untracked", out)
        self.assertIn("adopt dev", out)
        self.assertRefusedUnchanged(("migrate", "dev", "--yes"), "adopt dev", self.runner.name)
        foreign_before = self.foreign_rows(db)

        code, data, err = self.cli_json("adopt", "dev")
        self.assertEqual(code, 0, err)
        self.assertEqual(err, "")
        self.assertEqual((data["runner"], data["versions"], data["forced"]),
                         (self.runner.name, self.versions, False))
        self.assertTrue(Path(data["backup"]).is_file())
        self.assertEqual([b.name.endswith("-pre-migrate.db") for b in self.backups()], [True])
        loaded = self.loaded()
        self.assertEqual(self.tracked(), [(v, loaded[v].description, loaded[v].checksum)
                                          for v in self.versions])
        self.assertForeignTable(db, foreign_before)
        self.assertEqual(query(db, "SELECT id, amount FROM loan"), [(1, 100)])
        history = [e for e in json.loads(self.cli("--json", "history", "dev")[1])["entries"]
                   if e["operation"] == "adopt"]
        self.assertEqual([(e["operation"], e["outcome"], e["runner"]) for e in history],
                         [("adopt", "ok", self.runner.name)])

        code, out, err = self.cli("check", "dev")
        self.assertEqual(code, 0, out + err)
        code, data, err = self.cli_json("status", "dev")
        self.assertEqual(data["instances"][0]["state"], "up to date")
        self.assertEqual(self.cli("adopt", "dev")[1].strip(),
                         "dev: already tracked by this tool (schema_migrations); nothing to adopt")

        # A new migration, written by 'new' in the folder's own layout, applied on top.
        code, data, err = self.cli_json("new", "add note")
        self.assertEqual(code, 0, err)
        paths = [Path(p) for p in data["paths"]]
        self.assertEqual(self.cli("status")[0], 2)        # refused until it is filled in
        self.fill(paths)
        self.assertNewLayout(paths, data["version"])
        code, out, err = self.cli("migrate", "dev")
        self.assertEqual(code, 0, err)
        self.assertIn("note", [c for _, c, *_ in query(db, "PRAGMA table_info(loan)")])
        self.assertEqual(self.cli("check", "dev")[0], 0)

        # Rolled back through the down parts: the new one, the comment-only one, the trigger.
        code, out, err = self.cli("rollback", "dev", "--to", str(self.versions[3]), "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual([v for v, _, _ in self.tracked()], self.versions[:4])
        by_hand = self.root / "by-hand.db"
        self.runner.build(by_hand, upto=4, track=False)
        self.assertEqual(app_schema(db), app_schema(by_hand))
        self.assertEqual(query(db, "SELECT id, amount, status FROM loan"), [(1, 100, "open")])

    def test_a_schema_that_differs_is_refused_and_nothing_changes_without_force(self) -> None:
        db = self.db()
        self.runner.build(db)
        with closing(sqlite3.connect(db)) as conn:
            conn.execute("CREATE INDEX ix_by_hand ON user (phone)")
        err = self.assertRefusedUnchanged(("adopt", "dev"), "ix_by_hand", "--force", "nothing recorded")
        self.assertIn("only in the database", err)
        self.assertEqual(self.backups(), [])
        code, data, err = self.cli_json("adopt", "dev", "--force")
        self.assertEqual(code, 0, err)
        self.assertTrue(data["forced"])
        self.assertEqual(data["differences"], ["index ix_by_hand: only in the database"])
        self.assertEqual([v for v, _, _ in self.tracked()], self.versions)

    # --- helpers that depend on where the runner keeps its table ---

    def foreign_rows(self, db: Path) -> list[tuple]:
        table = "schema_migrations" if self.runner.name in ("dbmate", "Rails", "golang-migrate") \
            else {"Diesel": "__diesel_schema_migrations", "sqlx": "_sqlx_migrations"}[self.runner.name]
        return query(db, f"SELECT * FROM {table} ORDER BY version")

    def assertForeignTable(self, db: Path, before: list[tuple]) -> None:
        if self.runner.name in ("Diesel", "sqlx"):          # left exactly as it was
            self.assertEqual(self.foreign_rows(db), before)
        else:                                               # upgraded in place, every version kept
            kept = {int(row[0]) for row in before}
            self.assertLessEqual(kept, {v for v, _, _ in self.tracked()})
            self.assertFalse(query(db, "SELECT name FROM sqlite_master WHERE name = 'version_unique'"))

    def fill(self, paths: list[Path]) -> None:
        for path in paths:
            text = path.read_text(encoding="utf-8")
            if path.name.endswith(".sql") and database_migration.UNFILLED in text:
                body = NOTE_DOWN if "down" in path.name else NOTE_UP
                path.write_text(text.replace(database_migration.UNFILLED, body), encoding="utf-8")
            else:                                           # our own (dbmate's) template
                text = text.replace("-- migrate:up\n", f"-- migrate:up\n{NOTE_UP}\n")
                path.write_text(text.replace("-- migrate:down\n", f"-- migrate:down\n{NOTE_DOWN}\n"),
                                encoding="utf-8")

    def assertNewLayout(self, paths: list[Path], version: int) -> None:
        self.assertGreater(version, max(self.versions))
        self.assertEqual(sorted(self.loaded())[-1], version)


class DbmateTests(RunnerCases, RunnerTestCase):
    runner = Dbmate()

    def assertNewLayout(self, paths, version) -> None:
        super().assertNewLayout(paths, version)
        self.assertEqual([p.name for p in paths], [f"{version}_add_note.sql"])
        self.assertEqual(len(str(version)), 14)


class RailsTests(RunnerCases, RunnerTestCase):
    runner = Rails()

    def test_ar_internal_metadata_is_left_as_it_is_and_ignored_by_drift_and_diff(self) -> None:
        self.runner.build(self.db())
        before = query(self.db(), "SELECT * FROM ar_internal_metadata")
        self.assertEqual(self.cli("adopt", "dev")[0], 0)
        self.assertEqual(query(self.db(), "SELECT * FROM ar_internal_metadata"), before)
        self.assertEqual(self.cli("migrate", "prod", "--create", "--yes")[0], 0)
        code, out, err = self.cli("diff", "dev", "prod")
        self.assertEqual(code, 0, out + err)

    def test_the_rails_4_table_with_a_unique_index_is_adopted_too(self) -> None:
        with closing(sqlite3.connect(self.db(), isolation_level=None)) as conn:
            conn.execute('CREATE TABLE "schema_migrations" ("version" varchar NOT NULL)')
            conn.execute('CREATE UNIQUE INDEX "unique_schema_migrations" ON "schema_migrations" ("version")')
            for version, (_, up, _) in zip(self.versions, HISTORY):
                conn.executescript(up)
                conn.execute('INSERT INTO "schema_migrations" ("version") VALUES (?)', (str(version),))
        code, data, err = self.cli_json("adopt", "dev")
        self.assertEqual(code, 0, err)
        self.assertEqual(data["runner"], "dbmate")        # the same table; Rails 4 had no marker
        self.assertEqual(self.cli("check", "dev")[0], 0)


class GolangMigrateTests(RunnerCases, RunnerTestCase):
    runner = GolangMigrate()

    def assertNewLayout(self, paths, version) -> None:
        super().assertNewLayout(paths, version)
        self.assertEqual([p.name for p in paths], ["000007_add_note.up.sql", "000007_add_note.down.sql"])

    def test_a_dirty_database_is_refused_even_with_force(self) -> None:
        db = self.db()
        self.runner.build(db, upto=3)
        with closing(sqlite3.connect(db, isolation_level=None)) as conn:
            self.runner.set_version(conn, self.versions[3], True)       # stopped half-way
            conn.execute("CREATE TABLE loan_new (id INTEGER PRIMARY KEY)")
        for argv in (("adopt", "dev"), ("adopt", "dev", "--force")):
            with self.subTest(argv=argv):
                self.assertRefusedUnchanged(argv, "half-migrated", "restore", "dirty = 1")
        self.assertEqual(self.backups(), [])
        self.assertEqual(query(db, "SELECT version, dirty FROM schema_migrations"), [(4, 1)])

    def test_its_one_row_stands_for_every_version_up_to_it(self) -> None:
        self.runner.build(self.db(), upto=4)
        self.assertEqual(query(self.db(), "SELECT version, dirty FROM schema_migrations"), [(4, 0)])
        code, data, err = self.cli_json("adopt", "dev")
        self.assertEqual(code, 0, err)
        self.assertEqual(data["versions"], [1, 2, 3, 4])
        code, data, err = self.cli_json("status", "dev")
        self.assertEqual((data["instances"][0]["state"], data["instances"][0]["pending"]),
                         ("pending", [5, 6]))


class SqlxTests(RunnerCases, RunnerTestCase):
    runner = Sqlx()

    def assertNewLayout(self, paths, version) -> None:
        super().assertNewLayout(paths, version)
        self.assertEqual([p.name for p in paths], [f"{version}_add_note.up.sql",
                                                   f"{version}_add_note.down.sql"])

    def test_a_failed_migration_row_is_refused_even_with_force(self) -> None:
        db = self.db()
        self.runner.build(db)
        with closing(sqlite3.connect(db)) as conn:
            conn.execute("UPDATE _sqlx_migrations SET success = FALSE WHERE version = ?",
                         (self.versions[-1],))
            conn.commit()
        for argv in (("adopt", "dev"), ("adopt", "dev", "--force")):
            with self.subTest(argv=argv):
                self.assertRefusedUnchanged(argv, "half-migrated", "restore", "success = 0")
        self.assertEqual(self.backups(), [])

    def test_its_plain_files_are_read_as_this_tools_layout_and_adopted(self) -> None:
        shutil.rmtree(self.migrations_dir)
        self.migrations_dir.mkdir()
        for version, (description, up, _) in zip(self.versions, HISTORY):
            (self.migrations_dir / f"{version}_{slug(description)}.sql").write_text(up, encoding="utf-8")
        self.runner.build(self.db())
        self.assertEqual(self.cli("adopt", "dev")[0], 0)
        code, out, err = self.cli("check", "dev")
        self.assertEqual(code, 0, out + err)

    def test_its_times_are_kept(self) -> None:
        self.runner.build(self.db())
        installed = query(self.db(), "SELECT version, installed_on FROM _sqlx_migrations ORDER BY version")
        self.assertEqual(self.cli("adopt", "dev")[0], 0)
        self.assertEqual(query(self.db(), "SELECT version, applied_at FROM schema_migrations "
                                          "ORDER BY version"), installed)
        self.assertEqual({ms for (ms,) in query(self.db(), "SELECT execution_ms FROM schema_migrations")},
                         {1})


class DieselTests(RunnerCases, RunnerTestCase):
    runner = Diesel()

    def assertNewLayout(self, paths, version) -> None:
        super().assertNewLayout(paths, version)
        folder = f"{Diesel.dashed(version)}_add_note"
        self.assertEqual([(p.parent.name, p.name) for p in paths],
                         [(folder, "up.sql"), (folder, "down.sql")])

    def test_other_subfolders_are_ignored(self) -> None:
        (self.migrations_dir / "notes").mkdir()
        (self.migrations_dir / "notes" / "up.sql").write_text("DROP TABLE user;", encoding="utf-8")
        (self.migrations_dir / "2024-02-01-000000_no_up").mkdir()
        (self.migrations_dir / "README.md").write_text("ours", encoding="utf-8")
        self.assertEqual(sorted(self.loaded()), self.versions)


class LayoutRuleTests(RunnerTestCase):
    """Rules of reading a folder: one layout, one file per version, empty files, new."""

    migrations = {}

    def setUp(self) -> None:
        ProjectTestCase.setUp(self)

    def empty_folder(self) -> None:
        shutil.rmtree(self.migrations_dir)
        self.migrations_dir.mkdir()

    def assertUsageError(self, *words: str) -> None:
        for argv in (("status",), ("migrate", "dev", "--create"), ("adopt", "dev")):
            with self.subTest(argv=argv):
                code, out, err = self.cli(*argv)
                self.assertEqual(code, 2, out + err)
                self.assertNoTraceback(err)
                for word in words:
                    self.assertIn(word, err)
        self.assertFalse(self.db().exists())

    def test_a_folder_mixing_layouts_is_refused_naming_both(self) -> None:
        cases = {
            "plain and paired": (("0001_a.sql", "CREATE TABLE a (x);"), ("0002_b.up.sql", "CREATE TABLE b (x);")),
            "plain and Diesel": (("0001_a.sql", "CREATE TABLE a (x);"), ("2024-01-01-000000_b/up.sql", "")),
            "paired and Diesel": (("0001_a.up.sql", "CREATE TABLE a (x);"), ("2024-01-01-000000_b/up.sql", "")),
        }
        for case, files in cases.items():
            with self.subTest(case=case):
                for name, text in files:
                    path = self.migrations_dir / name
                    path.parent.mkdir(exist_ok=True)
                    path.write_text(text, encoding="utf-8")
                self.assertUsageError("mixes two migration layouts", Path(files[0][0]).parts[0],
                                      Path(files[1][0]).parts[0])
                self.empty_folder()

    def test_two_files_for_one_version_are_refused_naming_both(self) -> None:
        cases = {
            "paired": ("0001_a.up.sql", "01_b.up.sql"),
            "Diesel": ("2024-01-01-000000_a/up.sql", "20240101000000_b/up.sql"),
            "dbmate": ("20240101000000_a.sql", "20240101000000-b.sql"),
        }
        for case, names in cases.items():
            with self.subTest(case=case):
                for name in names:
                    path = self.migrations_dir / name
                    path.parent.mkdir(exist_ok=True)
                    path.write_text("-- migrate:up\nCREATE TABLE t (x);\n", encoding="utf-8")
                self.assertUsageError("defined twice", Path(names[0]).parts[0], Path(names[1]).parts[0])
                self.empty_folder()

    def test_a_down_file_without_its_up_file_is_refused(self) -> None:
        (self.migrations_dir / "0001_a.up.sql").write_text("CREATE TABLE a (x);", encoding="utf-8")
        (self.migrations_dir / "0002_b.down.sql").write_text("DROP TABLE b;", encoding="utf-8")
        self.assertUsageError("0002_b.down.sql", "up file")

    def test_empty_and_comment_only_files_are_no_ops_applied_and_recorded(self) -> None:
        layouts = {
            "paired": {"0001_a.up.sql": "CREATE TABLE a (x);", "0002_empty.up.sql": "",
                       "0002_empty.down.sql": "", "0003_note.up.sql": "-- only a note\n",
                       "0003_note.down.sql": "-- nothing to undo\n"},
            "Diesel": {"2024-01-01-000001_a/up.sql": "CREATE TABLE a (x);",
                       "2024-01-01-000002_empty/up.sql": "", "2024-01-01-000002_empty/down.sql": "",
                       "2024-01-01-000003_note/up.sql": "/* only a note */\n",
                       "2024-01-01-000003_note/down.sql": "/* nothing to undo */\n"},
            "ours": {"0001_a.sql": "CREATE TABLE a (x);", "0002_note.sql": "-- only a note\n",
                     "0003_note.sql": "-- migrate:up\n-- only a note\n-- migrate:down\n-- nothing\n"},
        }
        for layout, files in layouts.items():
            with self.subTest(layout=layout):
                for name, text in files.items():
                    path = self.migrations_dir / name
                    path.parent.mkdir(exist_ok=True)
                    path.write_text(text, encoding="utf-8")
                code, out, err = self.cli("--json", "migrate", "dev", "--create")
                self.assertEqual(code, 0, err)
                self.assertEqual(len(json.loads(out)["applied"]), 3)
                self.assertEqual(len(self.tracked()), 3)
                self.assertEqual(app_schema(self.db())[0][:2], ("table", "a"))
                self.assertEqual(len(app_schema(self.db())), 1)
                versions = [v for v, _, _ in self.tracked()]
                target = versions[1] if layout == "ours" else versions[0]     # 0002 has no down part
                code, out, err = self.cli("rollback", "dev", "--to", str(target))
                self.assertEqual(code, 0, err)          # the no-ops' down parts undo nothing
                self.db().unlink()
                shutil.rmtree(self.root / "backups")    # a new instance next, not a lost one
                self.empty_folder()

    def test_an_empty_file_in_our_layout_is_still_refused(self) -> None:
        (self.migrations_dir / "0001_a.sql").write_text("-- migrate:up\n\n-- migrate:down\n",
                                                        encoding="utf-8")
        self.assertUsageError("0001_a.sql", "up part is empty")

    def test_a_dbmate_dash_name_without_markers_is_refused(self) -> None:
        (self.migrations_dir / "0001-add-a.sql").write_text("CREATE TABLE a (x);", encoding="utf-8")
        self.assertUsageError("0001-add-a.sql", "NNNN_description", "-- migrate:up")

    def test_a_database_without_any_runners_table_points_to_baseline(self) -> None:
        (self.migrations_dir / "0001_a.sql").write_text("CREATE TABLE a (x);", encoding="utf-8")
        with closing(sqlite3.connect(self.db())) as conn:
            conn.execute("CREATE TABLE a (x)")
        self.assertRefusedUnchanged(("adopt", "dev"), "baseline dev --to")


def going_back_sql() -> list[str]:
    """The SQL blocks of the manual's 'Switching from ...' section: dbmate/Rails, golang-migrate."""
    text = (ROOT / "DATABASE_MIGRATION_README.md").read_text(encoding="utf-8")
    section = text.split("## Switching from dbmate", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```sql\n")[1:]]


class GoingBackTests(RunnerTestCase):
    """The manual's way back: the runner's own table again, holding what this tool applied."""

    def check_going_back(self, runner: Runner, block: str) -> None:
        database_migration._loaded.clear()
        runner.build(self.db(), upto=5)
        reference = self.root / "reference.db"
        runner.build(reference)                 # the runner's own table after all six
        self.assertEqual(self.cli("adopt", "dev")[0], 0)
        self.assertEqual(self.cli("migrate", "dev")[0], 0)          # the sixth, by this tool
        with closing(sqlite3.connect(self.db(), isolation_level=None)) as conn:
            conn.executescript(block)
        for sql in ("SELECT name, lower(type), \"notnull\", pk FROM pragma_table_info('schema_migrations')",
                    "SELECT type, name FROM sqlite_master WHERE tbl_name = 'schema_migrations'",
                    "SELECT * FROM schema_migrations ORDER BY version"):
            self.assertEqual(query(self.db(), sql), query(reference, sql))
        self.assertEqual(self.cli("--json", "status", "dev")[1].count('"untracked"'), 1)

    def test_back_to_dbmate(self) -> None:
        self.check_going_back(Dbmate(), going_back_sql()[0])

    def test_back_to_golang_migrate(self) -> None:
        shutil.rmtree(self.migrations_dir)
        self.migrations_dir.mkdir()
        GolangMigrate().write_folder(self.migrations_dir)
        self.check_going_back(GolangMigrate(), going_back_sql()[1])


class AdoptRefusalTests(RunnerTestCase):
    runner = Diesel()

    def test_a_version_the_folder_lacks_is_refused(self) -> None:
        self.runner.build(self.db())
        with closing(sqlite3.connect(self.db())) as conn:
            conn.execute("INSERT INTO __diesel_schema_migrations (version) VALUES ('20991231000000')")
            conn.commit()
        self.assertRefusedUnchanged(("adopt", "dev"), "20991231000000", str(self.migrations_dir))
        self.assertEqual(self.backups(), [])

    def test_baseline_points_a_database_another_runner_built_to_adopt(self) -> None:
        self.runner.build(self.db())
        self.assertRefusedUnchanged(("baseline", "dev", "--to", str(self.versions[-1])),
                                    "adopt dev", "Diesel")
        self.assertRefusedUnchanged(("migrate", "dev", "--dry-run"), "adopt dev")
        self.assertRefusedUnchanged(("rollback", "dev", "--to", "1", "--yes"), "adopt dev")
        code, out, err = self.cli("check", "dev")
        self.assertEqual(code, 1)
        self.assertIn("adopt dev", out)


class AdoptFailureTests(RunnerTestCase):
    """adopt that fails half-way (the disk is full) leaves the database as the runner left it."""

    runner = Dbmate()

    def test_adopt_whose_writes_hit_the_file_size_limit_changes_nothing(self) -> None:
        db = self.db()
        self.runner.build(db)
        with closing(sqlite3.connect(db)) as conn:
            conn.execute("VACUUM")          # no free page left: recording must grow the file
        before = dump(db)
        limit = db.stat().st_size           # the backup fits exactly; the database cannot grow

        def small_files() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        result = subprocess.run([sys.executable, str(ROOT / "database_migration.py"), "--config",
                                 str(self.config), "adopt", "dev"], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, cwd=self.root, preexec_fn=small_files,
                                timeout=60)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("rolled back, nothing changed", result.stderr)
        self.assertEqual(dump(db), before)
        self.assertEqual(query(db, "PRAGMA integrity_check"), [("ok",)])
        again = self.run_script("database_migration.py", "adopt", "dev")
        self.assertEqual(again.returncode, 0, again.stderr)


class AdoptFleetTests(RunnerTestCase):
    """adopt GROUP: every member; one already tracked is skipped, a refused one fails alone."""

    runner = Dbmate()
    ini = "[DEFAULT]\nbusy_timeout = 2\n\n[dev]\npath = instance/dev.db\n\n[tenants]\npath = tenants/*.db\n"

    def test_every_member_is_adopted_and_the_summary_says_what_happened(self) -> None:
        folder = self.root / "tenants"
        folder.mkdir()
        for stem in ("acme", "globex", "initech"):
            self.runner.build(folder / f"{stem}.db")
        with closing(sqlite3.connect(folder / "initech.db")) as conn:
            conn.execute("CREATE TABLE by_hand (x)")
        self.assertEqual(self.cli("adopt", "tenants/acme")[0], 0)
        code, out, err = self.cli("--json", "adopt", "tenants")
        self.assertEqual(code, 1, err)
        results = {r["name"]: r["result"] for r in json.loads(out)["instances"]}
        self.assertEqual(results, {"tenants/acme": "skipped", "tenants/globex": "ok",
                                   "tenants/initech": "failed"})
        self.assertIn("tenants/initech", err)
        self.assertEqual(query(folder / "globex.db", "SELECT COUNT(*) FROM schema_migrations"),
                         [(len(self.versions),)])
        self.assertEqual(query(folder / "initech.db", "SELECT COUNT(*) FROM schema_migrations"),
                         [(len(self.versions),)])    # still dbmate's table, untouched
        self.assertEqual(query(folder / "initech.db", "SELECT name FROM pragma_table_info("
                                                      "'schema_migrations')"), [("version",)])


if __name__ == "__main__":
    unittest.main()
