"""Versioned schema migrations for the SQLite instances named in instances.ini.

usage: python database_migration.py [--config PATH] [--json] [-q] [-y] COMMAND ...

Every change is backed up first, applied in one transaction, and checked before
it commits; see DATABASE_MIGRATION_README.md.
"""

from __future__ import annotations

try:    # a Ctrl-C that arrives before the signal is held back: one line and 130 all the same
    import os
    import signal
    import sys

    # Run as a command (this script, or the database-migration console script), not imported:
    # Ctrl-C is held back while the modules below load and the arguments are read, and
    # delivered as the command starts (see run()): one line and exit 130, not a traceback.
    if hasattr(signal, "pthread_sigmask") and (
            __name__ == "__main__" or os.path.basename(sys.argv[0]) == "database-migration"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
except KeyboardInterrupt:
    import os
    import sys
    if __name__ != "__main__" and os.path.basename(sys.argv[0]) != "database-migration":
        raise
    sys.stderr.write(f"{os.path.basename(sys.argv[0])}: interrupted\n")
    raise SystemExit(130) from None

# Run as a script (or a --jobs worker started afresh): the import of safe_db_update below
# would write __pycache__/ into the project folder. No command writes bytecode there.
if __name__ in ("__main__", "__mp_main__"):
    sys.dont_write_bytecode = True

import argparse
import ast
import calendar
import contextlib
import datetime
import functools
import hashlib
import io
import json
import re
import shlex
import shutil
import sqlite3
import tempfile
import threading
import time
import traceback
import types
from contextlib import closing, contextmanager, redirect_stderr, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from safe_db_update import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, NOT_INTERNAL, VERSION,
                            Backup, CommandError, Instance, Progress, Table, add_backup_command,
                            add_command, audited, backup_time, backup_with_retention, confirm,
                            connect, copy_through, describe_error, describe_table, emergency_step,
                            emit, empty_fleets, find_config, first_problem, fsync_path, get_instance,
                            hold_interrupts, instance_lock, integrity_problems, is_busy,
                            keep_owner_and_mode, list_backups, load_instances, locked_message,
                            lost_database_step, make_folders, make_private_folder, missing_database,
                            newest_verified, open_private, open_readonly,
                            program, progress_line, read_config, read_history, require_database,
                            resolve, root_parser, run, select_instances, set_aside_sidecars,
                            shows_progress, signs_of_a_lost_database, started_as, sync_new_folders,
                            tool_command)
from safe_db_update import InterruptedAfterCommit

# --- Constants ---------------------------------------------------------------

PROG = "database_migration.py"
__version__ = VERSION               # one version for both CLIs

SCHEMA_RECORDS = "python-schema"    # <backup_dir>/<name>/python-schema/<version>.json
MIGRATION_FILE = re.compile(r"(?P<version>\d+)_(?P<description>.+)\.(?P<kind>sql|py)")
# Other runners' layouts, read as they are (see 'Coming from another tool' in the manual).
DBMATE_FILE = re.compile(r"(?P<version>\d+)-(?P<description>.+)\.sql")
PAIRED_FILE = re.compile(r"(?P<version>\d+)_(?P<description>.+)\.(?P<part>up|down)\.sql")
DIESEL_FOLDER = re.compile(r"(?P<version>\d[\d-]*)_(?P<description>.+)")
PLAIN, PAIRED, DIESEL = "plain", "paired", "Diesel"
PYTHON = "Python"       # NNNN_description.py: at the top level of any layout's folder
HALF_MIGRATED = "half-migrated by"      # how an untracked reason starts when a runner stopped half-way
LAYOUT_NAMES = {
    PLAIN: "one NNNN_description.sql file per migration (this tool, dbmate, sqlx)",
    PAIRED: "NNNN_description.up.sql with .down.sql (golang-migrate, sqlx)",
    DIESEL: "a folder per migration holding up.sql and down.sql (Diesel)",
}
UNFILLED = "-- TODO: write this part's SQL here, then delete this line (until then every command refuses it)"
MARKER = re.compile(r"^\s*--\s*migrate:(?P<part>up|down)\b.*$", re.IGNORECASE)
DESTRUCTIVE = (
    ("DROP TABLE", re.compile(r"^DROP\s+TABLE\b")),
    ("DROP COLUMN", re.compile(r"^ALTER\s+TABLE\b.*\bDROP\b")),
    ("DELETE", re.compile(r"^(WITH\b.*\b)?DELETE\b")),
)
UPDATE = re.compile(r"^(WITH\b.*\b)?UPDATE\b")
SQL_TOKEN = re.compile(r"""'(?:[^']|'')*'?|"(?:[^"]|"")*"?|`[^`]*`?|\[[^\]]*\]?|--[^\n]*"""
                       r"""|/\*.*?(?:\*/|$)|\w+|\S""", re.DOTALL)
CONDITION_ENDS = {"RETURNING", "ORDER", "LIMIT"}      # what may follow an UPDATE's WHERE
UNSAFE_FUNCTIONS = {"load_extension", "fts3_tokenizer"}
# The table a statement drops, deletes from or renames, read from bare_sql(statement)
# (upper case, no comments): what a confirmation covers in the lost-row guard.
SQL_NAME = r'(?:"(?:[^"]|"")*"|\[[^\]]*\]|`[^`]*`|[^\s.;(]+)'
DROPS_TABLE = re.compile(rf"^DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:{SQL_NAME}\s*\.\s*)?(?P<name>{SQL_NAME})")
DELETES_FROM = re.compile(rf"^(?:WITH\b.*?\b)?DELETE\s+FROM\s+(?:{SQL_NAME}\s*\.\s*)?(?P<name>{SQL_NAME})")
RENAMES_TABLE = re.compile(rf"^ALTER\s+TABLE\s+(?:{SQL_NAME}\s*\.\s*)?(?P<name>{SQL_NAME})"
                           rf"\s+RENAME\s+TO\s+(?P<new>{SQL_NAME})")
DURATION = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>[smhd])")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
STATES = ("error", "missing", "ahead", "modified", "drift", "untracked", "pending", "up to date")
# status --prometheus: node_exporter's textfile format, one gauge family per line here.
METRICS = (
    ("current_version", "Highest migration version applied to the database (absent when it "
                        "cannot be read or does not exist)."),
    ("latest_version", "Highest version in the instance's migration list."),
    ("pending_migrations", "Migrations that migrate would apply now."),
    ("state", "The instance's state as status shows it: 1 for its state, 0 for the others."),
    ("last_backup_timestamp_seconds", "When the newest verified backup was made (Unix time); "
                                      "0 when there is none."),
    ("last_backup_age_seconds", "Age of the newest verified backup when this was written "
                                "(absent when there is none)."),
    ("last_backup_size_bytes", "Size of the newest verified backup (absent when there is none)."),
    ("last_run_success", "1 when the instance's last write command (the last line of its audit "
                         "trail) succeeded, 0 when it failed (absent without an audit trail)."),
    ("last_run_timestamp_seconds", "When the instance's last write command ended (Unix time; "
                                   "absent without an audit trail)."),
)
WORKER_STOP_SECONDS = 10.0          # how long stopping --jobs workers may take before SIGKILL
# sqlite3_complete's state machine (SQLite's complete.c), so that splitting is linear:
# a row per state, a column per token. White space and comments leave the state as it is.
SEMI, OTHER, EXPLAIN, CREATE, TEMP, TRIGGER, END = range(7)
COMPLETE = (
    # SEMI OTHER EXPLAIN CREATE TEMP TRIGGER END
    (1, 2, 3, 4, 2, 2, 2),      # 0 invalid: nothing yet
    (1, 2, 3, 4, 2, 2, 2),      # 1 start: after a complete statement
    (1, 2, 2, 2, 2, 2, 2),      # 2 normal
    (1, 3, 2, 4, 2, 2, 2),      # 3 after EXPLAIN
    (1, 2, 2, 2, 4, 5, 2),      # 4 after CREATE (TEMP)
    (6, 5, 5, 5, 5, 5, 5),      # 5 in a trigger body
    (6, 5, 5, 5, 5, 5, 7),      # 6 after a ';' in a trigger body
    (1, 5, 5, 5, 5, 5, 5),      # 7 after END in a trigger body
)
KEYWORDS = {"explain": EXPLAIN, "create": CREATE, "temp": TEMP, "temporary": TEMP,
            "trigger": TRIGGER, "end": END}
ID_CHAR = r"A-Za-z0-9_$\x80-\U0010ffff"
COMPLETE_TOKEN = re.compile(rf"""
    ;
  | '[^']*'? | "[^"]*"? | `[^`]*`? | \[[^\]]*\]?         # quoted; unclosed: to the end
  | /\*(?:.*?\*/|.*) | --[^\n]*                          # comments
  | (?<![{ID_CHAR}])(?:explain|create|temp|temporary|trigger|end)(?![{ID_CHAR}])
""", re.ASCII | re.DOTALL | re.IGNORECASE | re.VERBOSE)
NOT_SPACE = re.compile(r"[^ \t\n\f\r]")              # SQLite's white space
QUOTES = {"'": "'", '"': '"', "`": "`", "[": "]"}
# A migration cannot leave the run's transaction. These pragmas, when set, would let it:
# journaling, syncing and locking are what ROLLBACK and COMMIT rely on (journal_mode=OFF
# and a failed run leaves its changes behind), and writable_schema and schema_version edit
# the schema behind SQLite's back. wal_checkpoint acts even when only read. Every other
# pragma stays allowed: reading ones (table_info, foreign_key_list, foreign_key_check),
# and foreign_keys, defer_foreign_keys, legacy_alter_table, user_version, which act
# inside the transaction only (foreign_keys is a no-op there; the run sets it itself).
ESCAPING_PRAGMAS = ("journal_mode", "locking_mode", "synchronous", "fullfsync",
                    "checkpoint_fullfsync", "writable_schema", "schema_version")
PRAGMA_NAME = r"^PRAGMA\s+(?:\S+?\s*\.\s*)?[\"`\[]?(?P<name>\w+)[\"`\]]?\s*(?P<set>[=(])?"
# What a migration may not run, and why: (pattern on bare_sql's text, reason).
ESCAPES = (
    (re.compile(r"^(BEGIN|COMMIT|END|ROLLBACK(?!\s+(TRANSACTION\s+)?TO\b))\b"),
     "statements that begin or end a transaction are not allowed in a migration; the tool "
     "runs the whole run in one transaction of its own"),
    (re.compile(r"^VACUUM\b.*\bINTO\b"),
     "VACUUM INTO writes the database to another file, which a migration may not reach "
     "(take a copy with 'backup NAME' instead)"),
    (re.compile(r"^VACUUM\b"),
     "VACUUM cannot run inside the run's transaction (run it outside migrations)"),
    (re.compile(r"\bLOAD_EXTENSION\s*\("),
     "load_extension loads native code into the tool; a migration cannot load extensions"),
    (re.compile(r"^(ATTACH|DETACH)\b"),
     "ATTACH and DETACH reach another database file; a migration changes its own database "
     "only"),
)
ESCAPING_PRAGMA = ("this pragma would weaken the run's transaction (journaling, syncing, "
                   "locking or the schema's own bookkeeping), so a failed run could not be "
                   "undone (set it on the database outside migrations)")
TRANSACTION_ENDED = ("the run's transaction has ended (SQLite rolled it back after an "
                     "error); nothing after that point may run")
GUARD_REMOVED = ("a migration removed or replaced the tool's authorizer on the connection "
                 "(set_authorizer), so what it ran cannot be checked; rolled back, nothing "
                 "changed")
REFUSED = ("not allowed in a migration: it would leave the run's transaction or reach "
           "another file")         # the authorizer refused something the text did not show
SQLITE_PRAGMA, SQLITE_TRANSACTION = 19, 22      # the authorizer's action codes
SQLITE_ATTACH, SQLITE_DETACH, SQLITE_FUNCTION = 24, 25, 31
# Actions that write a table's rows or definition, and which argument names the table
# (ALTER TABLE's first is the schema). SQLite asks for each statement as it is compiled,
# the statements of the triggers it fires included, so these are every table a run wrote:
# CREATE_TABLE, DELETE, DROP_TABLE, INSERT, UPDATE, ALTER_TABLE, CREATE_VTABLE, DROP_VTABLE.
WRITES_TABLE = {2: 0, 9: 0, 11: 0, 18: 0, 23: 0, 26: 1, 29: 0, 30: 0}

TRACKING_TABLE = """
    CREATE TABLE schema_migrations (
        version      INTEGER PRIMARY KEY,
        description  TEXT NOT NULL,
        applied_at   DATETIME DEFAULT CURRENT_TIMESTAMP,
        checksum     TEXT,
        execution_ms INTEGER
    )
"""
RECORD_APPLIED = """
    INSERT INTO schema_migrations (version, description, checksum, execution_ms)
    VALUES (?, ?, ?, ?)
"""
FORGET_APPLIED = "DELETE FROM schema_migrations WHERE version = ?"
TABLE_DEFINITIONS = "SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY rowid"
REFERENCES = """
    SELECT m.name, r."table" FROM sqlite_master AS m, pragma_foreign_key_list(m.name) AS r
    WHERE m.type = 'table'
"""
FILL_CHECKSUM = "UPDATE schema_migrations SET checksum = ? WHERE version = ? AND checksum IS NULL"
# Tracking tables (ours, and those other runners leave behind) and what belongs to
# them (golang-migrate's index, Rails' metadata) are not the application's schema:
# drift detection, diff, row counts and dry-run shapes leave them out.
TRACKING_TABLES = "('schema_migrations', '__diesel_schema_migrations', '_sqlx_migrations', 'ar_internal_metadata')"
USER_TABLES = f"""
    SELECT name FROM sqlite_master
    WHERE type = 'table' AND {NOT_INTERNAL} AND tbl_name NOT IN {TRACKING_TABLES}
    ORDER BY name
"""
# Shadow tables: where a virtual table's module keeps its data (fts5's docs_data for
# docs, ...). They are the engine's, derived from the virtual table: the lost-row guard,
# drift and dry-run shapes count and compare the virtual table, not them.
VIRTUAL_TABLES = """
    SELECT name, sql FROM sqlite_master WHERE type = 'table' AND sql LIKE 'CREATE VIRTUAL TABLE%'
"""
VIRTUAL_MODULE = re.compile(r"\bUSING\s+(\w+)", re.IGNORECASE)
FTS3_SHADOWS = ("content", "segments", "segdir", "docsize", "stat")
SHADOW_SUFFIXES = {"fts5": ("data", "idx", "content", "docsize", "config"),
                   "fts4": FTS3_SHADOWS, "fts3": FTS3_SHADOWS,
                   "rtree": ("node", "parent", "rowid"), "rtree_i32": ("node", "parent", "rowid")}
MASTER_ROWS = f"""
    SELECT type, name, sql FROM sqlite_master
    WHERE {NOT_INTERNAL} AND tbl_name NOT IN {TRACKING_TABLES}
    ORDER BY type, name
"""
SCHEMA_OBJECTS = f"""
    SELECT type, name, tbl_name, sql FROM sqlite_master
    WHERE {NOT_INTERNAL} AND tbl_name NOT IN {TRACKING_TABLES}
    ORDER BY type, name
"""
TABLE_COLUMNS = "SELECT name FROM pragma_table_info(?)"
RECORD_ADOPTED = """
    INSERT INTO schema_migrations (version, description, applied_at, checksum, execution_ms)
    VALUES (?, ?, COALESCE(?, CURRENT_TIMESTAMP), ?, ?)
"""

# Migrations written in code, in the format of the in-house system this replaces.
# They merge with the files in migrations_dir into one list ordered by version.
MIGRATIONS: list[dict] = [
    # {
    #     'version': 4,
    #     'description': 'Add loan due date',
    #     'sql': [
    #         "ALTER TABLE loan ADD COLUMN due_date DATE",
    #     ],
    #     'down': [
    #         "ALTER TABLE loan DROP COLUMN due_date",
    #     ],
    # },
]


# --- Records -----------------------------------------------------------------

@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    up: tuple[str, ...]             # statements, already split, without the trailing ';'
    down: tuple[str, ...] = ()      # empty: cannot be rolled back (unless a Python down)
    source: str = "MIGRATIONS"      # or the file's path, for messages
    python: str = ""                # the text of a .py migration
    declared_destructive: bool = False
    reversible: bool = False        # a down part was written (comments only: nothing to undo),
                                    # or another runner's down file exists, even an empty one

    @functools.cached_property
    def checksum(self) -> str:
        if self.python:
            text = self.python.replace("\r\n", "\n")
        else:
            text = "\n".join(normalise(statement) for statement in self.up)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def has_down(self) -> bool:
        return bool(self.down) or self.reversible or \
            (bool(self.python) and "down" in python_outline(self.python)[0])

    @property
    def label(self) -> str:
        return f"{self.version:04d} {self.description}"


@dataclass(frozen=True)
class Applied:
    version: int
    description: str
    applied_at: str | None
    checksum: str | None


@dataclass(frozen=True)
class Runner:
    """Another migration runner, known by the tracking table it leaves in a database."""
    name: str
    table: str
    columns: frozenset              # the table's columns, exactly
    versions_sql: str               # (version, applied_at, execution_ms) of each row
    half_done: str = ""             # the condition on a row of a run that stopped half-way
    only_latest: bool = False       # it keeps one row: its newest version (all below are applied)
    marker: str = ""                # a table of its own that tells it from a runner with the same table


# The tracking tables as each runner creates and fills them (the sources are cited
# in tests/test_adopt.py). A new runner is one more record.
RUNNERS = (
    Runner("golang-migrate", "schema_migrations", frozenset({"version", "dirty"}),
           "SELECT version, NULL, NULL FROM schema_migrations",
           half_done="dirty = 1", only_latest=True),
    Runner("Rails", "schema_migrations", frozenset({"version"}),
           "SELECT version, NULL, NULL FROM schema_migrations", marker="ar_internal_metadata"),
    Runner("dbmate", "schema_migrations", frozenset({"version"}),
           "SELECT version, NULL, NULL FROM schema_migrations"),
    Runner("Diesel", "__diesel_schema_migrations", frozenset({"version", "run_on"}),
           "SELECT version, run_on, NULL FROM __diesel_schema_migrations"),
    Runner("sqlx", "_sqlx_migrations", frozenset({"version", "description", "installed_on", "success",
                                                  "checksum", "execution_time"}),
           "SELECT version, installed_on, CASE WHEN execution_time >= 0 "
           "THEN execution_time / 1000000 END FROM _sqlx_migrations",
           half_done="success = 0"),
)


@dataclass(frozen=True)
class Adoption:
    """What adopt found in another runner's table and recorded in ours."""
    instance: Instance
    runner: Runner | None           # None: already tracked by this tool, nothing done
    versions: tuple[int, ...] = ()  # recorded (or, when already tracked, found recorded)
    differences: tuple[str, ...] = ()
    backup: Backup | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class State:
    """What an instance holds compared with the migration list."""
    instance: Instance
    exists: bool
    current_version: int | None
    latest_version: int
    applied: tuple[Applied, ...] = ()
    pending: tuple[Migration, ...] = ()
    modified: tuple[int, ...] = ()      # applied, but the migration's checksum changed
    unknown: tuple[int, ...] = ()       # in the database, not in the migration list
    drift: tuple[str, ...] = ()
    drift_unchecked: str = ""           # why the schema could not be compared ('' when it was)
    problems: tuple[str, ...] = ()
    error: str = ""
    untracked: str = ""                 # why the database is untracked; empty when it is not
    runner: Runner | None = None        # the other runner that built it, when that is why

    @property
    def damage(self) -> str:
        """The first failed quick_check ('' when none failed or none ran)."""
        return next((p for p in self.problems if p.startswith("quick_check")), "")

    @property
    def state(self) -> str:
        for word, present in (("error", self.error or self.damage), ("missing", not self.exists),
                              ("ahead", self.unknown), ("modified", self.modified),
                              ("drift", self.drift), ("untracked", self.untracked),
                              ("pending", self.pending)):
            if present:
                return word
        return "up to date"


@dataclass(frozen=True)
class Plan:
    instance: Instance
    from_version: int
    to_version: int
    migrations: tuple[Migration, ...]
    destructive: tuple[tuple[int, str, str], ...]   # (version, kind, statement)
    create: bool = False
    direction: str = "up"
    applied: tuple[int, ...] = ()       # the versions recorded when the plan was made
    allow_row_loss: tuple[str, ...] = ()    # --allow-row-loss: tables that may end with fewer rows


@dataclass(frozen=True)
class Rehearsal:
    ok: bool
    error: str
    seconds: float
    tables_added: tuple[str, ...] = ()
    tables_removed: tuple[str, ...] = ()
    columns_added: tuple[str, ...] = ()
    columns_removed: tuple[str, ...] = ()
    row_changes: tuple[tuple[str, int, int], ...] = ()     # (table, before, after)


@dataclass(frozen=True)
class Outcome:
    plan: Plan
    applied: tuple[int, ...]
    backup: Backup | None
    seconds: float
    dry_run: bool = False
    rehearsal: Rehearsal | None = None


# --- Loading migrations ------------------------------------------------------

def normalise(statement: str) -> str:
    return statement.replace("\r\n", "\n").replace("\r", "\n").strip()


def split_statements(script: str, where: str = "SQL", first_line: int = 1) -> list[str]:
    """Cut SQL where sqlite3.complete_statement would, in one pass; trigger bodies and
    quoted ';' survive. A script that ends inside a quote, a /* comment or a trigger body
    is an error naming the line where that statement starts (first_line: the script's)."""
    statements, start, state, position = [], 0, 0, 0
    for token in COMPLETE_TOKEN.finditer(script):
        if NOT_SPACE.search(script, position, token.start()):
            state = COMPLETE[state][OTHER]
        position = token.end()
        text = token.group()
        if text == ";":
            state = COMPLETE[state][SEMI]
            if state == 1:                  # complete: the cut complete_statement makes
                statements.append(script[start:position])
                start = position
        elif text[0] in QUOTES:
            if len(text) < 2 or text[-1] != QUOTES[text[0]]:
                unterminated(script, start, where, first_line, f"a {text[0]} quote opened", token)
            state = COMPLETE[state][OTHER]
        elif text.startswith("/*"):
            if len(text) < 4 or not text.endswith("*/"):
                unterminated(script, start, where, first_line, "a /* comment opened", token)
        elif not text.startswith("--"):     # a keyword that matters to triggers
            state = COMPLETE[state][KEYWORDS[text.lower()]]
    if NOT_SPACE.search(script, position):
        state = COMPLETE[state][OTHER]
    if state in (5, 6):                     # inside CREATE TRIGGER ... BEGIN, before END;
        unterminated(script, start, where, first_line, "its trigger body (BEGIN without END;)")
    statements.append(script[start:])       # text after the last ';'
    cleaned = [normalise(s)[:-1] if normalise(s).endswith(";") else normalise(s) for s in statements]
    return [s.strip() for s in cleaned if bare_sql(s)]


def unterminated(script: str, start: int, where: str, first_line: int, what: str,
                 token: re.Match | None = None) -> None:
    def line_of(offset: int) -> int:
        return first_line + script.count("\n", 0, offset)
    line = line_of(NOT_SPACE.search(script, start).start())
    opened = f" on line {line_of(token.start())}" if token else ""
    raise CommandError(f"{where}: line {line}: this statement never ends: {what}{opened} is "
                       f"still open at the end of the text; close it", EXIT_USAGE)


@functools.lru_cache(maxsize=4096)
def bare_sql(statement: str) -> str:
    """The statement without comments and string literals, upper-cased, for classifying.

    Cached, as destructive_kind is: a fleet runs the same statements on every member, and
    the answer depends on the text alone."""
    # One left-to-right pass, so a quote inside a comment (-- don't) or a comment
    # marker inside a string or quoted name ('a--b', "x/*y") is not mistaken for one.
    text = re.sub(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|`[^`]*`|\[[^\]]*\]|--[^\n]*|/\*.*?(?:\*/|$)""",
                  lambda m: {"'": "''", "-": " ", "/": " "}.get(m.group()[0], m.group()),
                  statement, flags=re.DOTALL)
    return " ".join(text.split()).upper()


@functools.lru_cache(maxsize=4096)
def destructive_kind(statement: str) -> str:
    """'' or why the statement can destroy data; depends on the text alone (always_true
    runs the condition on an empty in-memory database), so it is worked out once per
    statement, not once per member of a fleet."""
    sql = bare_sql(statement)
    for kind, pattern in DESTRUCTIVE:
        if pattern.match(sql):
            return kind
    if UPDATE.match(sql):
        condition = update_condition(statement)
        if condition is None:
            return "UPDATE without WHERE"
        if always_true(condition):
            return "UPDATE whose WHERE is always true"
    return ""


def update_condition(statement: str) -> str | None:
    """The text of an UPDATE's own WHERE condition; None when it has none.

    Only a WHERE outside parentheses limits the UPDATE (one inside a sub-select
    does not); strings, quoted names and comments are skipped whole.
    """
    depth, start = 0, None
    for token in SQL_TOKEN.finditer(statement):
        word = token.group().upper()
        if word == "(":
            depth += 1
        elif word == ")":
            depth -= 1
        elif depth == 0 and start is None and word == "WHERE":
            start = token.end()
        elif depth == 0 and start is not None and word in CONDITION_ENDS:
            return statement[start:token.start()]
    return None if start is None else statement[start:]


def always_true(condition: str) -> bool:
    """A WHERE that names no column and is true anyway (WHERE 1, 1 = 1, TRUE, 'a' = 'a').

    SQLite itself evaluates it, on an empty in-memory database where only SELECT
    and functions are authorised (never load_extension) and at most about a
    million steps run: a condition that names a column or a table fails there
    and is a real condition.
    """
    steps = iter(range(1000))
    with closing(sqlite3.connect(":memory:")) as conn:
        conn.set_authorizer(lambda action, _, function, *__: sqlite3.SQLITE_OK
                            if action == sqlite3.SQLITE_SELECT or (
                                action == sqlite3.SQLITE_FUNCTION
                                and str(function).lower() not in UNSAFE_FUNCTIONS)
                            else sqlite3.SQLITE_DENY)
        conn.set_progress_handler(lambda: next(steps, None) is None, 1000)
        try:
            row = conn.execute(f"SELECT CASE WHEN ({condition}\n) THEN 1 ELSE 0 END").fetchone()
        except (sqlite3.Error, sqlite3.Warning, ValueError):
            return False
    return row == (1,)


def build_migration(version, description, up, down, source: str, allow_empty: bool = False,
                    **extra) -> Migration:
    """A validated Migration; an up part of comments only is a no-op, one with no text is not.

    allow_empty: other runners' layouts, where an empty file is a no-op too (in ours it
    is what 'new' wrote and nobody filled).
    """
    where = f"{source}: migration {version}"
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CommandError(f"{source}: version {version!r} is not a positive integer", EXIT_USAGE)
    if not isinstance(description, str) or not description.strip():
        raise CommandError(f"{where}: needs a description", EXIT_USAGE)
    up_statements = statements_of(up, where, "up")
    down_statements = statements_of(down, where, "down")
    if not up_statements and not extra.get("python") and not allow_empty and not has_text(up):
        raise CommandError(f"{where}: the up part is empty; write its SQL, or, if it is meant to "
                           f"do nothing (e.g. dbmate already applied it as a no-op), put a comment "
                           f"line such as '-- no-op' under '-- migrate:up' (a comment-only up part "
                           f"is a no-op with the same checksum as an empty one)", EXIT_USAGE)
    for part, parts in (("up", up), ("down", down)):
        if UNFILLED in text_of(parts):
            raise CommandError(f"{where}: the {part} part still holds the line 'new' wrote; write "
                               f"its SQL and delete that line", EXIT_USAGE)
    extra.setdefault("reversible", has_text(down))     # a down part of comments only undoes nothing
    return Migration(version=version, description=description.strip(), up=up_statements,
                     down=down_statements, source=source, **extra)


def text_of(parts) -> str:
    """The text of a part given as a string or a list of strings (already validated)."""
    return parts if isinstance(parts, str) else "\n".join(parts or ())


def has_text(parts) -> bool:
    """Anything but white space and bare ';' (a comment counts: it makes a no-op)."""
    return bool(text_of(parts).strip(" \t\r\n;"))


def statements_of(parts, where: str, part: str) -> tuple[str, ...]:
    if parts is None:
        return ()
    if isinstance(parts, str):
        parts = [parts]
    if not isinstance(parts, (list, tuple)) or not all(isinstance(p, str) for p in parts):
        raise CommandError(f"{where}: the {part} part must be a list of SQL strings", EXIT_USAGE)
    if any("\x00" in p for p in parts):
        raise CommandError(f"{where}: the {part} part contains a NUL character; is it a text file?",
                           EXIT_USAGE)
    statements = tuple(s for p in parts for s in split_statements(p, f"{where} ({part} part)"))
    for statement in statements:
        reason = escape_reason(statement)
        if reason:
            raise CommandError(f"{where}: '{' '.join(statement.split())[:60]}': {reason}; "
                               f"remove it", EXIT_USAGE)
    return statements


def escape_reason(statement: str) -> str:
    """Why a migration may not run this statement ('' when it may): see ESCAPES."""
    sql = bare_sql(statement)
    for pattern, reason in ESCAPES:
        if pattern.search(sql):
            return reason
    pragma = re.match(PRAGMA_NAME, sql)
    if pragma and escaping_pragma(pragma["name"], pragma["set"] is not None):
        return ESCAPING_PRAGMA
    return ""


def escaping_pragma(name: str, setting: bool) -> bool:
    name = name.lower()
    return name == "wal_checkpoint" or (setting and name in ESCAPING_PRAGMAS)


def migrations_from_code(entries: list[dict]) -> list[Migration]:
    migrations = []
    for index, entry in enumerate(entries):
        source = f"MIGRATIONS[{index}] in {Path(__file__).name}"
        if not isinstance(entry, dict) or set(entry) - {"version", "description", "sql", "down"}:
            raise CommandError(f"{source}: expected a dict with version, description, sql "
                               f"and optionally down", EXIT_USAGE)
        migrations.append(build_migration(entry.get("version"), entry.get("description"),
                                          entry.get("sql"), entry.get("down"), source))
    return migrations


def migrations_from_folder(folder: Path) -> list[Migration]:
    """The folder's migrations, in whichever one layout it holds."""
    if not folder.is_dir():
        raise CommandError(f"migrations folder {folder} does not exist; create it or fix "
                           f"migrations_dir in instances.ini", EXIT_USAGE)
    layout, entries = folder_layout(folder)
    if layout == PLAIN:
        return plain_migrations(entries)
    python = [path for path in entries if layout_of(path) == PYTHON]
    others = [path for path in entries if layout_of(path) != PYTHON]
    read = paired_migrations if layout == PAIRED else diesel_migrations
    return merge(read(others), [python_migration(path) for path in python])


def python_migration(path: Path) -> Migration:
    """A NNNN_description.py beside another runner's files (in our layout: plain_migrations)."""
    match = MIGRATION_FILE.fullmatch(path.name)
    if not match:
        raise CommandError(f"{path}: a Python migration is named NNNN_description.py (for "
                           f"example 0004_backfill_status.py)", EXIT_USAGE)
    return read_python_file(path, int(match["version"]), match["description"].replace("_", " "))


def layout_of(path: Path) -> str:
    """The layout a folder entry belongs to, PYTHON for a Python migration (which fits
    every layout), or '' for an entry that is ignored."""
    if path.name.startswith(".") or path.name == "__init__.py":
        return ""
    if path.is_dir():
        diesel = DIESEL_FOLDER.fullmatch(path.name)
        python = [path / name for name in ("up.py", "down.py") if (path / name).exists()]
        if diesel and python:
            raise CommandError(f"{python[0]}: Diesel's folders hold SQL only; a Python migration is one "
                               f"file beside them: move its up(conn) and down(conn) into "
                               f"{path.parent / (diesel['version'].replace('-', '') + '_' + diesel['description'])}.py",
                               EXIT_USAGE)
        return DIESEL if diesel and (path / "up.sql").is_file() else ""
    if not path.is_file() or path.suffix not in (".sql", ".py"):
        return ""
    if path.suffix == ".py":
        return PYTHON
    return PAIRED if PAIRED_FILE.fullmatch(path.name) else PLAIN


def folder_layout(folder: Path) -> tuple[str, list[Path]]:
    """The one layout of a migrations folder and its entries; a mix is an error."""
    first: dict[str, Path] = {}
    entries = []
    for path in sorted(folder.iterdir()):
        layout = layout_of(path)
        if not layout:
            continue
        entries.append(path)
        if layout == PYTHON:
            continue
        first.setdefault(layout, path)
        if len(first) > 1:
            (one, a), (other, b) = first.items()
            raise CommandError(f"{folder} mixes two migration layouts: {a.name} ({LAYOUT_NAMES[one]}) "
                               f"and {b.name} ({LAYOUT_NAMES[other]}); keep one layout per folder",
                               EXIT_USAGE)
    return next(iter(first), PLAIN), entries


def plain_migrations(paths: list[Path]) -> list[Migration]:
    """Our own layout, which dbmate's files (also dbmate's NNNN-name.sql) and sqlx's plain ones fit."""
    migrations = []
    for path in paths:
        match = MIGRATION_FILE.fullmatch(path.name)
        dbmate = DBMATE_FILE.fullmatch(path.name) if not match else None
        if dbmate and any(MARKER.match(line) for line in read_text(path).splitlines()):
            up, down = read_sql_file(path)
            description = re.sub(r"[-_]", " ", dbmate["description"])
            migrations.append(build_migration(int(dbmate["version"]), description, up, down, str(path)))
            continue
        if not match:
            raise CommandError(f"{path}: a migration file is named NNNN_description"
                               f"{path.suffix} (for example 0004_add_loan_status{path.suffix}; "
                               f"dbmate's NNNN-description.sql needs its '-- migrate:up' line)",
                               EXIT_USAGE)
        version = int(match["version"])
        description = match["description"].replace("_", " ")
        if match["kind"] == "sql":
            up, down = read_sql_file(path)
            migrations.append(build_migration(version, description, up, down, str(path)))
        else:
            migrations.append(read_python_file(path, version, description))
    return migrations


def paired_migrations(paths: list[Path]) -> list[Migration]:
    """golang-migrate's and sqlx's layout: NNNN_name.up.sql and an optional NNNN_name.down.sql."""
    parts: dict[str, dict[int, Path]] = {"up": {}, "down": {}}
    for path in paths:
        match = PAIRED_FILE.fullmatch(path.name)
        same = parts[match["part"]]
        version = int(match["version"])
        if version in same:
            raise CommandError(f"version {version} is defined twice: in {same[version]} and in "
                               f"{path}", EXIT_USAGE)
        same[version] = path
    for version, path in parts["down"].items():
        if version not in parts["up"]:
            raise CommandError(f"{path}: no {version}_*.up.sql beside it; a down file needs its "
                               f"up file", EXIT_USAGE)
    migrations = []
    for version, path in sorted(parts["up"].items()):
        down = parts["down"].get(version)
        description = PAIRED_FILE.fullmatch(path.name)["description"].replace("_", " ")
        migrations.append(build_migration(version, description, read_text(path),
                                          read_text(down) if down else None, str(path),
                                          allow_empty=True, reversible=down is not None))
    return migrations


def diesel_migrations(folders: list[Path]) -> list[Migration]:
    """Diesel's layout: a folder per migration; 2018-02-17-110136 is version 20180217110136."""
    migrations = []
    for folder in folders:
        match = DIESEL_FOLDER.fullmatch(folder.name)
        down = folder / "down.sql"
        migrations.append(build_migration(int(match["version"].replace("-", "")),
                                          match["description"].replace("_", " "),
                                          read_text(folder / "up.sql"),
                                          read_text(down) if down.is_file() else None,
                                          str(folder / "up.sql"), allow_empty=True,
                                          reversible=down.is_file()))
    return migrations


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"{path}: cannot read as UTF-8 text: {exc}", EXIT_USAGE) from exc


def read_sql_file(path: Path) -> tuple[str, str]:
    """The up and down parts of a .sql file; without markers it is all up."""
    parts: dict[str, list[str]] = {}
    current = None
    before: list[str] = []
    for number, line in enumerate(read_text(path).splitlines()):
        marker = MARKER.match(line)
        if marker:
            current = marker["part"].lower()
            if current in parts:
                raise CommandError(f"{path}: '-- migrate:{current}' appears twice", EXIT_USAGE)
            parts[current] = [""] * (number + 1)    # so that line numbers are the file's
        elif current is None:
            before.append(line)
        else:
            parts[current].append(line)
    if not parts:
        return "\n".join(before), ""
    if bare_sql("\n".join(before)):
        raise CommandError(f"{path}: SQL before the first '-- migrate:' marker; move it under "
                           f"'-- migrate:up'", EXIT_USAGE)
    return "\n".join(parts.get("up", [])), "\n".join(parts.get("down", []))


def read_python_file(path: Path, version: int, description: str) -> Migration:
    """A .py migration, read without running it: only migrate, rollback and the dry run's
    rehearsal ever import it (load_python_module)."""
    text = read_text(path)
    try:
        functions, destructive = python_outline(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise CommandError(f"{path}: cannot load: {type(exc).__name__}: {exc}", EXIT_USAGE) from exc
    if "up" not in functions:
        raise CommandError(f"{path}: no up(conn) function yet: write 'def up(conn):' doing the "
                           f"data change with conn.execute(sql, parameters) (the commented example "
                           f"in the file shows one); until then every command refuses it", EXIT_USAGE)
    return Migration(version=version, description=description, up=(), source=str(path),
                     python=text, declared_destructive=destructive)


@functools.lru_cache(maxsize=None)
def python_outline(text: str) -> tuple[frozenset, bool]:
    """(functions defined at the top level, whether DESTRUCTIVE = True), read with ast."""
    functions, destructive = set(), False
    for node in ast.parse(text.encode("utf-8")).body:     # bytes: a BOM reads as on import
        if isinstance(node, ast.FunctionDef):
            functions.add(node.name)
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "DESTRUCTIVE" for t in targets):
            destructive = isinstance(node.value, ast.Constant) and node.value.value is True
    return frozenset(functions), destructive


_python_modules: dict[str, object] = {}


def load_python_module(path: Path, text: str):
    """The migration's module, run from the text that was checksummed.

    compile() and exec() rather than an import: no bytecode is written anywhere (an
    import would leave migrations/__pycache__/ in the user's repository unless
    PYTHONDONTWRITEBYTECODE is set), and the code that runs is the text checksummed.
    """
    key = str(path)
    if key not in _python_modules:
        module = types.ModuleType(f"migration_{abs(hash(key))}")
        module.__file__ = key
        try:
            code = compile(text.encode("utf-8"), key, "exec")     # bytes: a BOM reads as on import
            exec(code, module.__dict__)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - any error in a user's file
            raise CommandError(f"{path}: cannot load: {type(exc).__name__}: {exc}", EXIT_USAGE) from exc
        _python_modules[key] = module
    return _python_modules[key]


def python_functions(migration: Migration) -> dict[str, Callable]:
    module = load_python_module(Path(migration.source), migration.python)
    return {name: getattr(module, name) for name in ("up", "down") if callable(getattr(module, name, None))}


def merge(*sources: list[Migration]) -> list[Migration]:
    """One list ordered by version; a version defined twice is an error."""
    by_version: dict[int, Migration] = {}
    for migration in (m for source in sources for m in source):
        if migration.version in by_version:
            raise CommandError(f"version {migration.version} is defined twice: in "
                               f"{by_version[migration.version].source} and in {migration.source}",
                               EXIT_USAGE)
        by_version[migration.version] = migration
    return [by_version[v] for v in sorted(by_version)]


_loaded: dict[Path, list[Migration]] = {}


def all_migrations(instance: Instance) -> list[Migration]:
    """The instance's migration list: MIGRATIONS plus its migrations folder, validated."""
    if instance.migrations_dir not in _loaded:
        _loaded[instance.migrations_dir] = merge(migrations_from_code(MIGRATIONS),
                                                 migrations_from_folder(instance.migrations_dir))
    return _loaded[instance.migrations_dir]


# --- Reading an instance -----------------------------------------------------

def tracking_columns(conn: sqlite3.Connection) -> list[str]:
    return [row[1] for row in conn.execute("PRAGMA table_info(schema_migrations)")]


def read_applied(conn: sqlite3.Connection) -> list[Applied]:
    try:                                # the current table: one query
        rows = conn.execute("SELECT version, description, applied_at, checksum "
                            "FROM schema_migrations ORDER BY version").fetchall()
        return [Applied(int(v), str(d), None if a is None else str(a), c) for v, d, a, c in rows]
    except sqlite3.OperationalError:    # none yet, or the older three-column table
        pass
    columns = tracking_columns(conn)
    if not columns or foreign_runner(conn) is not None:    # another runner's: adopt reads it
        return []
    if not {"version", "description"} <= set(columns):
        raise CommandError("schema_migrations exists but has no version/description columns; "
                           "it was not made by a migration tool this one understands")
    checksum = "checksum" if "checksum" in columns else "NULL"
    applied_at = "applied_at" if "applied_at" in columns else "NULL"
    rows = conn.execute(f"SELECT version, description, {applied_at}, {checksum} "
                        f"FROM schema_migrations ORDER BY version").fetchall()
    return [Applied(int(v), str(d), None if a is None else str(a), c) for v, d, a, c in rows]


def foreign_runner(conn: sqlite3.Connection) -> Runner | None:
    """The other runner whose tracking table this database holds, if ours is not there."""
    ours = frozenset(c for (c,) in conn.execute(TABLE_COLUMNS, ("schema_migrations",)))
    if "description" in ours:
        return None                     # ours (or the older in-house three-column table)
    tables: dict[str, frozenset] = {"schema_migrations": ours}     # one query, not six
    for runner in RUNNERS:
        for table in (runner.table, runner.marker):
            if table and table not in tables:
                tables[table] = frozenset(c for (c,) in conn.execute(TABLE_COLUMNS, (table,)))
    for runner in RUNNERS:
        if tables[runner.table] == runner.columns and (not runner.marker or tables[runner.marker]):
            return runner
    return None


def untracked_reason(conn: sqlite3.Connection, applied: list[Applied], runner: Runner | None) -> str:
    """Why the database is not ours to migrate yet ('' when it is): another runner built
    it, or it holds tables of its own but no recorded migration, so it was made without
    this tool."""
    if runner is not None:
        version = half_migrated(conn, runner)
        if version is not None:
            return (f"{HALF_MIGRATED} {runner.name}: its {runner.table} has {runner.half_done} "
                    f"for version {version}")
        return f"built by {runner.name} (its {runner.table} table) and not adopted yet"
    if applied:
        return ""
    tables = [name for (name,) in conn.execute(USER_TABLES).fetchall()]
    if not tables:
        return ""                       # a new, empty database: migrate builds it
    shown = ", ".join(tables[:3]) + (f" and {len(tables) - 3} more" if len(tables) > 3 else "")
    return f"it holds tables of its own ({shown}) but no recorded migration"


def half_migrated(conn: sqlite3.Connection, runner: Runner) -> int | None:
    """The first version the runner left half-done (a run that stopped half-way), if any."""
    if not runner.half_done:
        return None
    row = conn.execute(f"SELECT version FROM {runner.table} WHERE {runner.half_done} "
                       f"ORDER BY version").fetchone()
    return None if row is None else row[0]


def half_migrated_step(name: str, runner: Runner) -> str:
    """What to do with a database another runner left half-migrated (adopt refuses it)."""
    tool = tool_command("safe_db_update.py")
    return (f"restore the backup taken before that run ('{tool} list-backups {name}', then "
            f"'{tool} restore {name} FILE'), or repair it with {runner.name}, then adopt")


def untracked_step(name: str, runner: Runner | None, reason: str = "") -> str:
    """What takes over an untracked database: adopt for another runner's, else baseline;
    restore first for one another runner left half-migrated."""
    if runner is not None and reason.startswith(HALF_MIGRATED):
        return half_migrated_step(name, runner)
    if runner is not None:
        return f"run 'adopt {name}', which records what {runner.name} applied"
    return f"if its schema is that of migration V, record it with 'baseline {name} --to V'"


def compare(instance: Instance, migrations: list[Migration], applied: list[Applied],
            problems: list[str], drift: tuple[str, ...] = (), untracked: str = "",
            runner: Runner | None = None, drift_unchecked: str = "") -> State:
    known = {m.version: m for m in migrations}
    done = {a.version for a in applied}
    modified = tuple(a.version for a in applied
                     if a.version in known and a.checksum and a.checksum != known[a.version].checksum)
    unknown = tuple(a.version for a in applied if a.version not in known)
    problems = list(problems)
    problems += [f"migration {v} was changed after it was applied (checksum differs from "
                 f"{known[v].source})" for v in modified]
    problems += [f"the database holds version {v}, which the migration list does not have"
                 for v in unknown]
    problems += [f"drift: {line}" for line in drift]
    if untracked:
        problems.append(f"untracked: {untracked}; {untracked_step(instance.name, runner, untracked)}")
    return State(instance=instance, exists=True,
                 current_version=max(done, default=0),
                 latest_version=max(known, default=0), applied=tuple(applied),
                 pending=tuple(m for m in migrations if m.version not in done),
                 modified=modified, unknown=unknown, drift=drift, drift_unchecked=drift_unchecked,
                 problems=tuple(problems), untracked=untracked, runner=runner)


def inspect(instance: Instance, migrations: list[Migration], quick_check: bool = False,
            with_drift: bool = True) -> State:
    """Read an instance without changing it: applied, pending, problems."""
    latest = max((m.version for m in migrations), default=0)
    if not instance.path.exists():
        return State(instance=instance, exists=False, current_version=None, latest_version=latest,
                     pending=tuple(migrations))
    try:
        with closing(open_readonly(instance)) as conn:
            conn.execute("BEGIN")       # one snapshot for every read below, under one shared lock
            problems = [f"quick_check: {p}" for p in integrity_problems(conn, quick=True)] \
                if quick_check else []
            applied = read_applied(conn)
            # The records tell what Python migrations did; without one, none is read.
            records = read_schema_records(instance) if any(m.python for m in migrations) else {}
            drift, unchecked = schema_drift(conn, migrations, applied, records) \
                if with_drift else ((), "")
            # Rows read means our own table (read_applied reads no other runner's): no
            # need to look for another runner's tables, which costs a query per instance.
            runner = None if applied else foreign_runner(conn)
            untracked = untracked_reason(conn, applied, runner)
    except (CommandError, sqlite3.Error, OSError, ValueError, TypeError) as exc:
        return State(instance=instance, exists=True, current_version=None, latest_version=latest,
                     pending=tuple(migrations), error=str(exc).removeprefix(f"{instance.name}: "))
    return compare(instance, migrations, applied, problems, drift, untracked, runner, unchecked)


# --- Schema comparison (drift) -----------------------------------------------

def schema_of(conn: sqlite3.Connection, only: set[str] | None = None) -> dict[str, object]:
    """Normalised sqlite_master: 'table user' -> {column: (type, NOT NULL, default, primary
    key)} in the table's order, other objects ('index ix', 'view v', 'trigger t') and virtual
    tables (whose module arguments are what matters) -> their SQL; shadow tables left out."""
    objects: dict[str, object] = {}
    shadows = shadow_tables(conn)
    for kind, name, table, sql in conn.execute(SCHEMA_OBJECTS).fetchall():
        key = f"{kind} {name}"
        if (only is not None and key not in only) or (kind == "table" and name.lower() in shadows):
            continue
        if kind == "table" and not re.match(r"CREATE\s+VIRTUAL\b", sql or "", re.IGNORECASE):
            quoted = '"' + name.replace('"', '""') + '"'
            columns = conn.execute(f"PRAGMA table_info({quoted})").fetchall()
            objects[key] = {c[1]: ((c[2] or "").upper(), bool(c[3]),
                                   None if c[4] is None else str(c[4]), int(c[5]))
                            for c in columns}
        else:
            objects[key] = " ".join((sql or f"(automatic on {table})").split())
    return objects


def shadow_tables(conn: sqlite3.Connection) -> set[str]:
    """The shadow tables of the database's virtual tables, as table_key() spells them:
    known by name for the modules in SHADOW_SUFFIXES, and by PRAGMA table_list (SQLite
    3.37 and later) for any module that declares its own."""
    shadows = set()
    virtual = conn.execute(VIRTUAL_TABLES).fetchall()
    if not virtual:                     # the common case: no virtual table, no shadow table
        return shadows
    for name, sql in virtual:
        module = VIRTUAL_MODULE.search(sql or "")
        for suffix in SHADOW_SUFFIXES.get(module[1].lower() if module else "", ()):
            shadows.add(f"{name}_{suffix}".lower())
    try:
        listed = conn.execute("PRAGMA main.table_list").fetchall()
    except sqlite3.DatabaseError:       # before SQLite 3.37: no such pragma (it returns nothing)
        listed = []
    shadows.update(row[1].lower() for row in listed if row[2] == "shadow")
    return shadows


def master_rows(conn: sqlite3.Connection) -> list[tuple[str, str, str | None]]:
    """sqlite_master's (type, name, SQL) as SQLite keeps them, in one fixed order."""
    return conn.execute(MASTER_ROWS).fetchall()


def master_sql(conn: sqlite3.Connection, rows: list | None = None) -> dict[str, str]:
    """sqlite_master's SQL text, white space normalised: the cheap first comparison."""
    return {f"{kind} {name}": " ".join((sql or "").split())
            for kind, name, sql in (master_rows(conn) if rows is None else rows)}


_expected_schemas: dict[tuple, tuple[dict[str, object], dict[str, str], list] | None] = {}


def expected_schema(migrations: list[Migration], versions: tuple[int, ...],
                    records: dict[int, dict] | None = None) -> dict[str, str] | None:
    """The schema these versions produce (cached); None when it cannot be known."""
    expected = expected_schemas(migrations, versions, records)
    return None if expected is None else expected[0]


def expected_schemas(migrations: list[Migration], versions: tuple[int, ...],
                     records: dict[int, dict] | None = None):
    """(normalised schema, sqlite_master SQL, sqlite_master rows as written) of these
    versions built in memory, cached.

    No Python migration's code runs here: what one did to the schema comes from the
    record kept when it was applied (see keep_schema_records). None when a Python
    migration among them has no usable record, or the SQL does not build.
    """
    start, rest = starting_record(migrations, versions, records or {})
    if any(m.python for m in rest):
        return None
    key = (tuple((m.version, m.checksum) for m in rest), versions,
           json.dumps(start, sort_keys=True) if start else "")
    if key not in _expected_schemas:
        with closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
            try:
                with migration_transaction(conn):
                    if start:
                        recreate_objects(conn, start["objects"])
                    run_migrations(conn, rest, "up")
                _expected_schemas[key] = (schema_of(conn), master_sql(conn), master_rows(conn))
            except (CommandError, sqlite3.Error):
                _expected_schemas[key] = None
    return _expected_schemas[key]


def starting_record(migrations: list[Migration], versions: tuple[int, ...],
                    records: dict[int, dict]) -> tuple[dict | None, list[Migration]]:
    """The latest usable Python-migration record among these versions, and the migrations
    applied after it (or all of them, without one), in version order."""
    chosen = [m for m in migrations if m.version in versions]
    usable = [records[m.version] for m in chosen if m.python and m.version in records
              and records[m.version]["checksum"] == m.checksum
              and set(records[m.version]["versions"]) <= set(versions)]
    if not usable:
        return None, chosen
    start = max(usable, key=lambda r: (len(r["versions"]), r["version"]))
    return start, [m for m in chosen if m.version not in start["versions"]]


def recreate_objects(conn: sqlite3.Connection, objects: list[list]) -> None:
    """Create recorded schema objects: tables first, then indexes, views and triggers."""
    rank = {"table": 0, "index": 1, "view": 2, "trigger": 3}
    for kind, name, _table, sql in sorted(objects, key=lambda o: rank.get(o[0], 4)):
        made = conn.execute("SELECT 1 FROM sqlite_master WHERE type = ? AND name = ?",
                            (kind, name)).fetchone()
        if made or sql is None:         # made by an earlier one (a virtual table's own tables)
            continue
        if not re.match(r"\s*CREATE\b", sql, re.IGNORECASE):
            raise CommandError(f"a schema record holds '{sql[:40]}', not a CREATE statement")
        conn.execute(sql)


def compare_schemas(expected: dict[str, object], actual: dict[str, object],
                    here: str = "the database", there: str = "the migrations") -> tuple[str, ...]:
    """What differs between two normalised schemas (see schema_of), one line per table,
    column, index, view or trigger: 'column loan.status: only in the database'."""
    lines = []
    for key in sorted(set(expected) | set(actual)):
        if key not in expected:
            lines.append(f"{key}: only in {here}")
        elif key not in actual:
            lines.append(f"{key}: only in {there}")
        elif isinstance(expected[key], dict) and isinstance(actual[key], dict):
            lines += compare_columns(key.split(" ", 1)[1], expected[key], actual[key], here, there)
        elif expected[key] != actual[key]:
            lines.append(f"{key}: different SQL")
    return tuple(lines)


def compare_columns(table: str, expected: dict, actual: dict, here: str, there: str) -> list[str]:
    """One line per column that differs between two versions of a table."""
    lines = []
    for column in list(expected) + [c for c in actual if c not in expected]:
        where = f"column {table}.{column}"
        if column not in expected:
            lines.append(f"{where}: only in {here}")
        elif column not in actual:
            lines.append(f"{where}: only in {there}")
        elif expected[column] != actual[column]:
            lines.append(f"{where}: " + "; ".join(
                column_differences(expected[column], actual[column], here, there)))
    if not lines and list(expected) != list(actual):
        lines.append(f"table {table}: columns in a different order ({there}: "
                     f"{', '.join(expected)}; {here}: {', '.join(actual)})")
    return lines


def column_differences(expected: tuple, actual: tuple, here: str, there: str) -> list[str]:
    """'type REAL in the migrations, INTEGER in the database', and so on for NOT NULL,
    the default and the primary key."""
    (kind, not_null, default, key), (kind2, not_null2, default2, key2) = expected, actual

    def say(value, empty: str) -> str:
        return empty if value in (None, "") else str(value)

    found = []
    if kind != kind2:
        found.append(f"type {say(kind, 'none')} in {there}, {say(kind2, 'none')} in {here}")
    if not_null != not_null2:
        found.append(f"NOT NULL in {there if not_null else here} only")
    if default != default2:
        found.append(f"default {say(default, 'none')} in {there}, {say(default2, 'none')} in {here}")
    if key != key2:
        found.append(f"primary key in {there if key else here} only" if not (key and key2)
                     else f"position {key} in the primary key in {there}, {key2} in {here}")
    return found


def schema_drift(conn: sqlite3.Connection, migrations: list[Migration], applied: list[Applied],
                 records: dict[int, dict]) -> tuple[tuple[str, ...], str]:
    """What differs from the schema the applied migrations produce, and why that could not
    be checked ('' when it was)."""
    known = {m.version for m in migrations}
    versions = tuple(sorted(a.version for a in applied))
    if not versions or not set(versions) <= known:
        return (), ""                   # nothing applied, or 'ahead': said elsewhere
    expected = expected_schemas(migrations, versions, records)
    if expected is None:
        return (), unchecked_reason(migrations, versions, records)
    shape, sql, rows = expected
    actual_rows = master_rows(conn)
    if actual_rows == rows:
        return (), ""                   # the common case: every object as the migrations wrote it
    actual_sql = master_sql(conn, actual_rows)
    changed = {key for key in set(sql) | set(actual_sql) if sql.get(key) != actual_sql.get(key)}
    if not changed:
        return (), ""                   # written differently (white space) but the same
    # Only objects whose text differs are compared by shape (a table's columns), so
    # that a harmless difference in how a CREATE was written is not drift.
    return compare_schemas({k: v for k, v in shape.items() if k in changed},
                           schema_of(conn, only=changed)), ""


def unchecked_reason(migrations: list[Migration], versions: tuple[int, ...],
                     records: dict[int, dict]) -> str:
    _, rest = starting_record(migrations, versions, records)
    python = [m for m in rest if m.python]
    if python:
        return (f"migration {python[0].version} is a Python migration with no schema record "
                f"(what it does to the schema is recorded when this tool applies it; there is "
                f"none for this database), and its code is never run to find out")
    return "the applied migrations' SQL does not build on an empty database in memory"


# --- Records of what Python migrations did -----------------------------------

def schema_record(conn: sqlite3.Connection, migration: Migration) -> dict:
    """The schema right after a Python migration ran, and the versions it reflects."""
    versions = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
    return {"version": migration.version, "checksum": migration.checksum,
            "versions": sorted(versions | {migration.version}),
            "objects": [list(row) for row in conn.execute(SCHEMA_OBJECTS)]}


def keep_schema_records(instance: Instance, records: dict[int, dict]) -> None:
    """After COMMIT, <backup_dir>/<name>/python-schema/<version>.json (0600, never through
    a symbolic link); a failure only warns: drift is then not checked past that migration."""
    folder = instance.home / SCHEMA_RECORDS
    for version, record in sorted(records.items()):
        temporary = folder / f".{version}.json.{os.getpid()}"
        try:
            make_private_folder(instance, folder)
            with suppress(FileNotFoundError):
                temporary.unlink()
            with os.fdopen(open_private(temporary, os.O_EXCL | os.O_WRONLY), "w",
                           encoding="utf-8") as handle:
                json.dump(record, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, folder / f"{version}.json")
        except (OSError, CommandError) as exc:
            print(f"{program()}: warning: no schema record for migration {version} ({exc}); drift "
                  f"is not checked past it", file=sys.stderr)


def read_schema_records(instance: Instance) -> dict[int, dict]:
    """The instance's Python-migration records by version; unreadable ones are left out."""
    folder = instance.home / SCHEMA_RECORDS
    records = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if valid_record(record) and path.stem == str(record["version"]):
                records[record["version"]] = record
        except (OSError, ValueError, TypeError, RecursionError):
            continue
    return records


def valid_record(record) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("version"), int)
            and isinstance(record.get("checksum"), str)
            and isinstance(record.get("versions"), list)
            and all(isinstance(v, int) for v in record["versions"])
            and isinstance(record.get("objects"), list)
            and all(isinstance(o, list) and len(o) == 4 and all(isinstance(x, (str, type(None)))
                                                                 for x in o)
                    for o in record["objects"]))


# --- Planning ----------------------------------------------------------------

def refuse_unsafe(state: State) -> None:
    """Step 1 of migrate: touch nothing when the database is not what we expect."""
    name = state.instance.name
    if state.error:
        raise CommandError(f"{name}: {state.error}")
    if state.modified:
        raise CommandError(f"{name}: {state.problems[0]}; restore the file to what was applied, "
                           f"or add a new migration for the change; nothing changed")
    if state.unknown:
        raise CommandError(f"{name}: the database holds version(s) "
                           f"{', '.join(map(str, state.unknown))} that the migration list does not "
                           f"have (migrated by newer code?); nothing changed")
    failed = [p for p in state.problems if p.startswith("quick_check")]
    if failed:
        raise CommandError(damage_refusal(state.instance, failed[0]))
    if state.untracked:
        raise CommandError(f"{name}: untracked: {state.untracked}; nothing changed; "
                           f"{untracked_step(name, state.runner, state.untracked)}"
                           + ("" if state.untracked.startswith(HALF_MIGRATED) else ", then migrate"))


def damage_refusal(instance: Instance, problem: str, kept: str = "") -> str:
    return (f"{instance.name}: {one_line(problem, instance)}; the database is damaged; nothing "
            f"changed{kept}; {emergency_step(instance)}")


def refuse_damaged(instance: Instance) -> None:
    """quick_check of the live file, for a run that takes no backup to check it."""
    with closing(open_readonly(instance)) as conn:
        problems = integrity_problems(conn, quick=True)
    if problems:
        raise CommandError(damage_refusal(instance, f"quick_check: {problems[0]}"))


def verified_backup(instance: Instance, reason: str, entry: dict,
                    progress: Progress | None = None,
                    copy: Callable[[Instance, Path], None] | None = None) -> Backup:
    """The backup every change starts with (under the instance lock), in the audit entry.

    Its copy's integrity_check is the check of the live database's snapshot: a copy that
    fails it means the database is damaged, and nothing is changed."""
    backup, _ = backup_with_retention(instance, reason, progress, copy)
    entry["backup"] = str(backup.path)
    if not backup.verified:
        problem = backup.problems[0] if backup.problems else "failed"
        if not problem.startswith("integrity_check"):
            problem = f"integrity_check: {problem}"
        raise CommandError(damage_refusal(instance, problem, f"; its copy is kept for "
                                          f"investigation, marked unverified: {backup.path}"))
    return backup


def plan_migrate(state: State, target: int | None, create: bool = False,
                 allow_row_loss: tuple[str, ...] = ()) -> Plan:
    name, current = state.instance.name, state.current_version or 0
    if target is not None and target not in {m.version for m in all_migrations(state.instance)}:
        raise CommandError(f"{name}: --to {target}: no such migration "
                           f"(latest is {state.latest_version})", EXIT_USAGE)
    if target is not None and target < current:
        raise CommandError(f"{name}: already at version {current}, above --to {target}; "
                           f"use 'rollback {name} --to {target}' to go back")
    chosen = tuple(m for m in state.pending if target is None or m.version <= target)
    return Plan(instance=state.instance, from_version=current,
                to_version=max([current] + [m.version for m in chosen]),
                migrations=chosen, destructive=destructive_statements(chosen, "up"), create=create,
                applied=tuple(a.version for a in state.applied), allow_row_loss=allow_row_loss)


def destructive_statements(migrations, direction: str) -> tuple[tuple[int, str, str], ...]:
    found = []
    for migration in migrations:
        if migration.python and migration.declared_destructive:
            found.append((migration.version, "Python migration marked DESTRUCTIVE",
                          Path(migration.source).name))
        for statement in (migration.up if direction == "up" else migration.down):
            kind = destructive_kind(statement)
            if kind:
                found.append((migration.version, kind, statement))
    return tuple(found)


# --- Applying ----------------------------------------------------------------

class TransactionGuard:
    """An authorizer that refuses, inside a migration, what would leave its transaction:
    BEGIN/COMMIT/ROLLBACK, ATTACH/DETACH, load_extension() and the ESCAPING_PRAGMAS; and
    every statement once SQLite has ended the run's transaction on its own (a disk-full
    or I/O error), so that nothing after that point can run, and commit, in autocommit.
    It remembers its first refusal, and a Ctrl-C during the transaction (note_interrupt),
    so that a migration that catches either cannot let the run commit."""

    def __init__(self, conn: sqlite3.Connection | None = None) -> None:
        self.active = False
        self.conn = conn
        self.refused = ""           # what it refused first, while active
        self.interrupted = False    # a Ctrl-C arrived while active
        self.written: set[str] = set()  # tables written while active (lower case)
        self.asked = 0              # requests while active

    def __call__(self, action, first, second, *_):
        if not self.active:
            return sqlite3.SQLITE_OK
        self.asked += 1
        if escapes(action, first, second) or not self.conn.in_transaction:
            self.refused = self.refused or (REFUSED if self.conn.in_transaction else TRANSACTION_ENDED)
            return sqlite3.SQLITE_DENY
        if action in WRITES_TABLE:
            self.written.add(((first, second)[WRITES_TABLE[action]] or "").lower())
        return sqlite3.SQLITE_OK

    def still_asked(self) -> bool:
        """Whether SQLite still asks this guard: a statement it has never compiled must
        come to it. Code that reached the raw connection could have removed it, and then
        nothing it refuses, nor the tables written, would be known."""
        asked = self.asked
        self.conn.execute(f"SELECT 1 -- the guard, asked at {time.monotonic_ns()}").fetchone()
        return self.asked > asked

    def note_interrupt(self, *_) -> None:
        """SIGINT during the transaction: remembered, then raised as usual."""
        self.interrupted = True
        raise KeyboardInterrupt


def escapes(action: int, first: str | None, second: str | None) -> bool:
    """True for an authorizer request that would leave the run's transaction."""
    if action in (SQLITE_TRANSACTION, SQLITE_ATTACH, SQLITE_DETACH):
        return True
    if action == SQLITE_FUNCTION:
        return (second or "").lower() == "load_extension"
    return action == SQLITE_PRAGMA and escaping_pragma(first or "", second is not None)


class MigrationConnection:
    """What a Python migration's up(conn) receives: it reads and writes inside the run's
    transaction and nothing else. Once that transaction is gone (SQLite ends it on its own
    after a disk-full or I/O error) every call is refused, so nothing can run in autocommit;
    a refusal fails the run even when the migration catches it. Its cursors are
    MigrationCursors, so cursor.connection is this object, not the raw connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.refused = ""
        self.ended_by_sqlite = False    # SQLite ended the transaction during one of our calls

    def execute(self, sql: str, parameters=()):
        return MigrationCursor(self._run(self._conn.execute, sql, parameters), self)

    def executemany(self, sql: str, seq_of_parameters):
        return MigrationCursor(self._run(self._conn.executemany, sql, seq_of_parameters), self)

    def _run(self, method, sql: str, parameters):
        if not self._conn.in_transaction:
            self.refuse(TRANSACTION_ENDED)
        reason = escape_reason(sql) if isinstance(sql, str) else ""
        if reason:
            self.refuse(reason)
        try:
            return method(sql, parameters)
        except sqlite3.DatabaseError as exc:
            if "not authorized" in str(exc):
                self.refuse(REFUSED)
            self.ended_by_sqlite = not self._conn.in_transaction
            raise

    def refuse(self, reason: str) -> None:
        self.refused = self.refused or reason
        raise CommandError(reason)

    def commit(self) -> None:
        self.refuse("a migration cannot commit; the tool commits the whole run at the end")

    rollback = commit

    def executescript(self, _script: str) -> None:
        self.refuse("executescript commits on its own; use execute() per statement")


class MigrationCursor:
    """A cursor handed to a Python migration: it reads like sqlite3.Cursor, and its
    execute() and connection go through the MigrationConnection."""

    def __init__(self, cursor: sqlite3.Cursor, connection: MigrationConnection) -> None:
        self._cursor = cursor
        self.connection = connection

    def execute(self, sql: str, parameters=()):
        self._cursor = self.connection._run(self._cursor.execute, sql, parameters)
        return self

    def executemany(self, sql: str, seq_of_parameters):
        self._cursor = self.connection._run(self._cursor.executemany, sql, seq_of_parameters)
        return self

    def executescript(self, script: str) -> None:
        self.connection.executescript(script)

    def __iter__(self):
        return iter(self._cursor)

    def __getattr__(self, name: str):      # fetchone, fetchall, description, rowcount, ...
        return getattr(self._cursor, name)


def run_migrations(conn: sqlite3.Connection, migrations, direction: str,
                   backup_note: str = "", record: bool = False,
                   ledger: RowLedger | None = None,
                   schema_records: dict[int, dict] | None = None,
                   progress: Progress | None = None,
                   guard: TransactionGuard | None = None) -> list[int]:
    """Run the up (or down) parts inside the caller's transaction; schema_records, when
    given, receives what each Python up() left the schema as (see schema_record); guard:
    the transaction's, whose refusals fail the Python migration that caused them."""
    done = []
    ledger = ledger or RowLedger()
    for migration in migrations:
        started = time.perf_counter()
        if progress is not None:
            progress.step(f"{'applying' if direction == 'up' else 'undoing'} {migration.label}",
                          keep=True)
        if migration.python:
            with ledger.watch_python(conn, migration):
                run_python(conn, migration, direction, backup_note, guard)
            if schema_records is not None and direction == "up":
                schema_records[migration.version] = schema_record(conn, migration)
        for statement in (migration.up if direction == "up" else migration.down):
            try:
                with ledger.watch_statement(conn, migration.version, statement):
                    conn.execute(statement)
            except sqlite3.Error as exc:
                raise CommandError(failure(migration, statement, exc, backup_note)) from exc
        if record and direction == "up":
            elapsed_ms = round((time.perf_counter() - started) * 1000)
            conn.execute(RECORD_APPLIED, (migration.version, migration.description,
                                          migration.checksum, elapsed_ms))
        elif record:
            conn.execute(FORGET_APPLIED, (migration.version,))
        done.append(migration.version)
    return done


def run_python(conn: sqlite3.Connection, migration: Migration, direction: str, note: str,
               guard: TransactionGuard | None = None) -> None:
    function = python_functions(migration).get(direction)
    if function is None:            # read as a def, but not a function once imported
        raise CommandError(failure(migration, f"{direction}(conn)", f"{direction} is not a "
                                   f"function when the file runs", note))
    wrapper = MigrationConnection(conn)
    try:
        function(wrapper)
    except SystemExit as exc:       # sys.exit() in a migration fails the run, whatever its code
        raise CommandError(failure(migration, f"{direction}(conn)",
                                   f"it called sys.exit({exc.code!r})", note)) from exc
    except Exception as exc:  # noqa: BLE001 - a user's code may raise anything; roll back
        check_still_ours(conn, migration, direction, wrapper, note)
        raise CommandError(failure(migration, f"{direction}(conn)",
                                   refusal(conn, wrapper, guard) or exc, note)) from exc
    check_still_ours(conn, migration, direction, wrapper, note)
    if refusal(conn, wrapper, guard):   # caught by the migration, which went on: still a failure
        raise CommandError(failure(migration, f"{direction}(conn)", refusal(conn, wrapper, guard),
                                   note))


def check_still_ours(conn: sqlite3.Connection, migration: Migration, direction: str,
                     wrapper: MigrationConnection, note: str) -> None:
    """After a Python migration: the run's transaction must still be open, or have been
    ended by SQLite itself (then nothing was committed). Otherwise the migration's own
    code closed the connection, or committed or rolled back behind the tool's back, and
    the tool cannot say what the database holds now."""
    where = f"migration {migration.version} ({migration.description}) failed: "
    if not is_open(conn):
        raise CommandError(f"{where}its code closed the database connection (statement: "
                           f"{direction}(conn)); SQLite rolled the run back, nothing "
                           f"changed{note}")
    if conn.in_transaction or wrapper.ended_by_sqlite:
        return
    ended = (f"{where}the run's transaction ended inside it (committed or rolled back by the "
             f"migration's own code, not by the tool)")
    if not note.startswith("; backup: "):   # a rehearsal's copy or a --create draft: discarded
        raise CommandError(f"{ended}; the run stopped there")
    raise CommandError(f"{ended}; changes may have been committed: check the database and "
                       f"restore {note[len('; backup: '):]} (the backup taken before this run) "
                       f"if needed")


def refusal(conn: sqlite3.Connection, wrapper: MigrationConnection,
            guard: TransactionGuard | None = None) -> str:
    """Why a Python migration failed the run although it may have caught the error."""
    return (wrapper.refused or (guard.refused if guard is not None else "")
            or ("" if conn.in_transaction else TRANSACTION_ENDED))


def failure(migration: Migration, statement: str, error, note: str) -> str:
    line = python_line(migration, error)
    if isinstance(error, sqlite3.DatabaseError) and "not authorized" in str(error):
        error = escape_reason(statement) or REFUSED
    elif isinstance(error, (sqlite3.Error, OSError)):
        error = describe_error(error)       # a full disk says what ran out
    elif isinstance(error, Exception) and not isinstance(error, CommandError):
        error = f"{type(error).__name__}: {error}"     # a Python migration's own error
    error = f"{error}{line}"
    text = " ".join(statement.split())
    return (f"migration {migration.version} ({migration.description}) failed: {error}; "
            f"statement: {text[:200]}; rolled back, nothing changed{note}")


def python_line(migration: Migration, error) -> str:
    """' (line N of 0004_x.py: the line)' where a Python migration's error was raised."""
    if not migration.python or not isinstance(error, BaseException):
        return ""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == migration.source]
    if not frames:
        return ""
    return f" (line {frames[-1].lineno} of {Path(migration.source).name}: {(frames[-1].line or '').strip()})"


def row_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Rows per table (not shadow tables), counted in one statement per 500 tables."""
    shadows = shadow_tables(conn)
    tables = [name for (name,) in conn.execute(USER_TABLES).fetchall() if name.lower() not in shadows]
    counts: dict[str, int] = {}
    for start in range(0, len(tables), 500):
        chunk = tables[start:start + 500]
        counters = ", ".join('(SELECT COUNT(*) FROM "' + t.replace('"', '""') + '")' for t in chunk)
        counts.update(zip(chunk, conn.execute(f"SELECT {counters}").fetchone()))
    return counts


def table_key(name: str) -> str:
    """A table name as SQLite compares it: unquoted, case-insensitive."""
    if name[:1] in "\"[`" and len(name) > 1:
        name = name[1:-1].replace('""', '"') if name[0] == '"' else name[1:-1]
    return name.lower()


class RowLedger:
    """What a run's confirmed statements removed: the lost-row guard's allowance.

    A confirmed DELETE FROM a table may remove the rows it removes from that table
    (counted around the statement); a confirmed DROP TABLE may remove a table that
    is not re-created under its name; a confirmed DESTRUCTIVE Python migration may
    remove what it removes (every table counted around it). Renames are followed,
    so a table renamed away keeps its rows under its new name.
    """

    def __init__(self, plan: Plan | None = None) -> None:
        self.confirmed = {(v, s) for v, _, s in plan.destructive} if plan else set()
        self.allowed = {table_key(t) for t in plan.allow_row_loss} if plan else set()
        self.removed: dict[str, int] = {}       # table -> rows that confirmed statements removed
        self.dropped: set[str] = set()          # tables a confirmed statement dropped
        self.renamed: list[tuple[str, str]] = []    # (old, new), in the order they ran

    @contextmanager
    def watch_statement(self, conn: sqlite3.Connection, version: int, statement: str) -> Iterator[None]:
        sql = bare_sql(statement)
        confirmed = (version, statement) in self.confirmed
        deleted = DELETES_FROM.match(sql) if confirmed else None
        before = count_rows(conn, deleted["name"]) if deleted else None
        yield
        if before is not None:
            self.note_removed(deleted["name"], before - (count_rows(conn, deleted["name"]) or 0))
        dropped, renamed = DROPS_TABLE.match(sql), RENAMES_TABLE.match(sql)
        if confirmed and dropped:
            self.dropped.add(table_key(dropped["name"]))
        if renamed:
            self.renamed.append((table_key(renamed["name"]), table_key(renamed["new"])))

    @contextmanager
    def watch_python(self, conn: sqlite3.Connection, migration: Migration) -> Iterator[None]:
        confirmed = (migration.version, Path(migration.source).name) in self.confirmed
        before = row_counts(conn) if confirmed else {}
        yield
        if confirmed:
            after = row_counts(conn)
            for table, count in before.items():
                self.note_removed(table, count - after.get(table, 0))
                if table not in after:
                    self.dropped.add(table_key(table))

    def note_removed(self, table: str, rows: int) -> None:
        if rows > 0:
            self.removed[table_key(table)] = self.removed.get(table_key(table), 0) + rows

    def names(self, table: str) -> list[str]:
        """The names a table had during the run, following its renames in order."""
        names = [table_key(table)]
        for old, new in self.renamed:
            if old == names[-1]:
                names.append(new)
        return names


def count_rows(conn: sqlite3.Connection, name: str) -> int | None:
    """Rows in the table a statement names; None if that name is no table we can count
    (the statement then fails on its own, or its rows are simply not allowed for)."""
    quoted = '"' + table_key(name).replace('"', '""') + '"'
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {quoted}").fetchone()[0]
    except sqlite3.OperationalError:
        return None


def lost_rows(before: dict[str, int], after: dict[str, int], ledger: RowLedger) -> list[tuple[str, str]]:
    """(table, what happened) for every table that lost rows no confirmation covers."""
    now = {table_key(t): count for t, count in after.items()}
    lost = []
    for table, count in before.items():
        names = ledger.names(table)
        if names[0] in ledger.allowed:
            continue
        if names[0] in now:                 # still there, or re-created: compared under its name
            rows, allowance = now[names[0]], ledger.removed.get(names[0], 0)
        elif len(names) > 1 and names[-1] in now:   # renamed away: its rows are under the new name
            rows, allowance = now[names[-1]], sum(ledger.removed.get(n, 0) for n in names)
        elif any(n in ledger.dropped for n in names):
            continue                        # dropped by a confirmed DROP TABLE, not re-created
        else:
            lost.append((table, f"table {table} had {count} rows before the run and no longer "
                                f"exists"))
            continue
        if count - rows > allowance:
            lost.append((table, f"table {table} had {count} rows before the run and has {rows}"
                                + (f" (confirmed statements removed {allowance})" if allowance else "")))
    return lost


def ensure_tracking_table(conn: sqlite3.Connection, migrations: list[Migration]) -> None:
    """Create schema_migrations, or upgrade the older three-column one in place."""
    columns = tracking_columns(conn)
    if not columns:
        conn.execute(TRACKING_TABLE)
        return
    for column, kind in (("checksum", "TEXT"), ("execution_ms", "INTEGER")):
        if column not in columns:
            conn.execute(f"ALTER TABLE schema_migrations ADD COLUMN {column} {kind}")
    known = {m.version: m for m in migrations}
    unfilled = [v for (v,) in conn.execute("SELECT version FROM schema_migrations "
                                           "WHERE checksum IS NULL").fetchall() if v in known]
    conn.executemany(FILL_CHECKSUM, [(known[v].checksum, v) for v in unfilled])


@contextmanager
def migration_transaction(conn: sqlite3.Connection, audit: dict | None = None) -> Iterator[TransactionGuard]:
    """Foreign keys off (set before BEGIN, or it is a no-op), one transaction, guard on.

    audit: the audit entry of a real run; Ctrl-C is held back from just before COMMIT
    until that entry is written (safe_db_update.hold_interrupts). Before that, a Ctrl-C
    is noted by the guard as well as raised, and a noted one, or a refusal the guard
    noted, fails the run before COMMIT even when a migration caught it.
    """
    guard = TransactionGuard(conn)
    conn.set_authorizer(guard)
    if hasattr(conn, "enable_load_extension"):     # off by default; make sure it stays off
        conn.enable_load_extension(False)
    conn.execute("PRAGMA foreign_keys = OFF")
    patience = conn.execute("PRAGMA busy_timeout").fetchone()[0]     # ms: the busy_timeout
    previous = note_interrupts(guard)
    try:
        conn.execute("BEGIN IMMEDIATE")     # waits up to busy_timeout for another writer
        try:
            # Writing pages out early (a cache spill) needs the readers gone; waiting for
            # them there, again and again, would hold the database locked for longer than
            # busy_timeout. Without waiting, the pages stay in memory until COMMIT.
            conn.execute("PRAGMA busy_timeout = 0")
            guard.active = True
            yield guard
            if not guard.still_asked():
                raise CommandError(GUARD_REMOVED)
            guard.active = False
            conn.execute(f"PRAGMA busy_timeout = {patience}")   # COMMIT: readers, busy_timeout
            previous = restore_interrupts(previous)
            refuse_noted(guard)
            if audit is not None:
                hold_interrupts(audit)
            conn.execute("COMMIT")
            if audit is not None and os.environ.get("DB_MIGRATION_TEST_SIGINT_AFTER_COMMIT"):
                os.kill(os.getpid(), signal.SIGINT)     # tests only: Ctrl-C at the worst moment
        except BaseException as exc:
            guard.active = False
            previous = restore_interrupts(previous)
            if is_open(conn) and conn.in_transaction:
                conn.execute("ROLLBACK")
            if guard.interrupted and not isinstance(exc, KeyboardInterrupt):
                raise KeyboardInterrupt from exc    # the migration caught Ctrl-C, then failed
            raise
    finally:
        restore_interrupts(previous)
        if is_open(conn):
            conn.execute(f"PRAGMA busy_timeout = {patience}")
            conn.set_authorizer(TransactionGuard())
            conn.execute("PRAGMA foreign_keys = ON")


def note_interrupts(guard: TransactionGuard):
    """Route Ctrl-C through the guard for the transaction; the handler it replaced (None
    where it cannot: not the main thread, or Ctrl-C is ignored)."""
    try:
        if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None):
            return None
        return signal.signal(signal.SIGINT, guard.note_interrupt)
    except ValueError:              # not the main thread: the signal goes to another one
        return None


def restore_interrupts(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)


def refuse_noted(guard: TransactionGuard) -> None:
    """Just before COMMIT: a Ctrl-C or a refusal during the run fails it, caught or not."""
    if guard.interrupted:
        raise KeyboardInterrupt
    if guard.refused:
        raise CommandError(f"{guard.refused} (a migration caught the refusal and went on; a "
                           f"refusal fails the run all the same); rolled back, nothing changed")


def is_open(conn: sqlite3.Connection) -> bool:
    try:
        conn.in_transaction
    except sqlite3.ProgrammingError:    # closed (by a migration's code)
        return False
    return True


def apply_plan(conn: sqlite3.Connection, plan: Plan, migrations: list[Migration],
               backup_note: str = "", expected: dict[str, str] | None = None,
               audit: dict | None = None, progress: Progress | None = None) -> list[int]:
    """All of the plan in one transaction, checked before COMMIT; nothing on failure.

    audit: the audit entry of a real run (not a rehearsal): Ctrl-C after COMMIT is held
    until it is written, and Python migrations' schema records are kept. progress: what
    a terminal is shown.
    """
    name = plan.instance.name
    progress = progress or Progress(name, False)
    try:
        return apply_in_transaction(conn, plan, migrations, backup_note, expected, audit, progress)
    except sqlite3.Error as exc:       # BEGIN or COMMIT kept waiting, the disk, the tracking table
        if is_busy(exc):
            raise CommandError(f"{locked_message(plan.instance)}{backup_note}") from exc
        raise CommandError(f"{name}: {describe_error(exc)}; rolled back, nothing changed"
                           f"{backup_note}") from exc
    except CommandError as exc:        # a statement failed: say on which instance
        if str(exc).startswith(f"{name}: "):
            raise
        raise CommandError(f"{name}: {exc}", exc.exit_code) from exc


def apply_in_transaction(conn: sqlite3.Connection, plan: Plan, migrations: list[Migration],
                         backup_note: str, expected: dict[str, str] | None,
                         audit: dict | None, progress: Progress) -> list[int]:
    schema_records: dict[int, dict] = {}
    progress.step("waiting for the write lock")
    with migration_transaction(conn, audit) as guard:
        if tuple(a.version for a in read_applied(conn)) != plan.applied:
            raise CommandError(f"{plan.instance.name}: changed by someone else since the plan was "
                               f"made; nothing done; run the command again")
        progress.step("counting rows (for the lost-row guard)")
        before = row_counts(conn)
        definitions = table_definitions(conn)
        ensure_tracking_table(conn, migrations)
        ledger = RowLedger(plan)
        done = run_migrations(conn, plan.migrations, plan.direction, backup_note, record=True,
                              ledger=ledger, schema_records=schema_records, progress=progress,
                              guard=guard)
        progress.step("checking foreign keys and row counts, then committing")
        check_before_commit(conn, plan, before, backup_note, ledger,
                            tables_to_check(conn, guard.written, definitions))
        if expected is not None:
            differences = compare_schemas(expected, schema_of(conn))
            if differences:
                raise CommandError(f"after the down parts the schema is not that of version "
                                   f"{plan.to_version}: {differences[0]}; rolled back, nothing "
                                   f"changed{backup_note}")
    if audit is not None and schema_records:
        keep_schema_records(plan.instance, schema_records)
    return done


def table_definitions(conn: sqlite3.Connection) -> dict[str, str]:
    """Each table's CREATE statement by its name, in the order the tables were made."""
    return dict(conn.execute(TABLE_DEFINITIONS).fetchall())


def tables_to_check(conn: sqlite3.Connection, written: set[str], before: dict[str, str]) -> list[str]:
    """The tables whose references the run can have broken (foreign keys are off during
    it): each table it wrote, created, altered, renamed or dropped, and each table whose
    foreign keys refer to one of those. A reference elsewhere is as the run found it."""
    after = table_definitions(conn)
    old = {name.lower(): sql for name, sql in before.items()}
    new = {name.lower(): sql for name, sql in after.items()}
    changed = written | {name for name in old.keys() | new.keys() if old.get(name) != new.get(name)}
    parents: dict[str, set[str]] = {}
    for child, parent in conn.execute(REFERENCES).fetchall():
        parents.setdefault(child, set()).add(parent.lower())
    return [name for name in after if name.lower() in changed or parents.get(name, set()) & changed]


def broken_references(conn: sqlite3.Connection, tables: list[str]) -> list[tuple]:
    """PRAGMA foreign_key_check of each table: (table, rowid, parent, index) per broken row."""
    broken: list[tuple] = []
    for table in tables:
        quoted = '"' + table.replace('"', '""') + '"'
        broken += conn.execute(f"PRAGMA foreign_key_check({quoted})").fetchall()
    return broken


def check_before_commit(conn: sqlite3.Connection, plan: Plan, before: dict[str, int],
                        note: str, ledger: RowLedger, tables: list[str]) -> None:
    broken = broken_references(conn, tables)
    if broken:
        table, rowid, parent, _ = broken[0]
        culprit = last_touching(plan.migrations, plan.direction, (table, parent))
        blame = (f"migration {culprit.label} is the last in this run that touches {table} or "
                 f"{parent}" if culprit else f"no migration in this run names {table} or "
                 f"{parent}: the broken references were there before it (see "
                 f"'{tool_command('safe_db_update.py')} check {plan.instance.name}')")
        raise CommandError(f"foreign key check failed: {table} row {rowid} refers to a missing "
                           f"row in {parent} ({len(broken)} such row(s)); {blame}; rolled back, "
                           f"nothing changed{note}")
    lost = lost_rows(before, row_counts(conn), ledger)
    if lost:
        flags = " ".join(f"--allow-row-loss {shlex.quote(table)}" for table, _ in lost)
        raise CommandError(f"lost-row guard: {'; '.join(text for _, text in lost)}, and no confirmed "
                           f"statement removed those rows (a confirmation covers only the statement "
                           f"it confirms); rolled back, nothing changed; if that loss is intended, "
                           f"run again with {flags}{note}")


def last_touching(migrations, direction: str, tables: tuple[str, ...]) -> Migration | None:
    """The last of the run's migrations whose statements (or Python code) name one of the
    tables: the one a failed foreign key check points to. The check itself runs once, at
    the end; naming the culprit costs nothing until it fails."""
    names = [re.compile(rf"(?<![\w$]){re.escape(t.upper())}(?![\w$])") for t in tables]
    for migration in reversed(tuple(migrations)):
        text = migration.python.upper() + " ".join(
            bare_sql(s) for s in (migration.up if direction == "up" else migration.down))
        if any(name.search(text) for name in names):
            return migration
    return None


# --- Dry run -----------------------------------------------------------------

def table_shapes(conn: sqlite3.Connection) -> dict[str, Table]:
    shadows = shadow_tables(conn)
    return {name: describe_table(conn, name) for (name,) in conn.execute(USER_TABLES).fetchall()
            if name.lower() not in shadows}


def rehearse(plan: Plan, migrations: list[Migration], progress: Progress | None = None) -> Rehearsal:
    """Run the plan on a copy in the system's temporary folder; the instance is untouched."""
    progress = progress or Progress(plan.instance.name, False)
    started = time.perf_counter()
    try:
        scratch = tempfile.mkdtemp(prefix="db-migration-dry-run-")
    except OSError as exc:
        raise CommandError(no_room_to_rehearse(plan.instance, tempfile.gettempdir(), exc)) from exc
    try:
        copy_path = Path(scratch) / "rehearsal.db"
        with closing(sqlite3.connect(copy_path, isolation_level=None)) as copy:
            try:
                if plan.instance.path.exists():
                    progress.done()
                    with closing(open_readonly(plan.instance)) as source, \
                            progress_line(plan.instance, copy_path, progress.enabled,
                                          "dry run: copying to a temporary folder", "copied"):
                        source.backup(copy)
                copy.execute("PRAGMA journal_mode = DELETE")
            except (sqlite3.Error, OSError) as exc:
                raise CommandError(no_room_to_rehearse(plan.instance, scratch, exc)) from exc
            before = table_shapes(copy)
            try:
                apply_plan(copy, plan, migrations, progress=progress)
            except CommandError as exc:
                return Rehearsal(ok=False, error=str(exc).replace(", nothing changed", ""),
                                 seconds=time.perf_counter() - started)
            after = table_shapes(copy)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return Rehearsal(ok=True, error="", seconds=time.perf_counter() - started,
                     **shape_changes(before, after))


def no_room_to_rehearse(instance: Instance, folder: str, exc: BaseException) -> str:
    return (f"{instance.name}: dry run: cannot copy the database into the temporary folder "
            f"{folder}: {describe_error(exc)}; free space there or point TMPDIR at a folder "
            f"with room; nothing changed")


def shape_changes(before: dict[str, Table], after: dict[str, Table]) -> dict:
    common = sorted(set(before) & set(after))

    def rows(shapes: dict[str, Table], table: str) -> int:
        return shapes[table].rows if table in shapes else 0

    return {
        "tables_added": tuple(sorted(set(after) - set(before))),
        "tables_removed": tuple(sorted(set(before) - set(after))),
        "columns_added": tuple(f"{t}.{c}" for t in common for c in after[t].columns
                               if c not in before[t].columns),
        "columns_removed": tuple(f"{t}.{c}" for t in common for c in before[t].columns
                                 if c not in after[t].columns),
        "row_changes": tuple((t, rows(before, t), rows(after, t))
                             for t in sorted(set(before) | set(after))
                             if rows(before, t) != rows(after, t)),
    }


# --- Rollback and baseline ---------------------------------------------------

def plan_rollback(state: State, target: int, allow_row_loss: tuple[str, ...] = ()) -> Plan:
    name, current = state.instance.name, state.current_version or 0
    if target >= current:
        raise CommandError(f"{name}: at version {current}; --to {target} is not below it, "
                           f"nothing to roll back", EXIT_USAGE if target > current else EXIT_FAILED)
    known = {m.version: m for m in all_migrations(state.instance)}
    undo = tuple(known[a.version] for a in reversed(state.applied) if a.version > target)
    lacking = [m.label for m in undo if not m.has_down]
    if lacking:
        raise CommandError(f"{name}: cannot roll back: no down part in {', '.join(lacking)}; "
                           f"nothing changed; to go back, restore a backup taken before it "
                           f"('safe_db_update.py list-backups {name}', then 'restore {name} FILE')")
    return Plan(instance=state.instance, from_version=current, to_version=target,
                migrations=undo, destructive=destructive_statements(undo, "down"), direction="down",
                applied=tuple(a.version for a in state.applied), allow_row_loss=allow_row_loss)


def rollback_instance(args: argparse.Namespace, instance: Instance) -> Outcome:
    migrations = all_migrations(instance)
    started = time.perf_counter()
    with audited(instance, "rollback") as entry:
        require_database(instance)
        state = inspect(instance, migrations, quick_check=True, with_drift=False)
        refuse_unsafe(state)
        plan = plan_rollback(state, args.to, tuple(args.allow_row_loss))
        entry.update(version_before=plan.from_version, version_after=plan.from_version)
        if plan.destructive:
            confirm_destructive(args, plan)
        with instance_lock(instance, "rollback"):
            backup = verified_backup(instance, "pre-rollback", entry)
            expected = expected_schema(migrations, tuple(a.version for a in state.applied
                                                         if a.version <= plan.to_version),
                                       read_schema_records(instance))
            with closing(connect(instance)) as conn:
                undone = apply_plan(conn, plan, migrations, f"; backup: {backup.path}", expected,
                                    audit=entry)
        entry["version_after"] = plan.to_version
    return Outcome(plan, tuple(undone), backup, time.perf_counter() - started)


def baseline_instance(args: argparse.Namespace, instance: Instance) -> tuple[tuple[str, ...], Backup]:
    """Record 1..V as applied without running them, once the schema matches."""
    migrations = all_migrations(instance)
    if args.to not in {m.version for m in migrations}:
        raise CommandError(f"{instance.name}: --to {args.to}: no such migration", EXIT_USAGE)
    chosen = [m for m in migrations if m.version <= args.to]
    with audited(instance, "baseline") as entry:
        with closing(open_readonly(instance)) as conn:
            try:
                applied, actual = read_applied(conn), schema_of(conn)
            except sqlite3.Error as exc:
                raise CommandError(f"{instance.name}: cannot read {instance.path}: {exc}") from exc
            if applied:
                raise CommandError(f"{instance.name}: versions are already recorded; baseline is "
                                   f"only for a database that predates the tool (see 'check')")
            runner = foreign_runner(conn)
            if runner is not None:
                raise CommandError(f"{instance.name}: the database was built by {runner.name} (its "
                                   f"{runner.table} table); use 'adopt {instance.name}', which "
                                   f"records what {runner.name} applied; nothing recorded")
            versions = tuple(m.version for m in chosen)
            expected = expected_schema(migrations, versions)
            differences = compare_schemas(expected, actual) if expected is not None else \
                (f"schema not compared: {unchecked_reason(migrations, versions, {})}",)
        entry.update(version_before=0, version_after=0, differences=list(differences))
        if differences and not args.force:
            raise CommandError(f"{instance.name}: the schema does not match migrations up to "
                               f"{args.to} ({len(differences)} difference(s); first: "
                               f"{differences[0]}); nothing recorded; --force records anyway")
        with instance_lock(instance, "baseline"):
            backup = verified_backup(instance, "pre-migrate", entry)
            try:
                with closing(connect(instance)) as conn, migration_transaction(conn, entry):
                    ensure_tracking_table(conn, migrations)
                    conn.executemany(RECORD_APPLIED, [(m.version, m.description, m.checksum, 0)
                                                      for m in chosen])
            except sqlite3.Error as exc:
                raise CommandError(f"{instance.name}: baseline failed: {exc}; rolled back, nothing "
                                   f"recorded; backup: {backup.path}") from exc
        entry["version_after"] = args.to
    return differences, backup


# --- Adopting another runner's database --------------------------------------

def adopt_instance(args: argparse.Namespace, instance: Instance) -> Adoption:
    """Record what another runner applied in our table, once the schema matches, after a backup."""
    migrations = all_migrations(instance)
    started = time.perf_counter()
    with audited(instance, "adopt", before=0) as entry:
        require_database(instance)
        with closing(open_readonly(instance)) as conn:
            try:
                runner = foreign_runner(conn)
                if runner is None:
                    adoption = untracked_or_ours(conn, instance)
                    current = max(adoption.versions, default=0)
                    entry.update(version_before=current, version_after=current)
                    return adoption
                rows = read_runner_rows(conn, instance, runner)
                actual = schema_of(conn)
            except sqlite3.Error as exc:
                raise CommandError(f"{instance.name}: cannot read {instance.path}: {exc}") from exc
        versions = adopted_versions(instance, runner, rows, migrations)
        differences = compare_schemas(expected_schema(migrations, versions) or {}, actual)
        entry.update(runner=runner.name, differences=list(differences))
        if differences and not args.force:
            raise CommandError(f"{instance.name}: the schema does not match what the "
                               f"{len(versions)} migration(s) {runner.name} recorded produce "
                               f"({len(differences)} difference(s); first: {differences[0]}); "
                               f"nothing recorded; --force records anyway")
        with instance_lock(instance, "adopt"):
            backup = verified_backup(instance, "pre-migrate", entry)
            try:
                with closing(connect(instance)) as conn, migration_transaction(conn, entry):
                    if foreign_runner(conn) != runner or read_runner_rows(conn, instance, runner) != rows:
                        raise CommandError(f"{instance.name}: changed by someone else since it was "
                                           f"read; nothing done; run adopt again")
                    record_adoption(conn, runner, [m for m in migrations if m.version in versions], rows)
            except sqlite3.Error as exc:
                raise CommandError(f"{instance.name}: adopt failed: {exc}; rolled back, nothing "
                                   f"changed; backup: {backup.path}") from exc
        entry["version_after"] = max(versions, default=0)
    return Adoption(instance, runner, versions, differences, backup, time.perf_counter() - started)


def untracked_or_ours(conn: sqlite3.Connection, instance: Instance) -> Adoption:
    """No other runner's table: already ours (nothing to do), or a database built by hand."""
    if tracking_columns(conn):          # a schema_migrations nobody understands is refused here
        return Adoption(instance, None, tuple(a.version for a in read_applied(conn)))
    raise CommandError(f"{instance.name}: no other migration runner's tracking table in "
                       f"{instance.path} (looked for: "
                       + ", ".join(f"{r.name}'s {r.table}" for r in RUNNERS)
                       + f"); for a database built without one, use 'baseline {instance.name} --to V'")


def read_runner_rows(conn: sqlite3.Connection, instance: Instance,
                     runner: Runner) -> dict[int, tuple[str | None, int | None]]:
    """{version: (applied_at, execution_ms)} as the runner recorded them; a half-done run is refused."""
    version = half_migrated(conn, runner)
    if version is not None:
        raise CommandError(
            f"{instance.name}: {runner.name} left this database half-migrated: its "
            f"{runner.table} has {runner.half_done} for version {version}; nothing "
            f"changed (--force does not change this); {half_migrated_step(instance.name, runner)}")
    rows = {}
    for version, applied_at, execution_ms in conn.execute(runner.versions_sql).fetchall():
        text = str(version).strip()
        if not text.isdigit() or int(text) < 1:
            raise CommandError(f"{instance.name}: {runner.name}'s {runner.table} holds version "
                               f"{version!r}, which is not a positive whole number; nothing changed")
        rows[int(text)] = (None if applied_at is None else str(applied_at), execution_ms)
    return rows


def adopted_versions(instance: Instance, runner: Runner, rows: dict,
                     migrations: list[Migration]) -> tuple[int, ...]:
    """The versions to record: those in the runner's table (for golang-migrate, all up to its one)."""
    known = sorted(m.version for m in migrations)
    unknown = sorted(set(rows) - set(known))
    if unknown:
        raise CommandError(f"{instance.name}: {runner.name}'s {runner.table} holds version(s) "
                           f"{', '.join(map(str, unknown))} that {instance.migrations_dir} does "
                           f"not have; point migrations_dir at the folder that built this "
                           f"database; nothing changed")
    if runner.only_latest:
        return tuple(v for v in known if rows and v <= max(rows))
    return tuple(sorted(rows))


def record_adoption(conn: sqlite3.Connection, runner: Runner, adopted: list[Migration],
                    rows: dict) -> None:
    """Inside the caller's transaction: our table, holding every version the runner recorded."""
    if runner.table == "schema_migrations":
        # Upgraded in place: the runner's table is rebuilt as ours under its own name,
        # every version in it kept (golang-migrate's one row stands for all below it).
        conn.execute("ALTER TABLE schema_migrations RENAME TO schema_migrations_before_adopt")
        conn.execute(TRACKING_TABLE)
        conn.execute("DROP TABLE schema_migrations_before_adopt")
    else:
        conn.execute(TRACKING_TABLE)    # the runner's own table is left as it is
    records = []
    for migration in adopted:
        applied_at, execution_ms = rows.get(migration.version, (None, None))
        records.append((migration.version, migration.description, applied_at, migration.checksum,
                        execution_ms))
    conn.executemany(RECORD_ADOPTED, records)


# --- New migration files -----------------------------------------------------

SQL_TEMPLATE = """-- {description}
-- migrate:up


-- migrate:down

"""
# Other runners' layouts: an empty or comment-only file is a no-op there, so the
# files 'new' writes hold a line that every command refuses until it is deleted.
UP_TEMPLATE = "-- {description}\n" + UNFILLED + "\n"
DOWN_TEMPLATE = ("-- {description}: undo the up part (or delete this file if it cannot be undone)\n"
                 + UNFILLED + "\n")
PYTHON_TEMPLATE = '''"""{description}: a data migration; it runs inside the migration run's transaction."""

# DESTRUCTIVE = True    # uncomment if up() deletes rows: the run will ask for confirmation


# Write up(conn) before running anything: until then every command refuses this file.
# def up(conn):
#     for (loan_id, amount) in conn.execute("SELECT id, amount FROM loan").fetchall():
#         conn.execute("UPDATE loan SET new_field = ? WHERE id = ?", (str(amount), loan_id))


# def down(conn):
#     conn.execute("UPDATE loan SET new_field = NULL")
'''


def new_migration_files(folder: Path, description: str,
                        python: bool) -> tuple[int, list[tuple[Path, str]]]:
    """The next migration's files in the folder's own layout and numbering style.

    Numbers: NNNN, or a 14-digit UTC timestamp when the existing versions have 14 digits;
    other runners' layouts keep the width of their names (golang-migrate's 000001) and
    Diesel's dashes (2018-02-17-110136).
    """
    slug = re.sub(r"[^a-z0-9]+", "_", description.lower()).strip("_")
    if not slug:
        raise CommandError(f"'{description}' makes no file name; use letters and digits", EXIT_USAGE)
    layout, entries = folder_layout(folder) if folder.is_dir() else (PLAIN, [])
    every = [name for name in (version_text(path) for path in entries) if name]
    names = [version_text(path) for path in entries if layout == PLAIN or layout_of(path) != PYTHON]
    names = [name for name in names if name]       # the layout's own names set the width
    existing = [int(name.replace("-", "")) for name in every] + \
        [e["version"] for e in MIGRATIONS if isinstance(e, dict) and isinstance(e.get("version"), int)]
    if existing and all(len(str(v)) == 14 for v in existing):
        version = max(int(time.strftime("%Y%m%d%H%M%S", time.gmtime())), max(existing) + 1)
    else:
        version = max(existing, default=0) + 1
    width = 4 if layout == PLAIN or not names else len(names[-1].replace("-", ""))
    number = f"{version:0{width}d}"
    if layout == DIESEL and "-" in names[-1] and len(number) == 14:
        number = f"{number[:4]}-{number[4:6]}-{number[6:8]}-{number[8:]}"
    if layout == PAIRED and not python:
        return version, [(folder / f"{number}_{slug}.up.sql", UP_TEMPLATE.format(description=description)),
                         (folder / f"{number}_{slug}.down.sql",
                          DOWN_TEMPLATE.format(description=description))]
    if layout == DIESEL and not python:
        return version, [(folder / f"{number}_{slug}" / "up.sql", UP_TEMPLATE.format(description=description)),
                         (folder / f"{number}_{slug}" / "down.sql",
                          DOWN_TEMPLATE.format(description=description))]
    template = PYTHON_TEMPLATE if python else SQL_TEMPLATE
    number = number.replace("-", "")        # a Python migration's name: digits, then _description
    return version, [(folder / f"{number}_{slug}.{'py' if python else 'sql'}",
                      template.format(description=description))]


def version_text(path: Path) -> str:
    """The version as written in a folder entry's name: 0004, 20230503122557, 2018-02-17-110136."""
    if path.is_dir():                   # only Diesel's migration folders are entries
        return DIESEL_FOLDER.fullmatch(path.name)["version"]
    match = re.match(r"\d+", path.name)
    return match.group() if match else ""


# --- Migrate -----------------------------------------------------------------

def migrate_instance(args: argparse.Namespace, instance: Instance,
                     seen: dict | None = None) -> Outcome:
    """The six steps of migrate for one instance; every real run is in the audit trail.

    seen, if given, receives what the audit line records (versions before and after,
    backup), also when the run fails.
    """
    seen = {} if seen is None else seen
    if args.dry_run:
        return migrate_steps(args, instance, seen)
    outcome = None
    try:
        with audited(instance, "migrate") as entry:
            try:
                outcome = migrate_steps(args, instance, entry)
            finally:
                seen.update(entry)
    except InterruptedAfterCommit as late:     # committed: the caller still reports the outcome
        late.outcome = outcome
        raise
    return outcome


def migrate_steps(args: argparse.Namespace, instance: Instance, entry: dict) -> Outcome:
    progress = Progress(f"{instance.name}: dry run" if args.dry_run else instance.name,
                        shows_progress(args))
    try:
        return migrate_with_progress(args, instance, entry, progress)
    finally:
        progress.close()


def migrate_with_progress(args: argparse.Namespace, instance: Instance, entry: dict,
                          progress: Progress) -> Outcome:
    migrations = all_migrations(instance)
    started = time.perf_counter()
    missing = not instance.path.exists()
    refuse_missing(args, instance, entry)
    # The live file is checked once: by the pre-migrate backup's integrity_check of its
    # snapshot, or, when no backup is taken (a dry run, nothing pending), by quick_check.
    progress.step("reading the database")
    state = inspect(instance, migrations, with_drift=False)
    refuse_unsafe(state)
    plan = plan_migrate(state, args.to, create=missing, allow_row_loss=tuple(args.allow_row_loss))
    if not missing and (args.dry_run or not plan.migrations):
        refuse_damaged(instance)
    entry.update(version_before=state.current_version, version_after=state.current_version)
    progress.done()
    if args.dry_run:
        rehearsal = rehearse(plan, migrations, progress) if plan.migrations else None
        return Outcome(plan, tuple(m.version for m in plan.migrations), None,
                       time.perf_counter() - started, dry_run=True, rehearsal=rehearsal)
    if not plan.migrations:
        return Outcome(plan, (), None, time.perf_counter() - started)
    if plan.destructive:
        confirm_destructive(args, plan)
    with instance_lock(instance, "migrate"):
        backup, applied = locked_migrate(instance, migrations, plan, entry, progress)
    return Outcome(plan, tuple(applied), backup, time.perf_counter() - started)


def refuse_missing(args: argparse.Namespace, instance: Instance, entry: dict) -> None:
    """A missing file: --create makes it only where no database ever was; a lost one is
    restored, or, asked for by name and confirmed, made anew with --new-empty-database."""
    new_empty = getattr(args, "new_empty_database", False)
    if instance.path.exists():
        if new_empty:
            raise CommandError(f"{instance.name}: {instance.path} exists; --new-empty-database "
                               f"only makes a database where there is none; nothing changed",
                               EXIT_USAGE)
        return
    signs = signs_of_a_lost_database(instance)
    if signs and not new_empty:
        step = lost_database_step(instance)
        raise LostDatabase(f"{instance.name}: no database at {instance.path}, but it had one "
                           f"({'; '.join(signs)}); {step}; nothing created"
                           + ("" if "--new-empty-database" in step else
                              f" (to start again from an empty database anyway: 'migrate "
                              f"{instance.name} --new-empty-database')"))
    if not (args.create or new_empty):
        raise CommandError(f"{instance.name}: no database at {instance.path}; add --create to "
                           f"make a new one (never use it to replace a lost database: restore it)")
    if signs and not args.dry_run:
        confirm(args, instance, f"Make a new, EMPTY database for {instance.name} at "
                                f"{instance.path}, although it had one?",
                f"{instance.name}: " + "; ".join(signs) + "; its backups stay where they are")
        entry.update(new_empty_database=True, signs=signs)


class LostDatabase(CommandError):
    """--create refused: the instance had a database, which is to be restored, not re-made."""


def locked_migrate(instance: Instance, migrations: list[Migration], plan: Plan,
                   entry: dict, progress: Progress) -> tuple[Backup | None, list[int]]:
    if plan.create:
        sync_new_folders()      # no backup synced the folders the lock made: before any write
        applied = create_database(instance, migrations, plan, entry, progress)
        entry["version_after"] = plan.to_version
        return None, applied
    with closing(connect(instance)) as conn:     # the copy's source, then the migration's
        backup = verified_backup(instance, "pre-migrate", entry, progress, copy_through(conn))
        applied = apply_plan(conn, plan, migrations, f"; backup: {backup.path}", audit=entry,
                             progress=progress)
    entry["version_after"] = plan.to_version
    return backup, applied


def create_database(instance: Instance, migrations: list[Migration], plan: Plan,
                    entry: dict, progress: Progress) -> list[int]:
    """--create: build the new database under a hidden name, then link it into place.

    A failed run leaves no file at the instance's path (only its hidden draft is
    removed, never a database anyone could have used). For a confirmed
    --new-empty-database, the -wal, -journal and -shm files beside the path are moved
    into the backup folder just before the link, once the new database is complete.
    """
    path = instance.path
    draft = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        make_folders(path.parent)
        remove_killed_drafts(path)
        fd = os.open(draft, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)     # private
        try:
            keep_owner_and_mode(instance, fd, None)     # as root: the folder's owner, as restore does
        finally:
            os.close(fd)
        with closing(sqlite3.connect(draft, isolation_level=None)) as conn:
            applied = apply_plan(conn, plan, migrations, audit=entry, progress=progress)
        if entry.get("new_empty_database"):
            entry["set_aside"] = [str(p) for p in set_aside_sidecars(instance, "orphaned")]
        os.link(draft, path)            # fails, rather than replace, if the path appeared
        draft.unlink()
        fsync_path(path.parent, directory=True)     # the new name survives a power cut
    except FileExistsError:
        raise CommandError(f"{instance.name}: {path} appeared while we were creating it; "
                           f"nothing replaced; run migrate again") from None
    except OSError as exc:
        raise CommandError(f"{instance.name}: cannot create {path}: {exc.strerror}") from exc
    finally:
        for leftover in (draft, Path(f"{draft}-journal")):
            if leftover.exists():
                leftover.unlink()
    return applied


def remove_killed_drafts(path: Path) -> None:
    """Drafts (and their journals) that a killed --create left; the caller holds the lock,
    so no live run of this instance can be making one."""
    pattern = re.compile(re.escape(f".{path.name}.creating-") + r"\d+(-journal|-wal|-shm)?")
    for leftover in path.parent.iterdir():
        if pattern.fullmatch(leftover.name) and not leftover.is_symlink() and leftover.is_file():
            leftover.unlink()


def confirm_destructive(args: argparse.Namespace, plan: Plan) -> None:
    """List the destructive statements, then ask (or refuse without a terminal)."""
    lines = [f"{plan.instance.name}: these statements can destroy data:"]
    lines += [f"  {version:04d}  {kind}: {' '.join(text.split())[:120]}"
              for version, kind, text in plan.destructive]
    verb = "Apply" if plan.direction == "up" else "Run the down parts with"
    confirm(args, plan.instance, f"{verb} {len(plan.destructive)} destructive statement(s)?",
            "\n".join(lines))


# --- Presentation ------------------------------------------------------------

def age(created_at: str | None) -> str:
    if not created_at:
        return "never"
    # created_at is UTC: timegm reads it as UTC whatever TZ says (mktime would read it as
    # local time, off by the daylight-saving hour east or west of Greenwich).
    stamp = calendar.timegm(time.strptime(created_at[:19], "%Y-%m-%dT%H:%M:%S"))
    seconds = max(0, time.time() - stamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def status_as_json(state: State, last_backup: str | None) -> dict:
    same = list(state.instance.same_file_as)
    return {"name": state.instance.name, "path": str(state.instance.path), "exists": state.exists,
            "current_version": state.current_version, "latest_version": state.latest_version,
            "pending": [m.version for m in state.pending], "state": state.state,
            "last_backup": last_backup,
            **({"error": state.error or damaged(state)} if state.state == "error" else {}),
            **({"runner": state.runner.name} if state.runner else {}),
            **({"half_migrated": f"{state.untracked}; {half_migrated_step(state.instance.name, state.runner)}"}
               if state.runner and state.untracked.startswith(HALF_MIGRATED) else {}),
            **({"same_file_as": same} if same else {})}


def format_duration(seconds: float) -> str:
    """26h, 90m, 2d: the largest unit that says it whole (as --max-backup-age takes it)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def format_stale(state: State, newest: Backup | None, limit: float) -> str:
    """One line: which instance has no verified backup as recent as --max-backup-age."""
    name = state.instance.name
    found = (f"the newest verified one is from {newest.created_at} ({age(newest.created_at)})"
             if newest else "it has none")
    return (f"{name}: no verified backup in the last {format_duration(limit)}: {found}; is the "
            f"nightly backup running? see '{tool_command('safe_db_update.py')} list-backups {name}' "
            f"and make one with '{tool_command('safe_db_update.py')} backup {name}'")


def prometheus_text(rows: list[tuple[State, Backup | None, dict | None]], now: float) -> str:
    """The textfile collector's format: HELP and TYPE, then one sample per instance."""
    samples: dict[str, list[tuple[dict, float]]] = {name: [] for name, _ in METRICS}
    for state, newest, last_run in rows:
        label = {"instance": state.instance.name}
        if state.current_version is not None:
            samples["current_version"].append((label, state.current_version))
        samples["latest_version"].append((label, state.latest_version))
        samples["pending_migrations"].append((label, len(state.pending)))
        samples["state"] += [({**label, "state": word}, int(word == state.state)) for word in STATES]
        made = backup_time(newest) if newest else None
        samples["last_backup_timestamp_seconds"].append((label, made.timestamp() if made else 0))
        if made:
            samples["last_backup_age_seconds"].append((label, max(0.0, now - made.timestamp())))
            samples["last_backup_size_bytes"].append((label, newest.size))
        ended = iso_seconds(str(last_run.get("created_at", ""))) if last_run else None
        if ended is not None:
            run_label = {**label, "operation": str(last_run.get("operation", ""))}
            samples["last_run_success"].append((run_label, int(last_run.get("outcome") == "ok")))
            samples["last_run_timestamp_seconds"].append((run_label, ended))
    lines = []
    for name, help_text in METRICS:
        lines += [f"# HELP sqlite_migration_{name} {help_text}",
                  f"# TYPE sqlite_migration_{name} gauge"]
        lines += [f"sqlite_migration_{name}{{{prometheus_labels(labels)}}} {prometheus_value(value)}"
                  for labels, value in samples[name]]
    return "\n".join(lines) + "\n"


def prometheus_labels(labels: dict) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return ",".join(f'{key}="{escape(str(value))}"' for key, value in labels.items())


def prometheus_value(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def iso_seconds(text: str) -> float | None:
    """'2026-11-23T02:00:00.123456Z' as Unix time; None when it is not such a time."""
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def damaged(state: State) -> str:
    """What status says of a database that failed its quick_check."""
    return (f"damaged: {one_line(state.damage, state.instance).removeprefix('quick_check: ')}; "
            f"{emergency_step(state.instance)}")


def one_line(problem: str, instance: Instance) -> str:
    """quick_check's report of a damaged page, which spans lines, as one line of a message."""
    prefix = "quick_check: " if problem.startswith("quick_check: ") else ""
    lister = f"{tool_command('safe_db_update.py')} check {instance.name}"
    return prefix + first_problem([problem[len(prefix):]], lister)


def format_empty_fleets(fleets: list[tuple[str, Path]]) -> list[str]:
    return [f"{name}: a fleet with no members: no file matches {pattern}" for name, pattern in fleets]


def format_status(rows: list[tuple[State, str | None]], fleets: list[tuple[str, Path]] = ()) -> str:
    def current(state: State) -> str:
        return "-" if state.current_version is None else str(state.current_version)
    # Each column as wide as its widest value: 14-digit versions (timestamps) fit too.
    width = max([8] + [len(s.instance.name) for s, _ in rows])
    versions = max([7] + [len(current(s)) for s, _ in rows])
    latest = max([6] + [len(str(s.latest_version)) for s, _ in rows])
    pending = max([7] + [len(str(len(s.pending))) for s, _ in rows])
    lines = [f"{'instance':<{width}}  {'version':>{versions}}  {'latest':>{latest}}  "
             f"{'pending':>{pending}}  {'state':<10}  last backup"]
    for state, last in rows:
        lines.append(f"{state.instance.name:<{width}}  {current(state):>{versions}}  "
                     f"{state.latest_version:>{latest}}  "
                     f"{len(state.pending):>{pending}}  {state.state:<10}  {age(last)}"
                     + (f"  ({state.error or damaged(state)})" if state.state == "error" else "")
                     + (f"  ({state.untracked}; {half_migrated_step(state.instance.name, state.runner)})"
                        if state.runner and state.untracked.startswith(HALF_MIGRATED) else
                        f"  (built by {state.runner.name}: run 'adopt {state.instance.name}')"
                        if state.runner else "")
                     + (f"  (same file as {', '.join(state.instance.same_file_as)}: write "
                        f"commands refuse it)" if state.instance.same_file_as else ""))
    if len(rows) > 20:
        counts: dict[str, int] = {}
        for state, _ in rows:
            counts[state.state] = counts.get(state.state, 0) + 1
        lines.append(f"{len(rows)} instances: "
                     + ", ".join(f"{n} {word}" for word, n in sorted(counts.items())))
    return "\n".join(lines + format_empty_fleets(list(fleets)))


def check_as_json(state: State) -> dict:
    known = {m.version: m for m in all_migrations(state.instance)}
    return {"name": state.instance.name, "path": str(state.instance.path),
            "current_version": state.current_version, "latest_version": state.latest_version,
            "applied": [{"version": a.version, "description": a.description,
                         "applied_at": a.applied_at,
                         "checksum_ok": a.version in known and a.version not in state.modified}
                        for a in state.applied],
            "pending": [m.version for m in state.pending], "problems": list(state.problems),
            "drift": list(state.drift), "drift_checked": not state.drift_unchecked,
            "drift_unchecked": state.drift_unchecked or None,
            "state": state.state, "consistent": consistent(state)}


def consistent(state: State) -> bool:
    return state.exists and not state.error and not state.problems and not state.pending


def format_check(state: State) -> str:
    data = check_as_json(state)
    lines = [f"{state.instance.name}: {state.instance.path}",
             f"version {state.current_version} of {state.latest_version}: {state.state}"]
    lines.append("applied:" if state.applied else "applied: none")
    for a in data["applied"]:
        mark = "checksum ok" if a["checksum_ok"] else "CHECKSUM CHANGED or unknown"
        lines.append(f"  {a['version']:>4}  {a['description']:<40}  {a['applied_at'] or '-':<19}  {mark}")
    lines.append("pending: " + (", ".join(m.label for m in state.pending) or "none"))
    lines.append("problems:" if state.problems else "problems: none")
    lines += [f"  {p}" for p in state.problems]
    if state.drift_unchecked:
        lines.append(f"drift: not checked: {state.drift_unchecked}")
    return "\n".join(lines)


def outcome_as_json(outcome: Outcome) -> dict:
    data = {"name": outcome.plan.instance.name, "from_version": outcome.plan.from_version,
            "to_version": outcome.plan.to_version, "applied": list(outcome.applied),
            "backup": str(outcome.backup.path) if outcome.backup else None,
            "dry_run": outcome.dry_run, "seconds": round(outcome.seconds, 3)}
    if outcome.dry_run:
        data["plan"] = [{"version": m.version, "description": m.description, "source": m.source,
                         "statements": list(m.up) or [f"up(conn) in {Path(m.source).name}"]}
                        for m in outcome.plan.migrations]
        data["destructive"] = [{"version": v, "kind": k, "statement": s}
                               for v, k, s in outcome.plan.destructive]
        r = outcome.rehearsal
        data["rehearsal"] = None if r is None else {
            "ok": r.ok, "error": r.error or None, "seconds": round(r.seconds, 3),
            "tables_added": list(r.tables_added), "tables_removed": list(r.tables_removed),
            "columns_added": list(r.columns_added), "columns_removed": list(r.columns_removed),
            "row_changes": [{"table": t, "before": b, "after": a} for t, b, a in r.row_changes]}
    return data


def format_outcome(outcome: Outcome) -> str:
    plan, name = outcome.plan, outcome.plan.instance.name
    if outcome.dry_run:
        return format_dry_run(outcome)
    if not outcome.applied:
        return f"{name}: up to date at version {plan.from_version}; nothing to do"
    lines = [f"{name}: created {plan.instance.path}"] if plan.create else []
    lines += [f"{name}: applied {m.label}" for m in plan.migrations]
    lines.append(f"{name}: now at version {plan.to_version} (was {plan.from_version}), "
                 f"{outcome.seconds:.2f}s; backup: "
                 + (str(outcome.backup.path) if outcome.backup else "none (new database)"))
    return "\n".join(lines)


def adoption_as_json(adoption: Adoption) -> dict:
    runner = adoption.runner
    return {"name": adoption.instance.name, "path": str(adoption.instance.path),
            "runner": runner.name if runner else None, "table": runner.table if runner else None,
            "adopted": runner is not None, "versions": list(adoption.versions),
            "to_version": max(adoption.versions, default=0),
            "forced": bool(adoption.differences), "differences": list(adoption.differences),
            "backup": str(adoption.backup.path) if adoption.backup else None,
            "seconds": round(adoption.seconds, 3)}


def format_adoption(adoption: Adoption) -> str:
    name, runner = adoption.instance.name, adoption.runner
    if runner is None:
        return f"{name}: already tracked by this tool (schema_migrations); nothing to adopt"
    table = (f"{runner.table} upgraded in place to this tool's table, every version kept"
             if runner.table == "schema_migrations"
             else f"schema_migrations added; {runner.table} left as it is")
    lines = [f"{name}: warning: recorded despite: {d}" for d in adoption.differences]
    lines.append(f"{name}: adopted from {runner.name}: recorded {len(adoption.versions)} "
                 f"migration(s) up to version {max(adoption.versions, default=0)} with their "
                 f"checksums (nothing was run); {table}; backup: {adoption.backup.path}")
    return "\n".join(lines)


def format_dry_run(outcome: Outcome) -> str:
    plan, name = outcome.plan, outcome.plan.instance.name
    if not plan.migrations:
        return f"{name}: dry run: up to date at version {plan.from_version}; nothing would change"
    marked = {(v, s) for v, _, s in plan.destructive}
    lines = [f"{name}: dry run: version {plan.from_version} -> {plan.to_version}, "
             f"{len(plan.migrations)} migration(s)" + (" on a new database" if plan.create else "")]
    for m in plan.migrations:
        lines.append(f"  {m.label}  ({m.source})")
        for statement in m.up or (f"up(conn) in {Path(m.source).name}",):
            flag = "!" if (m.version, statement) in marked else " "
            body = statement.replace("\n", "\n        ")
            lines.append(f"    {flag} {body}")
    if plan.destructive:
        lines.append("  ! destructive: needs confirmation (or --yes) when run for real")
    r = outcome.rehearsal
    if not r.ok:
        lines.append(f"rehearsal on a copy: FAILED: {r.error}")
        return "\n".join(lines)
    lines.append(f"rehearsal on a copy: ok ({r.seconds:.2f}s); the instance was not touched")
    for label, items in (("tables added", r.tables_added), ("tables removed", r.tables_removed),
                         ("columns added", r.columns_added), ("columns removed", r.columns_removed)):
        if items:
            lines.append(f"  {label}: {', '.join(items)}")
    for table, before, after in r.row_changes:
        lines.append(f"  rows in {table}: {before} -> {after}")
    if not (r.tables_added or r.tables_removed or r.columns_added or r.columns_removed or r.row_changes):
        lines.append("  no table, column or row count changes")
    return "\n".join(lines)


# --- Commands ----------------------------------------------------------------

def chosen_instances(args: argparse.Namespace, name: str | None) -> list[Instance]:
    """The instances a command works on, with every migration list validated first."""
    config = find_config(args.config)
    instances = load_instances(config)
    chosen = instances if name is None else select_instances(instances, name, config)
    for instance in chosen:
        all_migrations(instance)
    return chosen


def cmd_status(args: argparse.Namespace) -> int:
    if args.prometheus == "-" and args.json:
        raise CommandError("--prometheus - and --json both write stdout; choose one, or give "
                           "--prometheus a FILE", EXIT_USAGE)
    rows, now = [], time.time()
    for instance in chosen_instances(args, args.name):
        state = inspect(instance, all_migrations(instance), quick_check=True)
        # The applied rows are not shown; kept for 10,000 tenants they are most of the memory.
        rows.append((replace(state, applied=()), newest_verified(list_backups(instance))))
    fleets = [(name, pattern) for name, pattern in empty_fleets(find_config(args.config))
              if args.name in (None, name)]
    stale = [] if args.max_backup_age is None else \
        [(s, newest) for s, newest in rows if backup_too_old(s, newest, args.max_backup_age, now)]
    data = {"instances": [status_as_json(s, newest.created_at if newest else None)
                          for s, newest in rows],
            "empty_fleets": [{"name": name, "path": str(pattern)} for name, pattern in fleets]}
    if args.max_backup_age is not None:
        data.update(max_backup_age_seconds=args.max_backup_age,
                    stale_backups=[s.instance.name for s, _ in stale])
    if args.prometheus:
        metrics = prometheus_text([(s, newest, last_history_entry(s.instance))
                                   for s, newest in rows], now)
        if args.prometheus == "-":
            emit(args, metrics.rstrip("\n"), {})
        else:
            write_atomically(Path(args.prometheus), metrics)
    if args.prometheus != "-":
        emit(args, format_status([(s, newest.created_at if newest else None) for s, newest in rows],
                                 fleets), data)
    for state, newest in stale:
        print(f"{program()}: error: {format_stale(state, newest, args.max_backup_age)}", file=sys.stderr)
    return EXIT_FAILED if stale or any(s.state == "error" for s, _ in rows) else EXIT_OK


def backup_too_old(state: State, newest: Backup | None, limit: float, now: float) -> bool:
    """--max-backup-age: no verified backup made within limit seconds of now. A database
    that was never made (no file, and no sign that it had one) has nothing to back up."""
    if not state.exists and not signs_of_a_lost_database(state.instance):
        return False
    made = backup_time(newest) if newest else None
    return made is None or now - made.timestamp() > limit


def last_history_entry(instance: Instance) -> dict | None:
    entries, _ = read_history(instance)     # unreadable lines (a torn last one) are skipped
    return entries[-1] if entries else None


def write_atomically(path: Path, text: str) -> None:
    """Write a file that readers see whole or not at all: a temporary file beside it, synced,
    then renamed over it. Mode 0644: node_exporter runs as a user of its own."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0),
                     0o644)
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise CommandError(f"cannot write {path}: {describe_error(exc)}; the previous file, if "
                           f"any, is unchanged") from exc


def cmd_check(args: argparse.Namespace) -> int:
    instance = get_instance(args)
    state = inspect(instance, all_migrations(instance), quick_check=True)
    if not state.exists:
        raise CommandError(missing_database(instance))
    if state.error:
        raise CommandError(f"{instance.name}: {state.error}")
    emit(args, format_check(state), check_as_json(state))
    return EXIT_OK if consistent(state) else EXIT_FAILED


def cmd_migrate(args: argparse.Namespace) -> int:
    instances = chosen_instances(args, args.name)
    if not instances or instances[0].group == args.name:    # a fleet: every member
        if args.new_empty_database:
            raise CommandError(f"--new-empty-database makes one instance's database; name the "
                               f"member, such as '{args.name}/NAME'", EXIT_USAGE)
        return migrate_many(args, instances)
    try:
        outcome = migrate_instance(args, instances[0])
    except InterruptedAfterCommit as late:     # --json: migrate's document, not an error's
        if args.json and getattr(late, "outcome", None) is not None:
            emit(args, "", {**outcome_as_json(late.outcome), "interrupted": "after commit"})
        raise
    emit(args, format_outcome(outcome), outcome_as_json(outcome))
    if outcome.dry_run and outcome.rehearsal is not None and not outcome.rehearsal.ok:
        return EXIT_FAILED
    return EXIT_OK


def cmd_migrate_all(args: argparse.Namespace) -> int:
    return migrate_many(args, chosen_instances(args, None))


def migrate_many(args: argparse.Namespace, instances: list[Instance]) -> int:
    """migrate for each instance, in file order or --jobs at once, then a summary."""
    if args.jobs > 1:
        results = migrate_in_parallel(args, instances)
    else:
        results = migrate_in_order(args, instances)
    return summarise(args, results, f"{args.command}: {{ok}} ok, {{failed}} failed, {{skipped}} skipped")


def summarise(args: argparse.Namespace, results: list[dict], counts: str) -> int:
    """The summary line of a run over many instances (counts filled in), each failure named
    once (its error was printed as it happened); exit 1 if any failed."""
    failures = [r["name"] for r in results if r["result"] == "failed"]
    skipped = sum(r["result"] == "skipped" for r in results)
    summary = counts.format(ok=len(results) - len(failures) - skipped, failed=len(failures),
                            skipped=skipped)
    summary += "".join(f"\n  failed: {name} (its error is above)" for name in failures)
    emit(args, summary, {"instances": results})
    return EXIT_FAILED if failures else EXIT_OK


def migrate_in_order(args: argparse.Namespace, instances: list[Instance]) -> list[dict]:
    """One instance after another, stopping at the first failure unless --keep-going."""
    results: list[dict] = []
    stopped = False
    for instance in instances:
        if stopped:
            results.append(not_migrated(args, instance, "skipped", None))
            continue
        result, text = migrate_one(args, instance)
        if text and not args.json:
            emit(args, text, {})
        results.append(result)
        # A lost database that --create refused to re-make stops nothing: the others
        # are created or migrated, and the summary and exit code report it.
        stopped = result["result"] == "failed" and not args.keep_going \
            and not result.get("lost_database")
    return results


def migrate_in_parallel(args: argparse.Namespace, instances: list[Instance]) -> list[dict]:
    """--jobs N: N worker processes, each handed one instance at a time; every instance is
    attempted. A worker that dies fails its own instance only, and a new worker takes its
    place. If this process is interrupted it interrupts the workers; if it is killed, they
    notice and stop (worker_loop). Output is printed here, in file order."""
    import multiprocessing.connection   # here, not at the top: only --jobs pays its import
    results: list[dict | None] = [None] * len(instances)
    texts = [""] * len(instances)
    queue = list(range(len(instances)))
    workers = [Worker(args) for _ in range(min(args.jobs, len(instances)))]
    printed = 0
    try:
        while queue or any(w.index is not None for w in workers):
            for position, worker in enumerate(workers):
                if worker.index is None and queue:
                    if not worker.process.is_alive():
                        worker = workers[position] = Worker(args)
                    worker.give(queue.pop(0), instances)
            busy = [w for w in workers if w.index is not None]
            multiprocessing.connection.wait([w.conn for w in busy]
                                            + [w.process.sentinel for w in busy])
            for worker in busy:
                reply = worker.collect()
                if reply is not None:
                    index, (results[index], texts[index], errors) = worker.index, reply
                    worker.index = None
                    sys.stderr.write(errors)
                elif not worker.process.is_alive():
                    index, worker.index = worker.index, None
                    results[index] = worker_died(args, instances[index], worker.process.exitcode)
            while printed < len(results) and results[printed] is not None:
                if texts[printed] and not args.json:
                    emit(args, texts[printed], {})
                printed += 1
    finally:
        stop_workers(workers)
    return results


class Worker:
    """A --jobs worker process, the pipe it takes instances from, and what it is doing."""

    def __init__(self, args: argparse.Namespace) -> None:
        import multiprocessing
        self.conn, theirs = multiprocessing.Pipe()
        self.process = multiprocessing.Process(target=worker_loop, daemon=True,
                                               args=(args, theirs, os.getpid()))
        self.process.start()
        theirs.close()
        self.index: int | None = None       # the instance it is migrating

    def give(self, index: int, instances: list[Instance]) -> None:
        self.index = index
        with contextlib.suppress(OSError):  # it just died: its sentinel will tell
            self.conn.send(instances[index])

    def collect(self) -> tuple | None:
        """(result, text, errors) once the worker has sent them; None if not (yet)."""
        try:
            return self.conn.recv() if self.conn.poll() else None
        except (EOFError, OSError):         # it died: its process sentinel says how
            self.process.join(WORKER_STOP_SECONDS)
            return None


def worker_loop(args: argparse.Namespace, conn, parent: int) -> None:
    """A worker: migrate the instances the parent hands over, one at a time.

    Its output goes back through the pipe, and its own stdout and stderr are /dev/null,
    so it never keeps the caller's pipes open. It has a process group of its own, so a
    Ctrl-C reaches the parent alone, which interrupts its workers once (stop_workers).
    When the parent dies it interrupts itself (the migration under way rolls back, as
    at Ctrl-C) and takes no other instance.
    """
    os.setpgrp()
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    os.close(quiet)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=interrupt_when_orphaned, args=(parent,), daemon=True).start()
    try:
        while True:
            instance = conn.recv()
            if instance is None or os.getppid() != parent:
                return
            conn.send(migrate_in_worker(args, instance))
    except (KeyboardInterrupt, EOFError, OSError):
        return


def interrupt_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGINT)


def migrate_in_worker(args: argparse.Namespace, instance: Instance) -> tuple[dict, str, str]:
    """migrate_one, with what it writes to stderr captured for the parent to print."""
    errors = io.StringIO()
    with redirect_stderr(errors):
        try:
            result, text = migrate_one(args, instance)
        except Exception as exc:  # noqa: BLE001 - an unexpected error: its traceback, one instance
            traceback.print_exc()
            result, text = not_migrated(args, instance, "failed",
                                        f"{instance.name}: {type(exc).__name__}: {exc}"), ""
    return result, text, errors.getvalue()


def worker_died(args: argparse.Namespace, instance: Instance, exitcode: int | None) -> dict:
    how = (f"killed by signal {-exitcode} ({signal.Signals(-exitcode).name})"
           if exitcode is not None and exitcode < 0 else f"exit code {exitcode}")
    error = (f"{instance.name}: the worker migrating it died ({how}); a migration is all or "
             f"nothing: see 'check {instance.name}' for the version it is at")
    print(f"{program()}: error: {error}", file=sys.stderr)
    return not_migrated(args, instance, "failed", error)


def stop_workers(workers: list[Worker]) -> None:
    """Idle workers are told to stop; busy ones (this process was interrupted) are
    interrupted; any still running after WORKER_STOP_SECONDS is killed."""
    for worker in workers:
        if not worker.process.is_alive():
            continue
        if worker.index is None:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        else:
            with contextlib.suppress(OSError):
                os.kill(worker.process.pid, signal.SIGINT)
    deadline = time.monotonic() + WORKER_STOP_SECONDS
    for worker in workers:
        worker.process.join(max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()


def migrate_one(args: argparse.Namespace, instance: Instance) -> tuple[dict, str]:
    """migrate for one instance as a result row; errors are reported, not raised."""
    started, seen = time.perf_counter(), {}
    try:
        outcome = migrate_instance(args, instance, seen)
    except (CommandError, OSError) as exc:
        error = str(exc) if isinstance(exc, CommandError) else f"{instance.name}: {describe_error(exc)}"
        print(f"{program()}: error: {error}", file=sys.stderr)
        row = not_migrated(args, instance, "failed", error, seen, time.perf_counter() - started)
        if isinstance(exc, LostDatabase):   # refused, touching nothing: migrate-all goes on
            row["lost_database"] = True
        return row, ""
    failed = outcome.dry_run and outcome.rehearsal is not None and not outcome.rehearsal.ok
    return ({**outcome_as_json(outcome), "result": "failed" if failed else "ok",
             "error": outcome.rehearsal.error if failed else None}, format_outcome(outcome))


def not_migrated(args: argparse.Namespace, instance: Instance, result: str, error: str | None,
                 seen: dict | None = None, seconds: float = 0.0) -> dict:
    """The result row of an instance that failed or was skipped: every key of migrate --json,
    null where the run never learned it; to_version is where the database is now."""
    seen = seen or {}
    return {"name": instance.name, "from_version": seen.get("version_before"),
            "to_version": seen.get("version_after"), "applied": [], "backup": seen.get("backup"),
            "dry_run": bool(args.dry_run), "seconds": round(seconds, 3), "result": result,
            "error": error}


def cmd_rollback(args: argparse.Namespace) -> int:
    outcome = rollback_instance(args, get_instance(args))
    name = outcome.plan.instance.name
    text = "\n".join([f"{name}: rolled back {m.label}" for m in outcome.plan.migrations]
                     + [f"{name}: now at version {outcome.plan.to_version} (was "
                        f"{outcome.plan.from_version}), {outcome.seconds:.2f}s; backup: "
                        f"{outcome.backup.path}"])
    emit(args, text, {**outcome_as_json(outcome), "rolled_back": list(outcome.applied)})
    return EXIT_OK


def cmd_baseline(args: argparse.Namespace) -> int:
    instance = get_instance(args)
    differences, backup = baseline_instance(args, instance)
    lines = [f"{instance.name}: warning: recorded despite: {d}" for d in differences]
    lines.append(f"{instance.name}: recorded migrations up to {args.to} as applied (nothing was "
                 f"run); backup: {backup.path}")
    emit(args, "\n".join(lines), {"name": instance.name, "path": str(instance.path),
                                  "to_version": args.to, "forced": bool(differences),
                                  "differences": list(differences), "backup": str(backup.path)})
    return EXIT_OK


def cmd_adopt(args: argparse.Namespace) -> int:
    instances = chosen_instances(args, args.name)
    if instances and instances[0].group != args.name:      # one instance
        adoption = adopt_instance(args, instances[0])
        emit(args, format_adoption(adoption), adoption_as_json(adoption))
        return EXIT_OK
    results = []                        # a fleet: every member, a failure does not stop the rest
    for instance in instances:
        try:
            adoption = adopt_instance(args, instance)
        except CommandError as exc:
            print(f"{program()}: error: {exc}", file=sys.stderr)
            results.append({"name": instance.name, "result": "failed", "error": str(exc)})
            continue
        if not args.json:
            emit(args, format_adoption(adoption), {})
        results.append({**adoption_as_json(adoption), "error": None,
                        "result": "ok" if adoption.runner else "skipped"})
    return summarise(args, results, "adopt: {ok} adopted, {failed} failed, {skipped} already tracked")


def cmd_new(args: argparse.Namespace) -> int:
    config = find_config(args.config)
    load_instances(config)              # a broken registry is exit 2 for every command
    folder = resolve(config.parent, read_config(config).defaults()["migrations_dir"])
    version, files = new_migration_files(folder, args.description, args.python)
    for path, text in files:
        try:
            make_folders(path.parent)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)    # private, as "x"
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as exc:
            raise CommandError(f"cannot write {path}: {exc.strerror}") from exc
    written = " and ".join(str(path) for path, _ in files)
    emit(args, f"wrote {written}; fill in its up part (until then every command refuses it)",
         {"path": str(files[0][0]), "paths": [str(path) for path, _ in files], "version": version})
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    schemas = []
    for name in (args.name, args.other):
        instance = get_instance(args, name)
        with closing(open_readonly(instance)) as conn:
            try:
                schemas.append(schema_of(conn))
            except sqlite3.Error as exc:
                raise CommandError(f"{instance.name}: cannot read {instance.path}: {exc}") from exc
    differences = compare_schemas(schemas[1], schemas[0], here=args.name, there=args.other)
    text = "\n".join(differences) or f"{args.name} and {args.other} have the same schema"
    emit(args, text, {"name": args.name, "other": args.other, "same": not differences,
                      "differences": list(differences)})
    return EXIT_FAILED if differences else EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    instance = get_instance(args)
    entries, unreadable = read_history(instance)
    lines = [format_history_entry(e) for e in entries]
    if unreadable:
        lines.append(f"{instance.name}: {len(unreadable)} unreadable line(s) in "
                     f"{instance.home / 'history.jsonl'} (line {', '.join(map(str, unreadable))}); "
                     f"a line cut short by a crash or power cut, or edited by hand")
    emit(args, "\n".join(lines) or f"{instance.name}: no history yet",
         {"name": instance.name, "entries": entries, "unreadable_lines": unreadable})
    return EXIT_OK


def format_history_entry(entry: dict) -> str:
    """One audit line: versions where known ('none' where there was no database), the
    backup once (a failure's message may already name it)."""
    before, after = entry.get("version_before"), entry.get("version_after")
    versions = "" if before is None and after is None else \
        f"  {'none' if before is None else before} -> {'none' if after is None else after}"
    outcome, backup = str(entry.get("outcome", "?")), entry.get("backup")
    return (f"{entry.get('created_at', '?')}  {entry.get('user', '?')}@{entry.get('host', '?')}  "
            f"{str(entry.get('operation', '?')):<8}{versions}  {outcome}  ({entry.get('seconds', 0)}s)"
            + (f"  backup: {backup}" if backup and str(backup) not in outcome else ""))


# --- Parser and main ---------------------------------------------------------

def version_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not a version number")
    return int(text)


def duration(text: str) -> float:
    """--max-backup-age: a number and a unit, s, m, h or d (26h); in seconds."""
    match = DURATION.fullmatch(text.strip())
    if not match or float(match["number"]) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not an age such as 26h (a number and "
                                         f"a unit: s, m, h or d)")
    seconds = float(match["number"]) * UNIT_SECONDS[match["unit"]]
    return int(seconds) if seconds.is_integer() else seconds


def positive_number(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive number")
    return int(text)


TO_HELP = "a version number: the NNNN of a migration file (or 'version' in MIGRATIONS)"


def add_migrate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="show the plan and rehearse it on a temporary copy; change nothing")
    parser.add_argument("--to", type=version_number, metavar="V",
                        help=f"apply pending migrations up to version V only; V is {TO_HELP}")
    parser.add_argument("--create", action="store_true",
                        help="make the database where none ever was (a lost one, with "
                             "backups or an audit trail, is refused: restore it)")
    add_row_loss_option(parser)
    parser.add_argument("--keep-going", action="store_true",
                        help="several instances: go on with the next after a failure")
    parser.add_argument("--jobs", type=positive_number, default=1, metavar="N",
                        help="several instances: migrate N at once, in separate processes "
                             "(implies --keep-going)")


def add_row_loss_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-row-loss", action="append", default=[], metavar="TABLE",
                        help="let TABLE end the run with fewer rows than it had (repeatable); "
                             "see the lost-row guard")


NAME_HELP = "an instance in instances.ini, or a fleet member such as tenants/acme"
FLEET_HELP = "an instance in instances.ini, or a fleet: every member"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser, commands = root_parser(prog, __doc__)
    status = add_command(commands, "status", cmd_status, "every instance's version and state",
                         ("", "--json        # for a monitor: state, pending, last_backup",
                          "--max-backup-age 26h --quiet   # cron: exit 1 when nightly backups stop"))
    status.add_argument("name", metavar="NAME", nargs="?",
                        help="one instance or fleet only (default: every instance)")
    status.add_argument("--max-backup-age", type=duration, metavar="AGE",
                        help="exit 1, naming them, when instances have no verified backup "
                             "this recent (26h, 90m, 7d; units s, m, h, d)")
    status.add_argument("--prometheus", metavar="FILE",
                        help="also write the metrics in node_exporter's textfile format to "
                             "FILE, atomically ('-': to stdout, instead of the table)")
    add_command(commands, "check", cmd_check,
                "applied and pending migrations of one instance, and problems",
                ("prod", "prod --json")).add_argument("name", metavar="NAME", help=NAME_HELP)
    migrate = add_command(commands, "migrate", cmd_migrate, "apply pending migrations to one instance",
                          ("prod --dry-run    # the plan, rehearsed on a copy",
                           "prod              # back up, then apply, all or nothing",
                           "dev --to 4", "dev --create      # a new instance's first database"))
    migrate.add_argument("name", metavar="NAME", help=FLEET_HELP)
    add_migrate_options(migrate)
    migrate.add_argument("--new-empty-database", action="store_true",
                         help="make a new, empty database although the instance had one "
                              "(it has backups or an audit trail); asks first; see the manual")
    migrate_all = add_command(commands, "migrate-all", cmd_migrate_all,
                              "migrate every instance in file order",
                              ("--dry-run", "--keep-going --quiet", "--create   # the example's databases, "
                               "the first time"))
    add_migrate_options(migrate_all)
    add_backup_command(commands)
    baseline = add_command(commands, "baseline", cmd_baseline,
                           "record migrations up to V as applied, for a database that predates the tool",
                           ("prod --to 3", "prod --to 3 --force   # record despite the listed differences"))
    baseline.add_argument("name", metavar="NAME", help=NAME_HELP)
    baseline.add_argument("--to", type=version_number, metavar="V", required=True,
                          help=f"the version the database's schema is at; V is {TO_HELP}")
    baseline.add_argument("--force", action="store_true",
                          help="record even though the schema differs (the differences are listed)")
    adopt = add_command(commands, "adopt", cmd_adopt,
                        "take over a database that dbmate, golang-migrate, sqlx, Diesel or Rails built",
                        ("prod", "tenants          # every member of a fleet", "prod --force"))
    adopt.add_argument("name", metavar="NAME", help=FLEET_HELP)
    adopt.add_argument("--force", action="store_true",
                       help="record even though the schema differs (the differences are listed)")
    rollback = add_command(commands, "rollback", cmd_rollback,
                           "run the down parts above V, newest first, after a backup",
                           ("dev --to 2", "prod --to 2 --yes   # no terminal: --yes confirms"))
    rollback.add_argument("name", metavar="NAME", help=NAME_HELP)
    rollback.add_argument("--to", type=version_number, metavar="V", required=True,
                          help=f"the version to go back to (its own migration stays); V is {TO_HELP}")
    add_row_loss_option(rollback)
    new = add_command(commands, "new", cmd_new, "write the next numbered migration file",
                      ('"add loan due date"', '"backfill totals" --python'))
    new.add_argument("description", metavar="DESCRIPTION",
                     help="what the migration does; it becomes the file name (add_loan_due_date)")
    new.add_argument("--python", action="store_true", help="a .py migration with up(conn)")
    diff = add_command(commands, "diff", cmd_diff, "compare two instances' schemas",
                       ("testing prod", "dev prod --json"))
    diff.add_argument("name", metavar="NAME", help=NAME_HELP)
    diff.add_argument("other", metavar="OTHER", help="the instance to compare it with")
    add_command(commands, "history", cmd_history, "the instance's audit trail",
                ("prod", "prod --json")).add_argument("name", metavar="NAME", help=NAME_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    prog = started_as(PROG, argv)
    return run(build_parser(prog), prog, argv)


if __name__ == "__main__":
    sys.exit(main())
