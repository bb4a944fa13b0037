"""Registries that used to mislead silently: brackets in a path, a fleet with no
members, and two instance names for one file."""

from __future__ import annotations

import json
import os
import unittest
from pathlib import Path

from tests.support import ProjectTestCase, database_migration, query, safe_db_update


class BracketsInAPathTests(ProjectTestCase):
    ini = """[DEFAULT]
busy_timeout = 2

[prod]
path = data[1]/prod.db

[dev]
path = data?/dev.db

[tenants]
path = t[1]/*.db
"""

    def test_brackets_and_question_marks_are_ordinary_characters_of_a_file_name(self) -> None:
        for name in ("prod", "dev", "tenants/acme"):
            code, _, err = self.migrate(name, "--create")
            self.assertEqual(code, 0, err)
        self.assertTrue((self.root / "data[1]" / "prod.db").is_file())
        self.assertTrue((self.root / "data?" / "dev.db").is_file())
        self.assertTrue((self.root / "t[1]" / "acme.db").is_file())
        code, out, err = self.run_cli(database_migration, "status", "--json")
        self.assertEqual(code, 0, err)
        data = json.loads(out)
        self.assertEqual([(i["name"], i["state"]) for i in data["instances"]],
                         [("prod", "up to date"), ("dev", "up to date"),
                          ("tenants/acme", "up to date")])
        self.assertEqual(data["empty_fleets"], [])
        code, out, err = self.run_cli(safe_db_update, "backup", "--all", "--json")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(sorted(Path(b["path"]).parent.parent.name
                                for b in json.loads(out)["backups"]), ["acme", "dev", "prod"])

    def test_a_file_whose_name_the_pattern_would_match_is_not_taken_for_it(self) -> None:
        (self.root / "data1").mkdir()
        (self.root / "data1" / "prod.db").write_bytes(b"")     # what 'data[1]' matches as a glob
        code, out, err = self.run_cli(database_migration, "status", "prod", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual([(i["path"], i["state"]) for i in json.loads(out)["instances"]],
                         [(str(self.root / "data[1]" / "prod.db"), "missing")])


class EmptyFleetIsNeverSilentTests(ProjectTestCase):
    ini = """[DEFAULT]
busy_timeout = 2

[dev]
path = instance/dev.db

[tenants]
path = tenants/*.db
"""

    def test_status_shows_the_fleet_with_a_line_saying_it_has_no_members(self) -> None:
        self.create("dev")
        code, out, err = self.run_cli(database_migration, "status")
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"tenants: a fleet with no members: no file matches "
                      f"{self.root / 'tenants' / '*.db'}", out)
        code, out, err = self.run_cli(database_migration, "status", "--json")
        self.assertEqual(json.loads(out)["empty_fleets"],
                         [{"name": "tenants", "path": str(self.root / "tenants" / "*.db")}])

    def test_backup_all_says_so_exits_1_and_still_backs_up_the_others(self) -> None:
        self.create("dev")
        result = self.run_script("safe_db_update.py", "backup", "--all", "--quiet")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr.strip().splitlines(),
                         [f"safe_db_update.py: error: tenants: a fleet with no members: no file "
                          f"matches {self.root / 'tenants' / '*.db'}; nothing backed up for it"])
        self.assertEqual(len(self.backups("dev")), 1)

    def test_backup_of_the_empty_fleet_by_name_says_so(self) -> None:
        code, out, err = self.run_cli(safe_db_update, "backup", "tenants")
        self.assertEqual(code, 1, err)
        self.assertIn("tenants: a fleet with no members", err)


class OneFileTwoNamesTests(ProjectTestCase):
    ini = """[DEFAULT]
busy_timeout = 2

[prod]
path = instance/prod.db

[prod2]
path = instance/../instance/prod.db

[dev]
path = instance/dev.db
"""

    def setUp(self) -> None:
        super().setUp()
        self.prod = self.root / "instance" / "prod.db"
        self.create("dev")
        code, _, err = self.migrate("prod", "--dry-run", "--create")   # a dry run writes nothing
        self.assertEqual(code, 0, err)
        self.prod.write_bytes(self.db("dev").read_bytes())

    def test_status_reports_both_names(self) -> None:
        code, out, err = self.run_cli(database_migration, "status", "--json")
        self.assertEqual(code, 0, err)
        same = {i["name"]: i.get("same_file_as") for i in json.loads(out)["instances"]}
        self.assertEqual(same, {"prod": ["prod2"], "prod2": ["prod"], "dev": None})
        code, out, err = self.run_cli(database_migration, "status")
        self.assertIn("(same file as prod2: write commands refuse it)", out)

    def test_write_commands_refuse_with_exit_2_naming_both(self) -> None:
        self.write_migration("0003_extra.sql", "CREATE TABLE extra (id INTEGER PRIMARY KEY);\n")
        code, out, err = self.run_cli(safe_db_update, "backup", "dev", "--json")
        self.dev_backup = json.loads(out)["path"]
        before = self.prod.read_bytes()
        for module, argv in ((safe_db_update, ["backup", "prod"]),
                             (safe_db_update, ["backup", "prod2"]),
                             (database_migration, ["migrate", "prod2"]),
                             (database_migration, ["migrate", "prod", "--yes"]),
                             (safe_db_update, ["restore", "prod", str(self.dev_backup), "--yes"])):
            with self.subTest(argv=argv):
                code, out, err = self.run_cli(module, *argv)
                self.assertEqual(code, 2, out + err)
                self.assertNoTraceback(err)
                self.assertIn("'prod'", err)
                self.assertIn("'prod2'", err)
                self.assertIn("same file", err)
        self.assertEqual(self.prod.read_bytes(), before)
        self.assertEqual(self.backups("prod") + self.backups("prod2"), [])
        code, _, err = self.migrate("prod", "--dry-run")            # reading is fine
        self.assertEqual(code, 0, err)

    def test_two_names_for_a_file_not_made_yet_are_refused_by_create(self) -> None:
        self.prod.unlink()
        code, _, err = self.migrate("prod2", "--create")
        self.assertEqual(code, 2, err)
        self.assertIn("same file", err)
        self.assertFalse(self.prod.exists())

    def test_a_hard_link_is_the_same_file_too(self) -> None:
        self.config.write_text(self.ini.replace("instance/../instance/prod.db",
                                                "instance/other.db"), encoding="utf-8")
        os.link(self.prod, self.root / "instance" / "other.db")
        code, _, err = self.run_cli(safe_db_update, "backup", "prod2")
        self.assertEqual(code, 2, err)
        self.assertIn("same file", err)
        code, _, err = self.run_cli(safe_db_update, "backup", "dev")
        self.assertEqual(code, 0, err)
        self.assertEqual(query(self.db("dev"), "SELECT COUNT(*) FROM user"), [(2,)])


if __name__ == "__main__":
    unittest.main()
