"""Virtual tables' shadow tables (fts5's docs_data, rtree's box_node, ...) are the
engine's: the lost-row guard, drift and dry-run shapes count and compare the virtual
table, not them (acceptance finding on issue 8). Real FTS5, FTS4 and R*Tree tables."""

from __future__ import annotations

import sqlite3
import unittest
from contextlib import closing

from tests.support import ProjectTestCase, database_migration, query


def has_module(module: str, arguments: str) -> bool:
    with closing(sqlite3.connect(":memory:")) as conn:
        try:
            conn.execute(f"CREATE VIRTUAL TABLE t USING {module}({arguments})")
        except sqlite3.OperationalError:
            return False
    return True


@unittest.skipUnless(has_module("fts5", "body") and has_module("fts4", "body")
                     and has_module("rtree", "id, x0, x1"), "SQLite without FTS5, FTS4 or R*Tree")
class ShadowTableTests(ProjectTestCase):
    """dev at version 3, with FTS5, FTS4 and R*Tree tables filled by 200 single-row commits."""

    def setUp(self) -> None:
        super().setUp()
        self.write_migration("0003_search.sql", "CREATE VIRTUAL TABLE docs USING fts5(body);\n"
                                                "CREATE VIRTUAL TABLE notes USING fts4(body);\n"
                                                "CREATE VIRTUAL TABLE box USING rtree(id, x0, x1);\n")
        code, _, err = self.migrate("dev", "--create")
        self.assertEqual(code, 0, err)
        with closing(sqlite3.connect(self.db())) as conn:
            for i in range(200):          # one segment per commit: 'optimize' merges them
                conn.execute("INSERT INTO docs (body) VALUES (?)", (f"hello world {i}",))
                conn.execute("INSERT INTO notes (body) VALUES (?)", (f"hello world {i}",))
                conn.execute("INSERT INTO box VALUES (?, ?, ?)", (i, i, i + 1))
                conn.commit()

    def test_merging_a_full_text_index_is_not_lost_rows(self) -> None:
        segments = query(self.db(), "SELECT COUNT(*) FROM docs_data")[0][0]
        self.write_migration("0004_optimize.sql", "INSERT INTO docs (docs) VALUES ('optimize');\n"
                                                  "INSERT INTO notes (notes) VALUES ('optimize');\n")
        code, out, err = self.migrate("dev", "--yes")
        self.assertEqual(code, 0, err)
        self.assertIn("applied 0004", out)
        self.assertLess(query(self.db(), "SELECT COUNT(*) FROM docs_data")[0][0], segments)
        self.assertEqual(query(self.db(), "SELECT COUNT(*) FROM docs WHERE docs MATCH 'hello'"),
                         [(200,)])

    def test_rows_lost_from_the_virtual_table_itself_are_still_refused(self) -> None:
        self.write_migration("0004_purge.py", "def up(conn):\n"
                                              "    conn.execute(\"DELETE FROM docs WHERE rowid > 100\")\n")
        code, _, err = self.migrate("dev", "--yes")
        self.assertEqual(code, 1, err)
        self.assertIn("table docs had 200 rows before the run and has 100", err)
        self.assertIn("--allow-row-loss docs", err)
        self.assertNotIn("docs_", err)
        self.assertEqual(query(self.db(), "SELECT COUNT(*) FROM docs"), [(200,)])

    def test_shadow_tables_are_known_and_left_out_of_drift_and_dry_run_shapes(self) -> None:
        with closing(sqlite3.connect(self.db())) as conn:
            shadows = database_migration.shadow_tables(conn)
            schema = database_migration.schema_of(conn)
            shapes = database_migration.table_shapes(conn)
        self.assertEqual(shadows, {"docs_data", "docs_idx", "docs_content", "docs_docsize",
                                   "docs_config", "notes_content", "notes_segments",
                                   "notes_segdir", "notes_docsize", "notes_stat", "box_node",
                                   "box_parent", "box_rowid"})
        self.assertEqual(sorted(k for k in schema if k.startswith("table ")),
                         ["table box", "table docs", "table loan", "table notes", "table payment",
                          "table user"])
        self.assertEqual(sorted(shapes), ["box", "docs", "loan", "notes", "payment", "user"])
        code, out, err = self.run_cli(database_migration, "status")
        self.assertEqual(code, 0, err)
        self.assertIn("up to date", out)

    def test_a_virtual_table_made_with_other_arguments_is_drift(self) -> None:
        with closing(sqlite3.connect(self.db())) as conn:
            conn.execute("DROP TABLE docs")
            conn.execute("CREATE VIRTUAL TABLE docs USING fts5(body, tokenize = 'porter')")
            conn.commit()
        code, out, err = self.run_cli(database_migration, "status")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"dev +3 +3 +0 +drift")
        code, out, err = self.run_cli(database_migration, "check", "dev")
        self.assertIn("table docs: different SQL", out + err)
        self.assertNotIn("docs_", out + err)


if __name__ == "__main__":
    unittest.main()
