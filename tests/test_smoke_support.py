from tests.support import ProjectTestCase, query


class SupportTests(ProjectTestCase):
    def test_create_makes_the_latest_schema_with_rows(self) -> None:
        path = self.create()
        self.assertEqual(query(path, "SELECT MAX(version) FROM schema_migrations"), [(2,)])
        self.assertEqual(query(path, "SELECT COUNT(*) FROM payment"), [(2,)])
