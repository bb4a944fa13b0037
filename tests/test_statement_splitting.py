"""Splitting scripts into statements: linear time, SQLite's own cuts, and scripts that never end.

split_statements follows the state machine of sqlite3_complete in one pass. These
tests hold it to sqlite3.complete_statement itself on generated scripts (whole,
cut at random places, and random token soup), time it on 40,000 statements, and
check the one-line error for a script that ends inside a quote, a comment or a
trigger body.
"""

from __future__ import annotations

import random
import sqlite3
import time
import unittest

from tests.support import ProjectTestCase, database_migration, query
from tests.test_hostile_inputs import TRICKY, ScriptWriter

split_statements = database_migration.split_statements
CommandError = database_migration.CommandError

TRIALS = 400
SOUP = TRICKY + ("CREATE", "TEMP", "TRIGGER", "temporary", "EXPLAIN", "end", "xend", "[", "/",
                 "-", "*", "a", "1", "\u00e9nd", "$", "\t", "\r\n", "\f")


def split_by_complete_statement(script: str) -> list[str]:
    """The splitter as it was: ask sqlite3.complete_statement at every ';' (quadratic)."""
    statements, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            statements.append(pending)
            pending = ""
    statements.append(pending[:-1])
    normalise = database_migration.normalise
    cleaned = [normalise(s)[:-1] if normalise(s).endswith(";") else normalise(s) for s in statements]
    return [s.strip() for s in cleaned if database_migration.bare_sql(s)]


def generated_scripts():
    """Valid scripts, the same cut at a random place, and random soups of tricky tokens."""
    rng = random.Random(8)
    for seed in range(TRIALS):
        script = ScriptWriter(seed).script()
        yield f"whole {seed}", script
        yield f"cut {seed}", script[:rng.randrange(len(script) + 1)]
        yield f"soup {seed}", " ".join(rng.choice(SOUP) for _ in range(rng.randint(1, 40)))


class SameCutsAsCompleteStatementTests(unittest.TestCase):
    def test_statements_are_those_complete_statement_makes_or_the_script_never_ends(self) -> None:
        errors = 0
        for label, script in generated_scripts():
            with self.subTest(label, script=script):
                ends = sqlite3.complete_statement(script + "\n;")
                try:
                    statements = split_statements(script)
                except CommandError as exc:
                    errors += 1
                    self.assertFalse(ends, f"refused a script that ends: {exc}")
                    self.assertEqual(exc.exit_code, 2)
                    continue
                self.assertTrue(ends, "accepted a script that ends inside a quote, comment or trigger")
                self.assertEqual(statements, split_by_complete_statement(script))
        self.assertGreater(errors, TRIALS // 4, "the generator should make unfinished scripts")

    def test_every_cut_is_where_complete_statement_first_says_complete(self) -> None:
        for label, script in generated_scripts():
            try:
                statements = split_statements(script)
            except CommandError:
                continue
            for statement in statements:
                with self.subTest(label, statement=statement):
                    self.assertTrue(sqlite3.complete_statement(statement + "\n;"))


class LinearTimeTests(unittest.TestCase):
    """Today's bound: 40,000 statements split in well under a second (they took 9 s)."""

    BODY = "INSERT INTO loan (id, note) VALUES (1, 'paid; in full');\n" * 40_000
    BOUND = 2.0                 # seconds; about 0.1 s on an idle machine

    def timed(self, script: str):
        started = time.perf_counter()
        try:
            result = split_statements(script, "0003_big.sql")
        except CommandError as exc:
            result = exc
        return result, time.perf_counter() - started

    def test_forty_thousand_statements_split_quickly(self) -> None:
        statements, seconds = self.timed(self.BODY)
        self.assertEqual(len(statements), 40_000)
        self.assertLess(seconds, self.BOUND)

    def test_forty_thousand_statements_after_an_unclosed_quote_are_refused_quickly(self) -> None:
        for opener in ("'", "/*", '"', "[", "CREATE TRIGGER t AFTER INSERT ON loan BEGIN\n"):
            with self.subTest(opener=opener):
                error, seconds = self.timed("CREATE TABLE a (x);\n" + opener + self.BODY)
                self.assertIsInstance(error, CommandError)
                self.assertLess(seconds, self.BOUND)


class ScriptThatNeverEndsTests(ProjectTestCase):
    """A migration file that ends inside a quote, comment or trigger body: exit 2, file and line."""

    CASES = {
        "quote": ("INSERT INTO loan (id, user_id, amount) VALUES (1, 1, 'ten);\n"
                  "UPDATE loan SET amount = 0;\n", "a ' quote opened on line 4"),
        "comment": ("/* the loan status;\nALTER TABLE loan ADD COLUMN status TEXT;\n",
                    "a /* comment opened on line 4"),
        "trigger": ("CREATE TRIGGER loan_log AFTER INSERT ON loan BEGIN\n"
                    "  UPDATE loan SET amount = amount WHERE id = new.id;\n",
                    "its trigger body (BEGIN without END;)"),
    }

    def write_unfinished(self, body: str):
        return self.write_migration("0003_unfinished.sql",
                                    "-- migrate:up\nALTER TABLE loan ADD COLUMN note TEXT;\n\n"
                                    + body + "-- migrate:down\nSELECT 1;\n")

    def test_every_command_refuses_it_naming_the_file_and_the_line(self) -> None:
        db = self.create()
        before = db.read_bytes()
        for case, (body, what) in self.CASES.items():
            path = self.write_unfinished(body)
            for argv in (("status",), ("migrate", "dev", "--yes"), ("check", "dev")):
                with self.subTest(case=case, command=argv[0]):
                    result = self.run_script("database_migration.py", *argv)
                    self.assertEqual(result.returncode, 2, result.stderr)
                    self.assertEqual(result.stdout, "")
                    self.assertNoTraceback(result.stderr)
                    self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
                    self.assertIn(str(path), result.stderr)
                    self.assertIn("line 4: this statement never ends", result.stderr)
                    self.assertIn(what, result.stderr)
        self.assertEqual(db.read_bytes(), before)

    def test_the_line_is_the_files_in_the_down_part_too(self) -> None:
        path = self.write_migration("0003_unfinished.sql",
                                    "-- migrate:up\nSELECT 1;\n-- migrate:down\nSELECT 2;\n"
                                    "SELECT 'x;\n")
        code, out, err = self.run_cli(database_migration, "status")
        self.assertEqual((code, out), (2, ""), err)
        self.assertIn(f"{path}: migration 3 (down part): line 5: this statement never ends", err)

    def test_a_last_statement_without_its_semicolon_is_still_a_statement(self) -> None:
        db = self.create()
        self.write_migration("0003_no_semicolon.sql",
                             "-- migrate:up\nCREATE TRIGGER loan_log AFTER INSERT ON loan BEGIN\n"
                             "  UPDATE loan SET amount = amount WHERE id = new.id;\nEND\n"
                             "-- trailing comment, no newline after it")
        code, _, err = self.migrate("dev")
        self.assertEqual(code, 0, err)
        self.assertEqual(query(db, "SELECT type FROM sqlite_master WHERE name = 'loan_log'"),
                         [("trigger",)])
        self.assertEqual(query(db, "SELECT MAX(version) FROM schema_migrations"), [(3,)])

if __name__ == "__main__":
    unittest.main()
