"""Hostile input: tricky SQL for the statement splitter, garbage files, odd names, symlinks.

Whatever a user (or a disk) hands the tools, they answer with an exit code of 1 or
2 and one line on stderr, never a traceback, and they change nothing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import tempfile
import unittest
from contextlib import closing
from pathlib import Path

from tests.support import ProjectTestCase, database_migration, safe_db_update, sha256

split_statements = database_migration.split_statements

SEEDS = range(8)
SQL_SCRIPTS = 300


# --- Random SQL scripts ------------------------------------------------------

TRICKY = (";", "--", "/*", "*/", "BEGIN", "END", "END;", "CASE", "'", '"', "`", "]", "\n",
          " ", "x", "\u00e9", "it's", ";;")


class ScriptWriter:
    """Random but valid SQL scripts whose every hiding place holds ';', '--', '/*', 'END'."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.tables: list[tuple[str, list[str]]] = []      # (quoted name, quoted columns)
        self.count = 0

    def tricky(self) -> str:
        return "".join(self.rng.choice(TRICKY) for _ in range(self.rng.randint(0, 5)))

    def literal(self) -> str:
        return "'" + self.tricky().replace("'", "''") + "'"

    def name(self, prefix: str) -> str:
        """A quoted identifier in one of SQLite's three quoting styles, unique by its prefix."""
        self.count += 1
        text = f"{prefix}{self.count}{self.tricky()}"
        style = self.rng.randrange(3)
        if style == 0:
            return '"' + text.replace('"', '""') + '"'
        if style == 1:
            return "`" + text.replace("`", "``") + "`"
        return "[" + text.replace("]", "") + "]"

    def comment(self) -> str:
        if self.rng.random() < 0.5:
            return "-- " + self.tricky().replace("\n", " ") + "\n"
        return "/* " + self.tricky().replace("*/", "* /") + " */"

    def gap(self) -> str:
        """White space between tokens, sometimes holding a comment."""
        return f" {self.comment()} " if self.rng.random() < 0.3 else self.rng.choice((" ", "\n", "\t "))

    def create_table(self) -> str:
        table = self.name("t")
        columns = [self.name("c") for _ in range(self.rng.randint(1, 3))]
        self.tables.append((table, columns))
        definitions = ", ".join(f"{c}{self.gap()}TEXT DEFAULT {self.literal()}" for c in columns)
        return f"CREATE{self.gap()}TABLE {table}{self.gap()}({definitions})"

    def insert(self) -> str:
        table, columns = self.rng.choice(self.tables)
        rows = ", ".join("(" + f",{self.gap()}".join(self.literal() for _ in columns) + ")"
                         for _ in range(self.rng.randint(1, 3)))
        return f"INSERT{self.gap()}INTO {table}{self.gap()}VALUES{self.gap()}{rows}"

    def trigger(self) -> str:
        """A trigger whose body has several statements, CASE ... END and tricky literals."""
        table, columns = self.rng.choice(self.tables)
        log, log_columns = self.tables[0]
        first = log_columns[0]
        case = (f"CASE WHEN new.{columns[0]} = {self.literal()} THEN {self.literal()} "
                f"ELSE {self.literal()}{self.gap()}END")
        body = [f"INSERT INTO {log} ({first}) VALUES ({case})",
                f"UPDATE {log} SET {first} = CASE WHEN {first} LIKE '%;%' THEN {self.literal()} "
                f"ELSE {first} END WHERE rowid = last_insert_rowid()",
                "SELECT CASE WHEN 1 THEN 'END;' END"]
        self.rng.shuffle(body)
        statements = "".join(f"{self.gap()}{s};{self.gap()}" for s in body[:self.rng.randint(1, 3)])
        return (f"CREATE TRIGGER {self.name('trg')} AFTER INSERT ON {table}{self.gap()}"
                f"BEGIN{statements}END")

    def end_of_statement(self) -> str:
        return self.rng.choice((";\n", ";", " ;  ", f";{self.comment()}", f"{self.gap()};\n",
                                " -- it's; END\n;\n", ";\n;\n", f";\n{self.comment()}\n"))

    def script(self) -> str:
        statements = [self.create_table()]
        for _ in range(self.rng.randint(2, 12)):
            kind = self.rng.random()
            statements.append(self.create_table() if kind < 0.25 else
                              self.trigger() if kind < 0.45 else self.insert())
        statements.append(self.insert())           # so the newest trigger fires at least once
        text = "".join(s + self.end_of_statement() for s in statements)
        if self.rng.random() < 0.2:                 # the last statement without its ';'
            text += self.insert()
        return (self.comment() if self.rng.random() < 0.3 else "") + text


def database_after(statements_runner) -> list[tuple]:
    """sqlite_master and every table's rows (iterdump cannot quote every odd name)."""
    with closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        statements_runner(conn)
        master = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master "
                              "ORDER BY type, name").fetchall()
        rows = [(name, conn.execute('SELECT * FROM "' + name.replace('"', '""') + '" ORDER BY rowid')
                 .fetchall()) for kind, name, _, _ in master if kind == "table"]
        return master + rows


def built_by_executescript(script: str) -> list[str]:
    return database_after(lambda conn: conn.executescript(script))


def built_statement_by_statement(script: str) -> list[str]:
    def run(conn: sqlite3.Connection) -> None:
        for statement in split_statements(script):
            conn.execute(statement)
    return database_after(run)


class StatementSplitterTests(unittest.TestCase):
    """split_statements, run one by one, builds what sqlite3's own executescript builds."""

    def scripts(self):
        for seed in range(SQL_SCRIPTS):
            yield seed, ScriptWriter(seed).script()

    def test_split_statements_build_the_same_database_as_executescript(self) -> None:
        fired = 0
        for seed, script in self.scripts():
            with self.subTest(seed=seed, script=script):
                expected = built_by_executescript(script)
                self.assertEqual(built_statement_by_statement(script), expected)
                fired += any(row[0] == "trigger" for row in expected)
        self.assertGreater(fired, SQL_SCRIPTS // 2, "the generator should make triggers")

    def test_each_split_statement_is_one_complete_statement(self) -> None:
        for seed, script in self.scripts():
            for statement in split_statements(script):
                with self.subTest(seed=seed, statement=statement):
                    # '\n;' rather than ';': a statement may end in a '-- comment'
                    self.assertTrue(sqlite3.complete_statement(statement + "\n;"))
                    self.assertEqual(split_statements(statement + "\n;"), [statement])

    def test_a_comment_with_an_apostrophe_does_not_swallow_the_statements_after_it(self) -> None:
        script = ("CREATE TABLE t (a TEXT);\n-- don't forget the users' rows\n"
                  "INSERT INTO t VALUES ('x');\n/* it's */ INSERT INTO t VALUES ('y');\n")
        self.assertEqual(len(split_statements(script)), 3)
        self.assertEqual(built_statement_by_statement(script), built_by_executescript(script))

    def test_a_comment_with_an_apostrophe_does_not_hide_a_destructive_statement(self) -> None:
        for statement in ("-- the user's old table\nDROP TABLE loan",
                          "/* don't */ DELETE FROM loan WHERE amount = 'x'",
                          "-- a 'quoted' word\nUPDATE loan SET amount = 0"):
            with self.subTest(statement=statement):
                self.assertTrue(database_migration.destructive_kind(statement))

    def test_comment_markers_inside_strings_and_names_are_not_comments(self) -> None:
        self.assertEqual(database_migration.destructive_kind(
            "UPDATE \"a--b\" SET note = '/*' WHERE id = 1"), "")
        self.assertEqual(database_migration.destructive_kind(
            "UPDATE [x/*] SET note = 1 /* WHERE */"), "UPDATE without WHERE")


# --- Random bytes and text ---------------------------------------------------

def random_bytes(seed: int, size: int = 2000) -> bytes:
    """Bytes that are certainly not UTF-8 and hold NUL bytes."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    for garbage in (b"\x00", b"\xff\xfe", b"\xc3\x28"):
        position = rng.randrange(len(data))
        data[position:position] = garbage
    return bytes(data)


def random_text(seed: int, alphabet: str, size: int = 600) -> str:
    """Valid UTF-8 built from alphabet, with a NUL byte somewhere."""
    rng = random.Random(seed)
    text = "".join(rng.choice(alphabet) for _ in range(size))
    position = rng.randrange(size)
    return text[:position] + "\x00" + text[position:]


INI_ALPHABET = "[]=:;#%\n\r\t \x0c\x1c\x85\u2028abcdev/.path"
SQL_ALPHABET = "abcdeTABLE CREATE ()';\"-*/\n,"
PY_ALPHABET = "abc():=\n \t'\"#updown"


class HostileTestCase(ProjectTestCase):
    """ProjectTestCase with a dev database at version 2 and the ways to say 'refused'."""

    def setUp(self) -> None:
        super().setUp()
        self.create("dev")

    def files(self, outside: str = "") -> dict[str, str]:
        """Every file under the project (but the audit trail, or a folder) and its SHA-256."""
        return {str(p.relative_to(self.root)): sha256(p) for p in sorted(self.root.rglob("*"))
                if p.is_file() and p.name != "history.jsonl"
                and not (outside and p.relative_to(self.root).parts[0] == outside)}

    def assertRefused(self, result: tuple[int, str, str], codes: tuple[int, ...] = (1, 2),
                      words: tuple[str, ...] = ()) -> None:
        code, out, err = result
        self.assertIn(code, codes, err)
        self.assertNotIn("Traceback", out + err)
        self.assertTrue(err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}")
        for word in words:
            self.assertIn(word, err)

    def assertScriptRefused(self, result, codes: tuple[int, ...] = (1, 2)) -> None:
        self.assertRefused((result.returncode, result.stdout, result.stderr), codes)


class HostileRegistryTests(HostileTestCase):
    commands = ((database_migration, ["status"]), (database_migration, ["migrate", "dev"]),
                (database_migration, ["new", "add thing"]), (safe_db_update, ["backup", "--all"]),
                (safe_db_update, ["list-backups", "dev"]))

    def assertEveryCommandRefuses(self, words: tuple[str, ...] = ()) -> None:
        before = self.files()
        for module, argv in self.commands:
            with self.subTest(command=argv):
                self.assertRefused(self.run_cli(module, *argv), (2,), (str(self.config), *words))
        self.assertEqual(self.files(), before)

    def test_random_bytes_as_the_registry_are_a_configuration_error(self) -> None:
        for seed in SEEDS:
            with self.subTest(seed=seed):
                self.config.write_bytes(random_bytes(seed))
                self.assertEveryCommandRefuses()

    def test_random_text_with_nul_bytes_as_the_registry_is_a_configuration_error(self) -> None:
        for seed in SEEDS:
            with self.subTest(seed=seed):
                self.config.write_text(random_text(seed, INI_ALPHABET), encoding="utf-8")
                self.assertEveryCommandRefuses()

    def test_a_section_name_with_dots_or_slashes_is_a_configuration_error(self) -> None:
        for section in ("..", "a/b", "../dev", "tenants/acme", "dev\\x", ".", "dev/"):
            with self.subTest(section=section):
                self.config.write_text(f"[dev]\npath = instance/dev.db\n\n[{section}]\n"
                                       f"path = instance/other.db\n", encoding="utf-8")
                self.assertEveryCommandRefuses((f"[{section}]",))

    def test_random_registries_are_refused_by_the_scripts_too(self) -> None:
        self.config.write_bytes(random_bytes(1))
        for script in ("database_migration.py", "safe_db_update.py"):
            with self.subTest(script=script):
                self.assertScriptRefused(self.run_script(script, "backup", "dev"), (2,))
        self.config.write_text(random_text(2, INI_ALPHABET), encoding="utf-8")
        self.assertScriptRefused(self.run_script("database_migration.py", "status"), (2,))


class HostileMigrationFileTests(HostileTestCase):
    def assertMigrateRefuses(self, path: Path, codes: tuple[int, ...] = (2,)) -> None:
        before = self.files()
        try:
            for argv in (["status"], ["migrate", "dev", "--yes"], ["check", "dev"],
                         ["migrate", "dev", "--dry-run"]):
                with self.subTest(file=path.name, argv=argv):
                    self.assertRefused(self.run_cli(database_migration, *argv), codes)
            self.assertEqual(self.files(), before)
        finally:
            path.unlink()

    def test_random_bytes_as_a_sql_migration_are_a_usage_error(self) -> None:
        for seed in SEEDS:
            path = self.migrations_dir / "0003_garbage.sql"
            path.write_bytes(random_bytes(seed))
            self.assertMigrateRefuses(path)

    def test_text_with_a_nul_byte_as_a_sql_migration_is_a_usage_error(self) -> None:
        for seed in SEEDS:
            path = self.write_migration("0003_garbage.sql", random_text(seed, SQL_ALPHABET))
            self.assertMigrateRefuses(path)

    def test_a_sql_migration_of_random_text_never_changes_the_database(self) -> None:
        for seed in SEEDS:
            text = random_text(seed, SQL_ALPHABET).replace("\x00", "")
            path = self.write_migration("0003_garbage.sql", f"-- migrate:up\n{text}\n")
            before = self.files(outside="backups")
            with self.subTest(seed=seed):
                self.assertRefused(self.migrate("dev", "--yes"))
                self.assertEqual(self.files(outside="backups"), before)
            path.unlink()

    def test_random_bytes_or_text_as_a_python_migration_are_a_usage_error(self) -> None:
        for seed in SEEDS:
            for name, data in ((f"0003_garbage{seed}.py", random_bytes(seed)),
                               (f"0003_text{seed}.py", random_text(seed, PY_ALPHABET).encode())):
                path = self.migrations_dir / name
                path.write_bytes(data)
                self.assertMigrateRefuses(path)

    def test_a_garbage_migration_is_refused_by_the_script_too(self) -> None:
        (self.migrations_dir / "0003_garbage.sql").write_bytes(random_bytes(5))
        self.assertScriptRefused(self.run_script("database_migration.py", "migrate", "dev"), (2,))


class HostileDatabaseTests(HostileTestCase):
    """A database file that is not one: every command refuses and changes nothing."""

    commands = ((database_migration, ["check", "dev"]), (database_migration, ["migrate", "dev", "--yes"]),
                (database_migration, ["migrate", "dev", "--dry-run"]),
                (database_migration, ["backup", "dev"]), (database_migration, ["diff", "dev", "prod"]),
                (database_migration, ["baseline", "dev", "--to", "1"]),
                (database_migration, ["rollback", "dev", "--to", "1", "--yes"]),
                (safe_db_update, ["backup", "dev"]), (safe_db_update, ["info", "dev"]))

    def setUp(self) -> None:
        super().setUp()
        self.create("prod")
        code, _, err = self.run_cli(safe_db_update, "backup", "dev")
        self.assertEqual(code, 0, err)

    def assertEveryCommandRefuses(self, data: bytes) -> None:
        self.db("dev").write_bytes(data)
        before = self.files(outside="backups")
        backups = {b.path for b in safe_db_update.list_backups(self.instance("dev"))}
        for module, argv in self.commands:
            with self.subTest(command=argv):
                self.assertRefused(self.run_cli(module, *argv), (1,))
        code, out, err = self.run_cli(database_migration, "status", "--json")
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(json.loads(out)["instances"][0]["state"], "error")
        code, out, err = self.run_cli(safe_db_update, "check", "dev")
        self.assertEqual(code, 1)
        self.assertNotIn("Traceback", out + err)
        self.assertEqual(self.files(outside="backups"), before)
        added = [b for b in safe_db_update.list_backups(self.instance("dev")) if b.path not in backups]
        self.assertEqual([b for b in added if b.verified], [], "a damaged copy must be marked")
        self.assertEqual(list(self.root.rglob("*.partial")), [])

    def test_random_bytes_as_a_database_are_refused(self) -> None:
        for seed in SEEDS:
            with self.subTest(seed=seed):
                self.assertEveryCommandRefuses(random_bytes(seed))

    def test_an_sqlite_header_followed_by_garbage_is_refused(self) -> None:
        for seed in SEEDS:
            with self.subTest(seed=seed):
                self.assertEveryCommandRefuses(safe_db_update.SQLITE_HEADER + random_bytes(seed, 8192))

    def test_a_garbage_database_is_refused_by_the_scripts_too(self) -> None:
        self.db("dev").write_bytes(safe_db_update.SQLITE_HEADER + random_bytes(3, 8192))
        for script, argv in (("database_migration.py", ["migrate", "dev"]),
                             ("safe_db_update.py", ["backup", "dev"])):
            with self.subTest(script=script):
                self.assertScriptRefused(self.run_script(script, *argv), (1,))


HOSTILE_JSON = ("[]", "null", '"manifest"', "{}", '{"sha256": 1, "size": "big"}',
                '{"sha256": "0", "size": 1e999, "created_at": "x", "source": "s", "reason": "manual"}',
                '{"sha256": "0", "size": NaN, "created_at": "x", "source": "s", "reason": "manual"}',
                "[" * 100_000 + "]" * 100_000)


class HostileManifestTests(HostileTestCase):
    """A backup whose manifest is unreadable is not a backup: listed as unverified, never
    verified or restored."""

    def setUp(self) -> None:
        super().setUp()
        code, out, err = self.run_cli(safe_db_update, "backup", "dev", "--json")
        self.assertEqual(code, 0, err)
        self.backup = Path(json.loads(out)["path"])
        self.manifest = Path(f"{self.backup}.json")

    def assertBackupIgnored(self) -> None:
        before = self.files()
        code, out, err = self.run_cli(safe_db_update, "list-backups", "dev", "--json")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual([(b["path"], b["verified"], b["sha256"]) for b in json.loads(out)["backups"]],
                         [(str(self.backup), False, None)])
        self.assertRefused(self.run_cli(safe_db_update, "verify", "dev", self.backup.name), (1,),
                           ("no readable manifest",))
        self.assertRefused(self.run_cli(safe_db_update, "verify", "dev"), (1,),
                           ("no verified backup",))
        self.assertRefused(self.run_cli(safe_db_update, "restore", "dev", "--yes"), (1,))
        code, out, err = self.run_cli(safe_db_update, "info", "dev", "--json")
        self.assertEqual((code, err, json.loads(out)["backups"]), (0, "", {"count": 1, "newest": None}))
        self.assertEqual(self.files(), before)

    def test_random_bytes_as_a_manifest(self) -> None:
        for seed in SEEDS:
            with self.subTest(seed=seed):
                self.manifest.write_bytes(random_bytes(seed))
                self.assertBackupIgnored()

    def test_valid_json_that_is_not_a_manifest(self) -> None:
        for text in HOSTILE_JSON:
            with self.subTest(manifest=text[:80]):
                self.manifest.write_text(text, encoding="utf-8")
                self.assertBackupIgnored()


HOSTILE_NAMES = ("..", "../dev", "dev/..", "dev/../prod", "/etc/passwd", "a/b", "x" * 1000,
                 "dev\x00", "dev ", " dev", "DEV", "*", "d?v", "[d]ev", "~", "dev\n", "\u0434ev")


class HostileNameTests(HostileTestCase):
    commands = ((database_migration, ["migrate", "{}", "--create"]), (database_migration, ["status", "{}"]),
                (database_migration, ["check", "{}"]), (database_migration, ["history", "{}"]),
                (database_migration, ["backup", "{}"]), (safe_db_update, ["backup", "{}"]),
                (safe_db_update, ["info", "{}"]), (safe_db_update, ["restore", "{}", "--yes"]),
                (safe_db_update, ["list-backups", "{}"]))

    def test_an_odd_instance_name_on_the_command_line_is_a_usage_error(self) -> None:
        before = self.files()
        for name in HOSTILE_NAMES:
            for module, argv in self.commands:
                with self.subTest(name=name[:20], command=argv[0]):
                    result = self.run_cli(module, *[a.format(name) for a in argv])
                    self.assertRefused(result, (2,), ("no instance named",))
        self.assertEqual(self.files(), before)
        self.assertEqual(sorted(p.name for p in (self.root / "backups").iterdir()), ["dev"])

    def test_an_odd_instance_name_is_refused_by_the_scripts_too(self) -> None:
        for name in ("../dev", "x" * 1000):
            for script in ("database_migration.py", "safe_db_update.py"):
                with self.subTest(name=name[:20], script=script):
                    self.assertScriptRefused(self.run_script(script, "backup", name), (2,))


class SymlinkedBackupFolderTests(ProjectTestCase):
    """A backup folder that is a symbolic link is refused, and nothing lands at its target."""

    def setUp(self) -> None:
        super().setUp()
        code, _, err = self.migrate("dev", "--create", "--to", "1")
        self.assertEqual(code, 0, err)
        elsewhere = tempfile.TemporaryDirectory()
        self.addCleanup(elsewhere.cleanup)
        self.elsewhere = Path(elsewhere.name)

    def link(self, folder: Path, target: Path) -> None:
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.symlink_to(target, target_is_directory=True)

    def assertRefusedWithNothingAtTarget(self, target: Path) -> None:
        database = sha256(self.db("dev"))
        for module, argv in ((safe_db_update, ["backup", "dev"]),
                             (database_migration, ["backup", "dev"]),
                             (database_migration, ["migrate", "dev"])):
            with self.subTest(command=[module.__name__, *argv]):
                code, out, err = self.run_cli(module, *argv)
                self.assertEqual(code, 1, err)
                self.assertNotIn("Traceback", out + err)
                self.assertIn("symbolic link" if target.exists() else str(self.root / "backups"), err)
                self.assertTrue(err.splitlines()[-1].startswith(f"{module.PROG}: error: "), err)
        self.assertEqual(sha256(self.db("dev")), database)
        self.assertEqual([p for p in self.elsewhere.rglob("*") if p != target], [])

    def test_the_instance_folder_is_a_symbolic_link(self) -> None:
        self.link(self.root / "backups" / "dev", self.elsewhere)
        self.assertRefusedWithNothingAtTarget(self.elsewhere)

    def test_the_database_folder_is_a_symbolic_link(self) -> None:
        self.link(self.root / "backups" / "dev" / "database", self.elsewhere)
        self.assertRefusedWithNothingAtTarget(self.elsewhere)

    def test_the_folder_is_a_symbolic_link_to_nowhere(self) -> None:
        target = self.elsewhere / "missing"
        self.link(self.root / "backups" / "dev" / "database", target)
        self.assertRefusedWithNothingAtTarget(target)
        self.assertFalse(os.path.lexists(target))


if __name__ == "__main__":
    unittest.main()
