"""What a Python migration catches, or does behind the tool's back, cannot make a run
commit: a caught Ctrl-C, a caught refusal of the authorizer, a transaction the
migration's own code ended, a closed connection. Also: --json after an interrupt
after COMMIT, a lost-row refusal under --json, and no bytecode in the project folder
(acceptance findings on issues 8 and 13). Real subprocesses and real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import unittest
from contextlib import closing
from pathlib import Path

import sqlite3

from tests.support import ROOT, ProjectTestCase, query


def python_migration(body: str, head: str = "") -> str:
    return f"{head}\n\ndef up(conn):\n{textwrap.indent(textwrap.dedent(body), '    ')}"


class CaughtTestCase(ProjectTestCase):
    """dev at version 2 with two users; migration 3 is the Python migration under test."""

    def setUp(self) -> None:
        super().setUp()
        self.create()
        self.names = query(self.db(), "SELECT id, name FROM user ORDER BY id")

    def add(self, body: str, head: str = "") -> None:
        self.write_migration("0003_caught.py", python_migration(body, head))

    def history(self) -> list[dict]:
        path = self.root / "backups" / "dev" / "history.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def versions(self) -> list[int]:
        return [v for (v,) in query(self.db(), "SELECT version FROM schema_migrations ORDER BY 1")]

    def assertNothingApplied(self) -> None:
        self.assertEqual(query(self.db(), "SELECT id, name FROM user ORDER BY id"), self.names)
        self.assertEqual(self.versions(), [1, 2])


@unittest.skipUnless(hasattr(signal, "SIGINT") and os.name == "posix", "POSIX signals only")
class CaughtInterruptTests(CaughtTestCase):
    """A real SIGINT from another process while migration 3 sleeps, which catches it."""

    def interrupt_during_migration(self, after: str) -> subprocess.CompletedProcess:
        marker = self.root / "sleeping"
        self.add(f"""
            conn.execute("UPDATE user SET name = 'CHANGED'")
            try:
                open({str(marker)!r}, "w").close()      # the signal comes after this
                time.sleep(30)
            except BaseException as exc:
                print("swallowed", repr(exc))
            {after}
        """, head="import time")
        process = subprocess.Popen([sys.executable, str(ROOT / "database_migration.py"),
                                    "--config", str(self.config), "migrate", "dev", "--yes"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=self.root)
        deadline = time.monotonic() + 30
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def test_a_swallowed_interrupt_fails_the_run_with_130_and_nothing_applied(self) -> None:
        result = self.interrupt_during_migration("conn.execute(\"UPDATE user SET email = email\")")
        self.assertIn("swallowed KeyboardInterrupt", result.stdout)
        self.assertEqual(result.returncode, 130, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertNothingApplied()
        self.assertEqual(self.history()[-1]["outcome"], "failed: interrupted (Ctrl-C or SIGINT)")

    def test_an_interrupt_caught_and_turned_into_another_error_still_exits_130(self) -> None:
        result = self.interrupt_during_migration("raise ValueError('not an interrupt')")
        self.assertEqual(result.returncode, 130, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertNothingApplied()


class CaughtRefusalTests(CaughtTestCase):
    """The raw connection reached through a private attribute (cursor.connection is no
    longer it): what the authorizer refuses fails the run even when it is caught."""

    def test_a_cursor_does_not_hand_out_the_raw_connection(self) -> None:
        self.add("""
            cursor = conn.execute("SELECT 1")
            assert cursor.connection is conn, type(cursor.connection)
            assert cursor.execute("SELECT 2").fetchone() == (2,)
            assert [row for row in conn.execute("SELECT 3")] == [(3,)]
            conn.execute("UPDATE user SET name = 'CHANGED'").connection.set_authorizer(None)
        """)
        code, _, err = self.migrate("dev", "--yes")
        self.assertEqual(code, 1, err)
        self.assertIn("migration 3 (caught) failed: AttributeError", err)
        self.assertIn("rolled back, nothing changed", err)
        self.assertNothingApplied()

    def test_a_commit_refused_through_a_cursor_fails_the_run_even_when_caught(self) -> None:
        self.add("""
            conn.execute("UPDATE user SET name = 'CHANGED'")
            try:
                conn.execute("SELECT 1").execute("COMMIT")
            except Exception:
                pass
        """)
        code, _, err = self.migrate("dev", "--yes")
        self.assertEqual(code, 1, err)
        self.assertNothingApplied()

    def test_a_refusal_on_the_raw_connection_fails_the_run_even_when_caught(self) -> None:
        for statement in ("raw.commit()", "raw.execute('PRAGMA journal_mode = OFF')"):
            with self.subTest(statement=statement):
                self.add(f"""
                    conn.execute("UPDATE user SET name = 'CHANGED'")
                    raw = conn._conn
                    try:
                        {statement}
                    except Exception:
                        pass
                """)
                code, _, err = self.migrate("dev", "--yes")
                self.assertEqual(code, 1, err)
                self.assertIn("migration 3 (caught) failed: not allowed in a migration", err)
                self.assertNothingApplied()
                self.assertEqual(query(self.db(), "PRAGMA journal_mode"), [("delete",)])
                self.assertTrue(self.history()[-1]["outcome"].startswith("failed: "))


class EndedBehindTheToolsBackTests(CaughtTestCase):
    """The migration's own code commits (authorizer removed first): the tool cannot say
    that nothing changed, and does not."""

    def test_a_commit_behind_the_tools_back_is_not_reported_as_nothing_changed(self) -> None:
        for after in ("raise RuntimeError('after the commit')", "conn.execute('SELECT 1')", "pass"):
            with self.subTest(after=after):
                self.add(f"""
                    conn.execute("UPDATE user SET name = 'CHANGED'")
                    raw = conn._conn
                    raw.set_authorizer(lambda *args: 0)   # SQLITE_OK: allow all (None needs 3.11)
                    raw.commit()
                    {after}
                """)
                code, _, err = self.migrate("dev", "--yes")
                self.assertEqual(code, 1, err)
                self.assertNotIn("nothing changed", err)
                self.assertIn("the run's transaction ended inside it", err)
                self.assertIn("changes may have been committed", err)
                backup = self.history()[-1]["backup"]
                self.assertIn(f"restore {backup} (the backup taken before this run) if needed",
                              err)
                outcome = self.history()[-1]["outcome"]
                self.assertTrue(outcome.startswith("failed: ") and "may have been committed"
                                in outcome, outcome)
                # what the message warns about did happen: the update was committed
                self.assertEqual({n for _, n in query(self.db(), "SELECT id, name FROM user")},
                                 {"CHANGED"})
                self.assertEqual(self.versions(), [1, 2])
                with closing(sqlite3.connect(self.db())) as conn:    # back to the start
                    conn.executemany("UPDATE user SET name = ? WHERE id = ?",
                                     [(n, i) for i, n in self.names])
                    conn.commit()

    def test_in_a_dry_run_the_rehearsal_says_where_it_stopped(self) -> None:
        self.add("""
            conn.execute("UPDATE user SET name = 'CHANGED'")
            conn._conn.set_authorizer(lambda *args: 0)
            conn._conn.commit()
        """)
        code, out, err = self.migrate("dev", "--dry-run")
        self.assertEqual(code, 1, err)
        self.assertIn("the run's transaction ended inside it", out + err)
        self.assertIn("the run stopped there", out + err)
        self.assertNotIn("may have been committed", out + err)
        self.assertNothingApplied()

    def test_a_closed_connection_names_the_migration_and_changes_nothing(self) -> None:
        self.add("""
            conn.execute("UPDATE user SET name = 'CHANGED'")
            conn._conn.close()
        """)
        result = self.run_script("database_migration.py", "migrate", "dev", "--yes")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn("migration 3 (caught) failed: its code closed the database connection",
                      result.stderr)
        self.assertNothingApplied()


class JsonDocumentTests(CaughtTestCase):
    """With --json, stdout is one JSON document, whatever happened."""

    def test_an_interrupt_after_commit_prints_the_migrate_document(self) -> None:
        self.write_migration("0003_status.sql", "ALTER TABLE loan ADD COLUMN status TEXT;")
        result = self.run_script("database_migration.py", "migrate", "dev", "--yes", "--json",
                                 env={"DB_MIGRATION_TEST_SIGINT_AFTER_COMMIT": "1"})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("interrupted after COMMIT", result.stderr)
        document = json.loads(result.stdout)
        self.assertEqual((document["from_version"], document["to_version"], document["applied"],
                          document["interrupted"]), (2, 3, [3], "after commit"))
        self.assertNotIn("error", document)
        self.assertEqual(self.versions(), [1, 2, 3])

    def test_a_lost_row_refusal_prints_the_error_document(self) -> None:
        self.write_migration("0003_gone.py", python_migration('conn.execute("DELETE FROM payment")'))
        result = self.run_script("database_migration.py", "migrate", "dev", "--yes", "--json")
        self.assertEqual(result.returncode, 1, result.stderr)
        document = json.loads(result.stdout)
        self.assertEqual(document["exit_code"], 1)
        self.assertIn("lost-row guard", document["error"])
        self.assertIn("--allow-row-loss payment", document["error"])
        self.assertEqual(query(self.db(), "SELECT COUNT(*) FROM payment"), [(2,)])


class NoBytecodeTests(ProjectTestCase):
    """A copy of the project run with PYTHONDONTWRITEBYTECODE unset writes no __pycache__."""

    def test_no_command_writes_bytecode_into_the_project_folder(self) -> None:
        for script in ("database_migration.py", "safe_db_update.py"):
            shutil.copy2(ROOT / script, self.root / script)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE",
                                                                "PYTHONPYCACHEPREFIX")}
        commands = (("database_migration.py", "migrate-all", "--dry-run", "--create"),
                    ("database_migration.py", "migrate", "dev", "--create"),
                    ("database_migration.py", "status"),
                    ("safe_db_update.py", "backup", "dev"))
        for command in commands:
            result = subprocess.run([sys.executable, command[0], "--config", str(self.config),
                                     *command[1:]], capture_output=True, text=True,
                                    stdin=subprocess.DEVNULL, cwd=self.root, env=env, timeout=60)
            self.assertEqual(result.returncode, 0, (command, result.stderr))
        self.assertEqual(sorted(str(p.relative_to(self.root)) for p in self.root.rglob("__pycache__")),
                         [])


if __name__ == "__main__":
    unittest.main()
