"""Fixes after the acceptance test of issues 9 and 10: Python migrations in other runners'
layouts, dbmate's empty migration, one-line messages, half-migrated and newer-SQLite
databases, file owners, planted files in backup folders, and smaller edges."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import unittest
from contextlib import closing
from pathlib import Path

from tests.support import ROOT, ProjectTestCase, database_migration, query, safe_db_update

BACKFILL = '''"""backfill"""

def up(conn):
    conn.execute("INSERT INTO a (x) VALUES (7)")


def down(conn):
    conn.execute("DELETE FROM a WHERE x = 7")
'''


class PythonMigrationsInEveryLayoutTest(ProjectTestCase):
    migrations = {}

    def cli(self, *argv: str) -> tuple[int, str, str]:
        return self.run_cli(database_migration, *argv)

    def test_a_python_migration_beside_golang_migrate_files_runs_in_version_order(self) -> None:
        self.write_migration("000001_a.up.sql", "CREATE TABLE a (x);")
        self.write_migration("000001_a.down.sql", "DROP TABLE a;")
        self.write_migration("000002_backfill.py", BACKFILL)
        self.write_migration("000003_b.up.sql", "CREATE TABLE b (y);")
        code, _, err = self.migrate("dev", "--create")
        self.assertEqual(code, 0, err)
        self.assertEqual(query(self.db(), "SELECT x FROM a"), [(7,)])
        self.assertEqual(query(self.db(), "SELECT version FROM schema_migrations ORDER BY version"),
                         [(1,), (2,), (3,)])

    def test_a_top_level_python_migration_in_a_diesel_folder_runs(self) -> None:
        (self.migrations_dir / "2024-01-01-000000_a").mkdir()
        self.write_migration("2024-01-01-000000_a/up.sql", "CREATE TABLE a (x);")
        self.write_migration("20240101000001_data.py", BACKFILL)
        code, _, err = self.migrate("dev", "--create")
        self.assertEqual(code, 0, err)
        self.assertEqual(query(self.db(), "SELECT x FROM a"), [(7,)])

    def test_up_py_inside_a_diesel_migration_folder_is_refused_naming_where_it_goes(self) -> None:
        (self.migrations_dir / "2024-01-01-000000_a").mkdir()
        self.write_migration("2024-01-01-000000_a/up.sql", "CREATE TABLE a (x);")
        (self.migrations_dir / "2024-01-02-000000_data").mkdir()
        self.write_migration("2024-01-02-000000_data/up.py", BACKFILL)
        code, out, err = self.cli("status")
        self.assertEqual(code, 2, err)
        self.assertIn("up.py", err)
        self.assertIn("20240102000000_data.py", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)

    def test_a_badly_named_python_file_beside_golang_migrate_files_is_named_as_such(self) -> None:
        self.write_migration("000001_a.up.sql", "CREATE TABLE a (x);")
        self.write_migration("backfill.py", BACKFILL)
        code, out, err = self.cli("status")
        self.assertEqual(code, 2, err)
        self.assertIn("backfill.py: a Python migration is named NNNN_description.py", err)
        self.assertNotIn("mixes", err)

    def test_new_python_writes_a_top_level_file_in_each_runners_layout(self) -> None:
        cases = {
            "golang-migrate": (("000001_a.up.sql", "CREATE TABLE a (x);"),),
            "Diesel": (("2024-01-01-000000_a/up.sql", "CREATE TABLE a (x);"),),
        }
        expected = {"golang-migrate": "000002_backfill.py", "Diesel": "*_backfill.py"}
        for case, files in cases.items():
            with self.subTest(case=case):
                for name, text in files:
                    (self.migrations_dir / name).parent.mkdir(exist_ok=True)
                    self.write_migration(name, text)
                code, out, err = self.cli("new", "backfill", "--python")
                self.assertEqual(code, 0, err)
                written = [p.name for p in self.migrations_dir.glob(expected[case])]
                self.assertEqual(len(written), 1, sorted(p.name for p in self.migrations_dir.iterdir()))
                self.assertRegex(written[0], r"^\d{6}_backfill\.py$|^\d{14}_backfill\.py$")
                code, out, err = self.cli("status")
                self.assertEqual(code, 2, err)       # the template has no up() yet
                self.assertIn(written[0], err)
                self.assertNotIn("mixes", err)
                for path in sorted(self.migrations_dir.rglob("*"), reverse=True):
                    path.rmdir() if path.is_dir() else path.unlink()


class DbmateEmptyMigrationTest(ProjectTestCase):
    migrations = {}

    def test_an_empty_dbmate_migration_says_how_to_keep_it_and_a_comment_adopts_it(self) -> None:
        self.write_migration("20240101000000_a.sql", "-- migrate:up\nCREATE TABLE a (x);\n-- migrate:down\n")
        empty = self.write_migration("20240102000000_nothing.sql", "-- migrate:up\n\n-- migrate:down\n")
        with closing(sqlite3.connect(self.db())) as conn:    # as dbmate left it
            conn.execute("CREATE TABLE a (x)")
            conn.execute('create table "schema_migrations" (version varchar(128) primary key)')
            conn.executemany('insert into "schema_migrations" (version) values (?)',
                             [("20240101000000",), ("20240102000000",)])
            conn.commit()
        for argv in (("status",), ("adopt", "dev")):
            code, out, err = self.run_cli(database_migration, *argv)
            self.assertEqual(code, 2, out + err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn("up part is empty", err)
            self.assertIn("'-- no-op' under '-- migrate:up'", err)
        empty.write_text("-- migrate:up\n-- no-op\n-- migrate:down\n", encoding="utf-8")
        code, out, err = self.run_cli(database_migration, "adopt", "dev")
        self.assertEqual(code, 0, out + err)
        self.assertEqual(query(self.db(), "SELECT checksum FROM schema_migrations WHERE version = 20240102000000"),
                         [(hashlib.sha256(b"").hexdigest(),)])


def damage_a_leaf(path) -> None:
    """Break the payload length of every cell on one table leaf page: integrity_check and
    quick_check then report over a dozen problems in one multi-line row."""
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE big (id INTEGER PRIMARY KEY, x)")
        conn.executemany("INSERT INTO big (x) VALUES (?)", [("n" * 300,) for _ in range(2000)])
        conn.commit()
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(path.read_bytes())
    pages = len(data) // page_size
    for page in range(pages // 2, pages):
        start = page * page_size
        if data[start] == 0x0D:
            for cell in range(int.from_bytes(data[start + 3:start + 5], "big")):
                pointer = int.from_bytes(data[start + 8 + 2 * cell:start + 10 + 2 * cell], "big")
                data[start + pointer] = 0x7F
            break
    path.write_bytes(bytes(data))


class OneLineDamageTest(ProjectTestCase):

    def error_lines(self, result) -> list[str]:
        self.assertNotIn("Traceback", result.stderr)
        return result.stderr.strip().splitlines()

    def test_a_damaged_page_is_one_line_naming_the_command_that_lists_every_problem(self) -> None:
        self.create()
        damage_a_leaf(self.db())
        for argv in (("migrate", "dev", "-y"), ("migrate", "dev", "--dry-run")):
            with self.subTest(argv=argv):
                result = self.run_script("database_migration.py", *argv)
                self.assertEqual(result.returncode, 1, result.stderr)
                lines = self.error_lines(result)
                self.assertEqual(len(lines), 1, result.stderr)
                self.assertRegex(lines[0], r"\(and \d+ more: 'safe_db_update.py check dev' lists them all\)")
        self.assertEqual(self.run_script("safe_db_update.py", "backup", "dev").returncode, 1)
        unverified = self.backups()[0]
        result = self.run_script("safe_db_update.py", "restore", "dev", str(unverified), "-y")
        self.assertEqual(result.returncode, 1, result.stderr)
        lines = self.error_lines(result)
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn("lists them all", lines[0])
        self.assertIn(f"'safe_db_update.py verify dev {unverified.name}'", lines[0])


class HalfMigratedTest(ProjectTestCase):
    migrations = {}
    RUNNERS = {
        "golang-migrate": ("CREATE TABLE schema_migrations (version uint64,dirty bool)",
                           "INSERT INTO schema_migrations (version, dirty) VALUES (2, 1)"),
        "sqlx": ("CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, "
                 "installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL, "
                 "checksum BLOB NOT NULL, execution_time BIGINT NOT NULL)",
                 "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) "
                 "VALUES (1, 'a', TRUE, x'00', 5), (2, 'b', FALSE, x'00', -1)"),
    }

    def test_every_command_says_half_migrated_and_points_to_restore(self) -> None:
        self.write_migration("0001_a.up.sql", "CREATE TABLE a (x);")
        self.write_migration("0001_a.down.sql", "DROP TABLE a;")
        self.write_migration("0002_b.up.sql", "CREATE TABLE b (x);")
        restore = "restore the backup taken before that run ('safe_db_update.py list-backups dev'"
        for runner, (table, row) in self.RUNNERS.items():
            with self.subTest(runner=runner):
                self.db().unlink(missing_ok=True)
                with closing(sqlite3.connect(self.db())) as conn:
                    conn.execute("CREATE TABLE a (x)")
                    conn.execute(table)
                    conn.execute(row)
                    conn.commit()
                before = self.db().read_bytes()
                code, out, err = self.run_cli(database_migration, "status", "dev")
                self.assertEqual(code, 0, err)
                self.assertIn(f"half-migrated by {runner}", out)
                self.assertIn(restore, out)
                code, out, err = self.run_cli(database_migration, "status", "dev", "--json")
                entry = json.loads(out)["instances"][0]
                self.assertEqual((entry["state"], entry["runner"]), ("untracked", runner))
                self.assertIn(f"half-migrated by {runner}", entry["half_migrated"])
                self.assertIn(restore, entry["half_migrated"])
                for argv in (("check", "dev"), ("migrate", "dev", "-y"), ("rollback", "dev", "--to", "1", "-y")):
                    code, out, err = self.run_cli(database_migration, *argv)
                    self.assertEqual(code, 1, out + err)
                    text = out + err
                    self.assertIn(f"half-migrated by {runner}", text)
                    self.assertIn(restore, text)
                    self.assertNotIn("run 'adopt dev'", text)
                self.assertEqual(self.db().read_bytes(), before)


class NewerSqliteEverywhereTest(ProjectTestCase):

    def test_every_reading_command_says_newer_sqlite_not_damage(self) -> None:
        live = self.create()
        with closing(sqlite3.connect(live, isolation_level=None)) as conn:
            conn.execute("PRAGMA writable_schema = ON")      # as a newer SQLite's view would read here
            conn.execute("INSERT INTO sqlite_master VALUES ('view', 'recent', 'recent', 0, "
                         "'CREATE VIEW recent AS SELECT id FROM user FETCH FIRST 3 ROWS ONLY')")
        before = live.read_bytes()
        for script, argv in (("safe_db_update.py", ("check", "dev")), ("safe_db_update.py", ("info", "dev")),
                             ("database_migration.py", ("status",)),
                             ("database_migration.py", ("check", "dev")),
                             ("database_migration.py", ("migrate", "dev", "-y"))):
            with self.subTest(argv=argv):
                result = self.run_script(script, *argv)
                self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
                text = result.stdout + result.stderr
                self.assertIn(f"this SQLite ({sqlite3.sqlite_version}) cannot read the schema", text)
                self.assertIn("written by a newer SQLite and is not damaged", text)
                self.assertNotIn("integrity_check failed", text)
                self.assertNotIn("Traceback", text)
        self.assertEqual(live.read_bytes(), before)


@unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0, "needs root to own files as another user")
class CreateAsRootTest(ProjectTestCase):
    APP_USER = 65534                    # nobody

    def test_create_and_new_empty_database_as_root_give_the_file_to_the_folders_owner(self) -> None:
        folder = self.root / "instance"
        os.chown(folder, self.APP_USER, self.APP_USER)
        code, _, err = self.migrate("dev", "--create")
        self.assertEqual(code, 0, err)
        info = self.db().stat()
        self.assertEqual((info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)),
                         (self.APP_USER, self.APP_USER, 0o600))
        self.assertEqual(query(self.db(), "SELECT COUNT(*) FROM schema_migrations"), [(2,)])
        self.db().unlink()
        Path(f"{self.db()}-wal").write_bytes(b"left by a deleted database")
        code, _, err = self.migrate("dev", "--create", "--new-empty-database", "-y")
        self.assertEqual(code, 0, err)
        info = self.db().stat()
        self.assertEqual((info.st_uid, stat.S_IMODE(info.st_mode)), (self.APP_USER, 0o600))


class PlantedFilesTest(ProjectTestCase):
    SECRET = "root-only secret line"

    def plant(self, owner: int | None) -> Path:
        """backups/prod/ (owned by owner) holding history.jsonl, a link to a root-only file."""
        secret = self.root / "secret.jsonl"
        secret.write_text(json.dumps({"operation": "backup", "outcome": self.SECRET}) + "\n",
                          encoding="utf-8")
        secret.chmod(0o600)
        home = self.root / "backups" / "prod"
        (home / "database").mkdir(parents=True, mode=0o700)
        (self.root / "backups").chmod(0o700)
        (home / "history.jsonl").symlink_to(secret)
        if owner is not None:
            for folder in (home, home / "database"):
                os.chown(folder, owner, owner)
        return home

    def assertRefusedWithoutTheSecret(self, module, *argv: str) -> None:
        code, out, err = self.run_cli(module, *argv)
        self.assertIn(code, (1, 2), out + err)
        self.assertNotIn(self.SECRET, out + err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)

    def test_history_never_follows_a_link_planted_as_the_audit_trail(self) -> None:
        self.plant(owner=None)
        self.assertRefusedWithoutTheSecret(database_migration, "history", "prod")
        result = self.run_script("database_migration.py", "history", "prod")
        self.assertNotIn(self.SECRET, result.stdout + result.stderr)
        self.assertIn("symbolic link", result.stderr)
        self.assertEqual(result.returncode, 1, result.stderr)

    @unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0, "needs root to plant as nobody")
    def test_reads_refuse_a_backup_folder_another_user_owns(self) -> None:
        self.plant(owner=65534)
        self.assertRefusedWithoutTheSecret(database_migration, "history", "prod")
        code, out, err = self.run_cli(safe_db_update, "list-backups", "prod")
        self.assertEqual(code, 1, out + err)
        self.assertIn("belongs to another user", err)
        self.assertIn("refusing to read from there", err)


class AliasFirstTest(ProjectTestCase):

    def test_every_write_command_refuses_a_second_name_first_with_exit_2(self) -> None:
        self.create("prod")                     # up to date, and no backups yet
        self.config.write_text("[prod]\npath = instance/prod.db\n\n"
                               "[alias]\npath = instance/../instance/prod.db\n", encoding="utf-8")
        before = self.db("prod").read_bytes()
        for module, argv in ((safe_db_update, ("restore", "alias", "-y")),
                             (database_migration, ("migrate", "alias")),
                             (database_migration, ("migrate", "alias", "-y")),
                             (database_migration, ("rollback", "alias", "--to", "1", "-y")),
                             (database_migration, ("baseline", "alias", "--to", "2", "-y")),
                             (database_migration, ("adopt", "alias")),
                             (safe_db_update, ("prune", "alias", "-y"))):
            with self.subTest(argv=argv):
                code, out, err = self.run_cli(module, *argv)
                self.assertEqual(code, 2, out + err)
                self.assertIn("same file", err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertEqual(self.db("prod").read_bytes(), before)


class DefaultSectionNamedTest(ProjectTestCase):

    def test_a_bad_value_written_in_default_is_reported_under_default(self) -> None:
        for key, value in (("keep_daily", "abc"), ("busy_timeout", "soon"), ("protected", "maybe")):
            with self.subTest(key=key):
                self.config.write_text(f"[DEFAULT]\n{key} = {value}\n\n[prod]\npath = instance/prod.db\n",
                                       encoding="utf-8")
                code, out, err = self.run_cli(safe_db_update, "list-backups", "prod")
                self.assertEqual(code, 2, err)
                self.assertIn(f"instances.ini: [DEFAULT]: {key} must", err)
                self.config.write_text(f"[DEFAULT]\n{key} = {value}\n\n[prod]\npath = instance/prod.db\n"
                                       f"{key} = x{value}\n", encoding="utf-8")
                code, out, err = self.run_cli(safe_db_update, "list-backups", "prod")
                self.assertIn(f"instances.ini: [prod]: {key} must", err)


CRASHED_APP = r"""
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode = WAL")
conn.execute("PRAGMA wal_autocheckpoint = 0")
for i in range(50):
    conn.execute("INSERT INTO user (email, name) VALUES (?, 'app')", (f"app{i}@x",))
os.kill(os.getpid(), signal.SIGKILL)
"""


class LeftoverSidecarsTest(ProjectTestCase):

    def crash_app_and_delete(self) -> bytes:
        """A real application killed in WAL mode with committed rows in its -wal; then the
        database file is deleted, the -wal and -shm left beside it."""
        result = subprocess.run([sys.executable, "-c", CRASHED_APP, str(self.db())], timeout=30)
        self.assertEqual(result.returncode, -signal.SIGKILL)
        self.db().unlink()
        return Path(f"{self.db()}-wal").read_bytes()

    def test_restore_over_a_deleted_file_says_it_moved_the_wal_and_makes_it_private(self) -> None:
        self.create()
        self.assertEqual(self.run_script("safe_db_update.py", "backup", "dev").returncode, 0)
        wal = self.crash_app_and_delete()
        os.chmod(f"{self.db()}-wal", 0o644)
        result = self.run_script("safe_db_update.py", "restore", "dev", "-y")
        self.assertEqual(result.returncode, 0, result.stderr)
        moved = sorted((self.root / "backups" / "dev" / "database").glob("*-replaced.db-*"))
        self.assertEqual([p.name.rsplit(".", 1)[1] for p in moved], ["db-shm", "db-wal"])
        self.assertIn("moved the -wal and -shm left beside dev.db to", result.stdout)
        self.assertIn(str(moved[1]), result.stdout)
        self.assertIn("the -wal may hold committed rows", result.stdout)
        self.assertEqual(moved[1].read_bytes(), wal)          # kept whole, never deleted
        self.assertEqual([stat.S_IMODE(p.stat().st_mode) for p in moved], [0o600, 0o600])
        self.assertEqual(query(self.db(), "SELECT COUNT(*) FROM user"), [(2,)])

    def test_create_with_only_a_wal_left_and_no_backup_gives_advice_that_fits(self) -> None:
        code, _, err = self.migrate("dev", "--create")
        self.assertEqual(code, 0, err)
        wal = self.crash_app_and_delete()
        (self.root / "backups" / "dev" / "history.jsonl").unlink()      # only the -wal says it was there
        result = self.run_script("database_migration.py", "migrate", "dev", "--create")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertNotIn("restore it with", result.stderr)
        self.assertIn("no verified backup to restore", result.stderr)
        self.assertIn("the -wal may hold committed rows of the deleted database", result.stderr)
        self.assertIn("'database_migration.py migrate dev --new-empty-database'", result.stderr)
        self.assertEqual(Path(f"{self.db()}-wal").read_bytes(), wal)
        result = self.run_script("database_migration.py", "migrate", "dev", "--new-empty-database", "-y")
        self.assertEqual(result.returncode, 0, result.stderr)
        orphaned = sorted((self.root / "backups" / "dev" / "database").glob("*-orphaned.db-*"))
        self.assertEqual(len(orphaned), 2)
        self.assertEqual([stat.S_IMODE(p.stat().st_mode) for p in orphaned], [0o600, 0o600])


class SmallerOutputTest(ProjectTestCase):
    migrations = {}

    def test_the_status_table_stays_aligned_with_14_digit_versions(self) -> None:
        self.write_migration("20240105093001_a.sql", "-- migrate:up\nCREATE TABLE a (x);\n")
        self.write_migration("20240105093002_b.sql", "-- migrate:up\nCREATE TABLE b (x);\n")
        self.assertEqual(self.migrate("dev", "--create", "--to", "20240105093001")[0], 0)
        code, out, err = self.run_cli(database_migration, "status")
        lines = out.splitlines()
        header, rows = lines[0], lines[1:3]
        ends = [m.end() for m in re.finditer(r"\S+", header)][1:5]   # version, latest, pending, state
        for row in rows:            # each number ends where its heading ends; state starts aligned
            spans = [m.span() for m in re.finditer(r"\S+", row)][1:5]
            self.assertEqual([end for _, end in spans[:3]], ends[:3], (header, row))
            self.assertEqual(spans[3][0], header.index("state"), (header, row))
        self.assertEqual(rows[0].split()[1:3], ["20240105093001", "20240105093002"])

    def test_a_group_adopt_summary_names_each_failure_once(self) -> None:
        self.write_migration("0001_a.up.sql", "CREATE TABLE a (x);")
        self.config.write_text("[tenants]\npath = tenants/*.db\n", encoding="utf-8")
        (self.root / "tenants").mkdir()
        for name in ("acme", "globex"):
            with closing(sqlite3.connect(self.root / "tenants" / f"{name}.db")) as conn:
                conn.execute("CREATE TABLE schema_migrations (version uint64,dirty bool)")
                conn.execute("INSERT INTO schema_migrations VALUES (1, 1)")
                conn.commit()
        code, out, err = self.run_cli(database_migration, "adopt", "tenants")
        self.assertEqual(code, 1, err)
        self.assertIn("  failed: tenants/acme (its error is above)", out + err)
        self.assertNotIn("tenants/acme: tenants/acme", out + err)

    def test_list_backups_and_info_into_a_closed_pipe_are_quiet(self) -> None:
        self.write_migration("0001_a.sql", "-- migrate:up\nCREATE TABLE a (x);\n")
        self.assertEqual(self.migrate("dev", "--create")[0], 0)
        for _ in range(3):
            self.assertEqual(self.run_script("safe_db_update.py", "backup", "dev").returncode, 0)
        for argv in (("list-backups", "dev"), ("info", "dev")):
            with self.subTest(argv=argv):
                process = subprocess.Popen([sys.executable, str(ROOT / "safe_db_update.py"), "--config",
                                            str(self.config), *argv], stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
                process.stdout.close()          # the reader (head) has gone before the first write
                errors = process.stderr.read().decode()
                process.stderr.close()
                self.assertEqual((process.wait(timeout=60), errors), (0, ""))


if __name__ == "__main__":
    unittest.main()
