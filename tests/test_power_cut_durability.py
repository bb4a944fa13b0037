"""Durable across a power cut (issue 14): a torn audit line, new folders made durable
before they are relied on, and a journal's deletion made durable before the file shrinks.

A power cut keeps a create, rename or unlink only once its folder is fsynced. The order
of the calls is what matters, so the tests record them with strace (skipped where strace
is missing or cannot trace) and check it."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import unittest
from contextlib import closing
from pathlib import Path

from tests.support import ROOT, ProjectTestCase, database_migration, query, safe_db_update


def strace_works() -> str:
    """Why the strace tests cannot run here, or '' when they can."""
    if shutil.which("strace") is None:
        return "strace is not installed"
    probe = subprocess.run(["strace", "-f", "-o", "/dev/null", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"strace cannot trace here: {probe.stderr.decode(errors='replace').strip()[:100]}"
    return ""


STRACE_MISSING = strace_works()
CALL = re.compile(r"^\d+\s+(\w+)\((.*)$")
QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
FD_PATH = re.compile(r"^\d+<([^>]*)>")


class Calls:
    """The file-system calls of one command, in order, as strace -f -y wrote them."""

    def __init__(self, text: str) -> None:
        self.calls = []
        for line in text.splitlines():
            match = CALL.match(line)
            if match and "resumed>" not in line:
                self.calls.append((match[1], match[2], line))

    def where(self, test) -> list[int]:
        return [i for i, (name, args, line) in enumerate(self.calls) if test(name, args, line)]

    def made_folders(self) -> list[tuple[int, Path]]:
        return [(i, Path(QUOTED.search(self.calls[i][1])[1]))
                for i in self.where(lambda n, a, l: n in ("mkdir", "mkdirat") and l.endswith("= 0"))]

    def synced(self, folder: Path, after: int) -> int | None:
        """Index of the first fsync or fdatasync of folder after `after`, or None."""
        for i in self.where(lambda n, a, l: n in ("fsync", "fdatasync")):
            fd = FD_PATH.match(self.calls[i][1])
            if i > after and fd and Path(fd[1]) == folder:
                return i
        return None

    def first(self, test, after: int = -1) -> int:
        found = [i for i in self.where(test) if i > after]
        return found[0] if found else len(self.calls)

    def last(self, test, before: int) -> int | None:
        found = [i for i in self.where(test) if i < before]
        return found[-1] if found else None


def paths(args: str) -> list[str]:
    return QUOTED.findall(args)


def unlinks(path: Path):
    return lambda name, args, line: name in ("unlink", "unlinkat") and paths(args)[-1:] == [str(path)]


def renames(source: Path | None = None, target: Path | None = None):
    def test(name, args, line) -> bool:
        found = paths(args)
        return name.startswith("rename") and len(found) == 2 and line.endswith("= 0") \
            and (source is None or found[0] == str(source)) \
            and (target is None or found[1] == str(target))
    return test


def creates_journal(name, args, line) -> bool:
    return name in ("open", "openat") and '-journal"' in args and "O_CREAT" in args


def writes_stdout(name, args, line) -> bool:
    return name == "write" and (args.startswith("1<") or args.startswith("1,"))


class TornHistoryLineTests(ProjectTestCase):
    """A power cut can leave a prefix of the last audit line; the next line starts fresh."""

    def history_file(self) -> Path:
        return self.root / "backups" / "dev" / "history.jsonl"

    def test_after_a_torn_last_line_the_next_entry_is_kept_and_the_torn_one_is_reported(self) -> None:
        self.create()
        code, _, err = self.run_cli(safe_db_update, "backup", "dev")
        self.assertEqual(code, 0, err)
        data = self.history_file().read_bytes()
        last = data.rstrip(b"\n").rfind(b"\n") + 1           # where the backup's line starts
        self.history_file().write_bytes(data[:last + (len(data) - last) // 2])   # cut in half
        code, _, err = self.run_cli(safe_db_update, "backup", "dev")
        self.assertEqual(code, 0, err)
        lines = self.history_file().read_bytes().split(b"\n")
        self.assertEqual(len(lines), 4)                     # migrate, torn backup, backup, ''
        self.assertEqual(json.loads(lines[2])["operation"], "backup")

        code, out, err = self.run_cli(database_migration, "history", "dev")
        self.assertEqual(code, 0, err)
        self.assertEqual([line.split()[2] for line in out.splitlines()[:2]], ["migrate", "backup"])
        self.assertIn("dev: 1 unreadable line(s) in", out.splitlines()[2])
        self.assertIn("(line 2)", out)
        code, out, err = self.run_cli(database_migration, "history", "dev", "--json")
        self.assertEqual(code, 0, err)
        data = json.loads(out)
        self.assertEqual([e["operation"] for e in data["entries"]], ["migrate", "backup"])
        self.assertEqual(data["unreadable_lines"], [2])

    def test_a_history_that_ends_in_a_newline_gets_no_blank_line(self) -> None:
        self.create()
        for _ in range(2):
            code, _, err = self.run_cli(safe_db_update, "backup", "dev")
            self.assertEqual(code, 0, err)
        text = self.history_file().read_text(encoding="utf-8")
        self.assertNotIn("\n\n", text)
        code, out, err = self.run_cli(database_migration, "history", "dev", "--json")
        self.assertEqual((len(json.loads(out)["entries"]), json.loads(out)["unreadable_lines"]),
                         (3, []))

    def test_lines_that_are_json_but_not_an_entry_are_unreadable_too(self) -> None:
        self.create()
        with open(self.history_file(), "a", encoding="utf-8") as handle:
            handle.write('[1, 2]\n"text"\n\n')
        code, out, err = self.run_cli(database_migration, "history", "dev")
        self.assertEqual(code, 0, err)
        self.assertNoTraceback(err)
        self.assertIn("2 unreadable line(s)", out)
        self.assertIn("(line 2, 3)", out)


@unittest.skipIf(STRACE_MISSING, STRACE_MISSING)
class SyscallOrderTests(ProjectTestCase):
    """strace -f of one command as a real subprocess; the order of its calls."""

    ini = """[DEFAULT]
busy_timeout = 2

[dev]
path = instance/dev.db

[tenants]
path = tenants/*.db
"""

    def trace(self, script: str, *argv: str) -> Calls:
        log = self.root.parent / f"{self.root.name}.strace"
        self.addCleanup(lambda: log.unlink() if log.exists() else None)
        result = subprocess.run(["strace", "-f", "-y", "-o", str(log), "-e",
                                 "trace=%file,fsync,fdatasync,ftruncate,write",
                                 sys.executable, str(ROOT / script), "--config", str(self.config),
                                 *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                cwd=self.root, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        return Calls(log.read_text(encoding="utf-8", errors="replace"))

    def assertFoldersDurable(self, calls: Calls, *expected: Path) -> None:
        """Each folder made is followed by an fsync of its parent, before the migration's
        first write (its journal) and before the command reports anything."""
        made = [(i, folder) for i, folder in calls.made_folders() if self.root in folder.parents
                or folder == self.root]
        self.assertEqual(sorted(str(folder) for _, folder in made),
                         sorted(str(folder) for folder in expected))
        for index, folder in made:
            with self.subTest(folder=str(folder)):
                synced = calls.synced(folder.parent, after=index)
                self.assertIsNotNone(synced, f"{folder.parent} never synced after mkdir {folder}")
                self.assertLess(synced, calls.first(writes_stdout))
                self.assertLess(synced, calls.first(creates_journal, after=index))

    def test_the_first_migrate_makes_its_backup_folders_durable_before_it_writes(self) -> None:
        with closing(sqlite3.connect(self.db())) as conn:       # an empty database, no backups
            conn.execute("PRAGMA user_version = 7")
        calls = self.trace("database_migration.py", "migrate", "dev")
        backups = self.root / "backups"
        self.assertFoldersDurable(calls, backups, backups / "dev", backups / "dev" / "database")
        self.assertEqual(query(self.db(), "SELECT MAX(version) FROM schema_migrations"), [(2,)])
        # The commit itself: the journal's deletion is made durable before it is reported.
        unlinked = calls.last(unlinks(Path(f"{self.db()}-journal")), before=calls.first(writes_stdout))
        self.assertIsNotNone(unlinked)
        self.assertIsNotNone(calls.synced(self.db().parent, after=unlinked))
        self.assertLess(calls.synced(self.db().parent, after=unlinked), calls.first(writes_stdout))

    def test_a_migration_that_shrinks_the_file_syncs_the_journal_deletion_before_truncating(
            self) -> None:
        self.create()
        with closing(sqlite3.connect(self.db())) as conn:
            conn.execute("PRAGMA auto_vacuum = FULL")
            conn.execute("VACUUM")                  # auto_vacuum takes effect on a VACUUM
            conn.execute("CREATE TABLE filler (text TEXT)")
            conn.executemany("INSERT INTO filler VALUES (?)", [("x" * 1000,)] * 2000)
            conn.commit()
        self.write_migration("0003_drop_filler.sql", "DROP TABLE filler;\n")
        grown = self.db().stat().st_size
        calls = self.trace("database_migration.py", "migrate", "dev", "--yes")
        self.assertLess(self.db().stat().st_size, grown // 10)
        self.assertEqual(query(self.db(), "SELECT MAX(version) FROM schema_migrations"), [(3,)])
        self.assertJournalGoneBeforeTruncate(calls)

    def assertJournalGoneBeforeTruncate(self, calls: Calls) -> None:
        truncated = calls.first(lambda n, a, l: n == "ftruncate" and re.match(
            rf"\d+<{re.escape(str(self.db()))}>", a))
        self.assertLess(truncated, len(calls.calls), "the file was never truncated")
        unlinked = calls.last(unlinks(Path(f"{self.db()}-journal")), before=truncated)
        self.assertIsNotNone(unlinked, "no journal deleted before the truncate")
        synced = calls.synced(self.db().parent, after=unlinked)
        self.assertIsNotNone(synced)
        self.assertLess(synced, truncated, "the truncate came before the journal's deletion "
                                           "was durable")

    def test_create_in_a_fleet_makes_the_database_folder_and_its_name_durable(self) -> None:
        calls = self.trace("database_migration.py", "migrate", "tenants/acme", "--create")
        backups = self.root / "backups"
        self.assertFoldersDurable(calls, self.root / "tenants", backups, backups / "tenants",
                                  backups / "tenants" / "acme")
        database = self.root / "tenants" / "acme.db"
        linked = calls.first(lambda n, a, l: n in ("link", "linkat") and f'"{database}"' in a)
        self.assertLess(linked, len(calls.calls))
        synced = calls.synced(database.parent, after=linked)
        self.assertIsNotNone(synced, "the new database's name was never made durable")
        self.assertLess(synced, calls.first(writes_stdout))
        self.assertEqual(query(database, "SELECT MAX(version) FROM schema_migrations"), [(2,)])

    def test_a_restore_that_shrinks_the_file_syncs_the_journal_deletion_before_truncating(self) -> None:
        self.create()
        code, _, err = self.run_cli(safe_db_update, "backup", "dev")
        self.assertEqual(code, 0, err)
        with closing(sqlite3.connect(self.db())) as conn:
            conn.execute("CREATE TABLE filler (text TEXT)")
            conn.executemany("INSERT INTO filler VALUES (?)", [("x" * 1000,)] * 2000)
            conn.commit()
        grown = self.db().stat().st_size
        calls = self.trace("safe_db_update.py", "restore", "dev", "--yes")
        self.assertLess(self.db().stat().st_size, grown // 10)
        self.assertEqual(query(self.db(), "PRAGMA integrity_check"), [("ok",)])
        self.assertEqual(query(self.db(), "SELECT COUNT(*) FROM user"), [(2,)])
        self.assertJournalGoneBeforeTruncate(calls)

    def test_replacing_an_unreadable_file_makes_its_old_journal_go_for_good_first(self) -> None:
        self.create()
        code, _, err = self.run_cli(safe_db_update, "backup", "dev")
        self.assertEqual(code, 0, err)
        self.db().write_bytes(b"not a database at all" * 100)
        journal = Path(f"{self.db()}-journal")
        journal.write_bytes(b"a journal that belongs to the damaged file" * 100)
        calls = self.trace("safe_db_update.py", "restore", "dev", "--yes")
        self.assertFalse(journal.exists())
        self.assertEqual(query(self.db(), "SELECT COUNT(*) FROM user"), [(2,)])
        moved = calls.first(renames(source=journal))
        replaced = calls.first(renames(target=self.db()))
        self.assertLess(moved, replaced)
        self.assertLess(replaced, len(calls.calls))
        synced = calls.synced(self.db().parent, after=moved)
        self.assertIsNotNone(synced)
        self.assertLess(synced, replaced)


if __name__ == "__main__":
    unittest.main()
