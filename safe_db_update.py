"""Verified backups, restore, integrity checks and information for SQLite instances.

usage: python safe_db_update.py [--config PATH] [--json] [-q] [-y] COMMAND ...

Instances are named in instances.ini; see DATABASE_MIGRATION_README.md.
"""

from __future__ import annotations

try:    # a Ctrl-C that arrives before the signal is held back: one line and 130 all the same
    import os
    import signal
    import sys

    # Run as a command (this script, or the safe-db-update console script), not imported:
    # Ctrl-C is held back while the modules below load and the arguments are read, and
    # delivered as the command starts (see run()): one line and exit 130, not a traceback.
    if hasattr(signal, "pthread_sigmask") and (
            __name__ == "__main__" or os.path.basename(sys.argv[0]) == "safe-db-update"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
except KeyboardInterrupt:
    import os
    import sys
    if __name__ != "__main__" and os.path.basename(sys.argv[0]) != "safe-db-update":
        raise
    sys.stderr.write(f"{os.path.basename(sys.argv[0])}: interrupted\n")
    raise SystemExit(130) from None

import argparse
import configparser
import contextlib
import datetime
import errno
import functools
import getpass
import glob
import hashlib
import json
import re
import shutil
import socket
import sqlite3
import stat
import threading
import time
import traceback
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, TypeVar

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; locking is skipped there
    fcntl = None

# --- Constants ---------------------------------------------------------------

PROG = "safe_db_update.py"
VERSION = "1.0.0"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

CONFIG_FILE = "instances.ini"
CONFIG_ENV = "DB_MIGRATION_CONFIG"
DEFAULTS = {"backup_dir": "backups", "migrations_dir": "migrations",
            "keep_backups": "30", "busy_timeout": "30", "protected": "no",
            "keep_daily": "0", "keep_weekly": "0", "keep_monthly": "0", "verify": "full"}
KNOWN_KEYS = {"path", "protected", "backup_dir", "migrations_dir", "keep_backups", "busy_timeout",
              "keep_daily", "keep_weekly", "keep_monthly", "verify"}
# verify = quick: `backup` (the operator's reasons: manual, nightly, ...) checks its copy with quick_check;
# a backup taken before a change (pre-migrate, pre-rollback, pre-restore) always runs the
# full integrity_check, which also stands in for checking the live database.
VERIFY_CHECKS = {"full": "integrity_check", "quick": "quick_check"}
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Why a backup was made, in its file name and manifest. `backup --reason` takes one the
# operator chooses (cron: nightly); the others are the tool's own, taken before a change.
OPERATOR_REASONS = ("manual", "hourly", "nightly", "weekly", "monthly", "pre-deploy")
TOOL_REASONS = ("pre-migrate", "pre-restore", "pre-rollback")
REASONS = OPERATOR_REASONS + TOOL_REASONS
SQLITE_HEADER = b"SQLite format 3\x00"
SIDECARS = ("-journal", "-wal", "-shm")     # files SQLite keeps beside a database
# What SQLite says, inside "malformed database schema (NAME) - ...", when it cannot parse
# a schema a newer SQLite wrote: not damage, so nothing may be replaced or moved.
NEWER_SCHEMA = ("syntax error", "unrecognized token", "no such function", "no such collation",
                "no such module")
BACKUP_NAME = re.compile(r"(?P<stem>.+)-(?P<stamp>\d{8}T\d{12}Z)-(?P<reason>[a-z-]+)\.db")
PROGRESS_AFTER_SECONDS = 1.5
INVOCATION: list[str] = []          # the command line being run, for the audit trail
HELD_HANDLER = "held SIGINT handler"    # in an audit entry between COMMIT and its line; never written
CONSOLE_SCRIPTS = {"database_migration.py": "database-migration", "safe_db_update.py": "safe-db-update"}
MANUAL = "DATABASE_MIGRATION_README.md"
CHUNK = 1024 * 1024
COPY_STEP = 64 * 1024 * 1024       # per copy_file_range call: no user memory
RESTORE_STEP = 1024 * 1024          # bytes per backup-API step of a restore: fits SQLite's cache
SQLITE_BUSY, SQLITE_LOCKED = 5, 6   # a backup-API step that found another connection's lock
T = TypeVar("T")
# From this size a copy is synced, checked and hashed at once, on three threads; below it
# the threads cost more than they save (a small fleet database takes a millisecond).
VERIFY_AT_ONCE_BYTES = 32 * 1024 * 1024
# The write command under way on one instance: the folders below backup_dir vouched for,
# and the new ones whose parents are still to be synced (see vouched_once); empty outside
# one, where every call checks, and a new folder's parent is synced at once.
COMMAND_FOLDERS: list["FolderRecord"] = []

# SQLite's own objects are named sqlite_... (any case); the escape keeps LIKE from
# reading '_' as "any character", which would hide a table such as sqliteusers.
NOT_INTERNAL = r"name NOT LIKE 'sqlite\_%' ESCAPE '\'"
TABLES_SQL = f"""
    SELECT name FROM sqlite_master
    WHERE type = 'table' AND {NOT_INTERNAL}
    ORDER BY name
"""
SCHEMA_VERSION_SQL = "SELECT MAX(version) FROM schema_migrations"


# --- Errors ------------------------------------------------------------------

class CommandError(Exception):
    """A problem the user can fix; main() prints it on one line."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class InterruptedAfterCommit(KeyboardInterrupt):
    """Ctrl-C arrived after COMMIT: the change is in the database and recorded as ok; exit 0."""


class UsageError(Exception):
    """argparse found the command line wrong; run() prints it as argparse would (exit 2)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """argparse, but a wrong command line is raised to run(), so that --json can report it."""

    def error(self, message: str):
        raise UsageError(self, message)


# --- Records -----------------------------------------------------------------

@dataclass(frozen=True)
class Instance:
    name: str                       # 'prod', or 'tenants/acme' for a fleet member
    path: Path                      # absolute: resolved against the ini file's folder
    backup_dir: Path                # the root; this instance's backups are in backup_folder
    migrations_dir: Path
    config: Path
    keep_backups: int = 30          # 0 keeps all
    busy_timeout: float = 30.0
    protected: bool = False
    group: str = ""                 # the fleet section this instance belongs to, if any
    keep_daily: int = 0             # also keep the newest backup of each of the last N days
    keep_weekly: int = 0            # ... ISO weeks
    keep_monthly: int = 0           # ... months (all in UTC)
    same_file_as: tuple[str, ...] = ()  # other instance names for the same file (refused)
    verify: str = "full"            # 'quick': nightly backups are checked with quick_check

    @property
    def home(self) -> Path:
        """Folder for this instance's lock and history: <backup_dir>/<name>."""
        return self.backup_dir / self.name

    @property
    def backup_folder(self) -> Path:
        return self.home / "database"

    @property
    def stem(self) -> str:
        return self.name.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Backup:
    path: Path
    sha256: str
    size: int
    created_at: str
    source: str
    schema_version: int | None
    reason: str
    sqlite_version: str
    verified: bool
    seconds: float = 0.0
    has_manifest: bool = True       # False: a .db file alone, listed as unverified
    problems: tuple[str, ...] = ()  # what the copy's check found (not in the manifest)
    checked_with: str = "integrity_check"   # or quick_check (verify = quick)

    def manifest(self) -> dict:
        weaker = {} if self.checked_with == "integrity_check" else {"checked_with": self.checked_with}
        return {"sha256": self.sha256, "size": self.size, "created_at": self.created_at,
                "source": self.source, "schema_version": self.schema_version,
                "reason": self.reason, "sqlite_version": self.sqlite_version,
                "verified": self.verified, **weaker}


@dataclass(frozen=True)
class Policy:
    """Which verified backups retention keeps; see 'Retention' in the manual."""
    last: int                       # keep_backups: the newest N backups and restore points; 0: all
    daily: int = 0
    weekly: int = 0
    monthly: int = 0


@dataclass(frozen=True)
class Verdict:
    """One backup and the rules that keep it; no rule: retention removes it."""
    backup: Backup
    kept_by: tuple[str, ...]        # 'newest', 'keep_backups', 'keep_daily 2026-11-28', ...

    @property
    def keep(self) -> bool:
        return bool(self.kept_by)


@dataclass(frozen=True)
class Table:
    name: str
    rows: int
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Info:
    instance: Instance
    size: int
    page_size: int
    page_count: int
    freelist_count: int
    journal_mode: str
    schema_version: int | None
    tables: tuple[Table, ...]
    indexes: tuple[str, ...]
    views: tuple[str, ...]
    triggers: tuple[str, ...]
    backups: tuple[Backup, ...]


# --- Registry ----------------------------------------------------------------

def find_config(explicit: Path | None = None) -> Path:
    """--config, else $DB_MIGRATION_CONFIG, else ./instances.ini, else beside the scripts."""
    if explicit is not None:
        candidates, given = [Path(explicit)], "given by --config"
    elif os.environ.get(CONFIG_ENV):
        candidates, given = [Path(os.environ[CONFIG_ENV])], f"named by ${CONFIG_ENV}"
    else:
        candidates = [Path.cwd() / CONFIG_FILE, Path(__file__).resolve().parent / CONFIG_FILE]
        given = ""
    for candidate in candidates:
        if candidate.is_file():
            return Path(os.path.abspath(candidate))
    if given:
        what = "is a folder, not a file" if candidates[0].is_dir() else "does not exist"
        raise CommandError(f"{candidates[0]}: the instance registry {given} {what}; check the "
                           f"path", EXIT_USAGE)
    raise CommandError(f"no instance registry: neither {candidates[0]} nor {candidates[1]} "
                       f"exists; pass --config PATH or set {CONFIG_ENV}", EXIT_USAGE)


def read_config(config: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    parser.read_dict({"DEFAULT": DEFAULTS})
    try:
        with open(config, encoding="utf-8") as handle:
            parser.read_file(handle)
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"{config}: cannot read: {exc}", EXIT_USAGE) from exc
    except configparser.Error as exc:
        first_line = str(exc).splitlines()[0]
        if type(exc) is configparser.ParsingError and getattr(exc, "errors", None):
            first_line = unparsable_line(config, exc.errors[0][0])
        raise CommandError(f"{config}: not a valid instances.ini: {first_line}", EXIT_USAGE) from exc
    return parser


def unparsable_line(config: Path, lineno: int) -> str:
    """'[section] line N: text is not ...' for the first line configparser could not read."""
    lines = Path(config).read_text(encoding="utf-8").splitlines()
    section = ""
    for text in lines[:lineno - 1]:
        header = re.match(r"\s*\[([^\]]*)\]", text)
        section = f"[{header[1]}]: " if header else section
    text = lines[lineno - 1].strip() if lineno <= len(lines) else ""
    return f"{section}line {lineno}: '{text}' is not 'key = value' or a [section] header"


def load_instances(config: Path) -> list[Instance]:
    """Every instance in the registry, in the file's order; fleets expanded."""
    parser = read_config(config)
    unknown = set(parser.defaults()) - KNOWN_KEYS
    if unknown or "path" in parser.defaults():
        key = sorted(unknown)[0] if unknown else "path"
        raise CommandError(f"{config}: [DEFAULT]: key '{key}' is not allowed here "
                           f"(known keys: {', '.join(sorted(KNOWN_KEYS - {'path'}))})", EXIT_USAGE)
    instances: list[Instance] = []
    for section in parser.sections():
        instances.extend(section_instances(config, parser[section]))
    seen: set[str] = set()
    for instance in instances:
        if instance.name in seen:
            raise CommandError(f"{config}: [{instance.group}]: two files make the instance name "
                               f"'{instance.name}'; rename one or narrow the glob", EXIT_USAGE)
        seen.add(instance.name)
    if not parser.sections():
        raise CommandError(f"{config}: no instances defined; add a section such as "
                           f"[dev] with path = instance/dev.db", EXIT_USAGE)
    return mark_shared_files(instances)


def mark_shared_files(instances: list[Instance]) -> list[Instance]:
    """Note, on each instance, the other names the registry gives the same file.

    The same file is the same resolved path, or the same inode (a hard link).
    Write commands refuse such an instance: two names would mean two locks.
    """
    names: dict[object, list[str]] = {}
    for instance in instances:
        try:                            # an existing file: its inode says it all
            found = os.stat(instance.path)
            key: object = (found.st_dev, found.st_ino)
        except OSError:                 # none yet: the path, resolved
            key = os.path.realpath(instance.path)
        names.setdefault(key, []).append(instance.name)
    shared: dict[str, set[str]] = {}
    for group in names.values():
        for name in group:
            shared.setdefault(name, set()).update(n for n in group if n != name)
    return [replace(i, same_file_as=tuple(sorted(shared[i.name]))) if shared.get(i.name) else i
            for i in instances]


def is_fleet(raw_path: str) -> bool:
    """Only '*' makes a fleet; '[', ']' and '?' are ordinary characters of a file name."""
    return "*" in raw_path


def fleet_glob(pattern: Path) -> str:
    """The glob for a fleet's path: '*' is the only wildcard, everything else literal."""
    return "*".join(glob.escape(part) for part in str(pattern).split("*"))


def empty_fleets(config: Path) -> list[tuple[str, Path]]:
    """(name, path pattern) of each fleet no file matches yet, in the file's order."""
    parser = read_config(config)
    found = []
    for section in parser.sections():
        raw_path = parser[section].get("path", "").strip()
        if is_fleet(raw_path):
            pattern = resolve(config.parent, raw_path)
            if not any(os.path.isfile(m) for m in glob.glob(fleet_glob(pattern))):
                found.append((section, pattern))
    return found


def section_instances(config: Path, section: configparser.SectionProxy) -> list[Instance]:
    raw_path, settings, where = section_settings(config, section)
    base = config.parent
    if is_fleet(raw_path):
        return fleet_members(section.name, resolve(base, raw_path), settings, where)
    path = resolve(base, raw_path)
    if path.is_dir():
        raise CommandError(f"{where}: path {path} is a folder; give the database file", EXIT_USAGE)
    return [Instance(name=section.name, path=path, **settings)]


def section_settings(config: Path, section: configparser.SectionProxy) -> tuple[str, dict, str]:
    """A section's raw path, its validated settings, and how to name it in messages."""
    where = f"{config}: [{section.name}]"
    if not NAME_PATTERN.fullmatch(section.name):
        raise CommandError(f"{where}: instance names use letters, digits, '_' and '-' "
                           f"(at most 64)", EXIT_USAGE)
    unknown = set(section) - KNOWN_KEYS
    if unknown:
        raise CommandError(f"{written_in(where, section, sorted(unknown)[0])}: unknown key "
                           f"'{sorted(unknown)[0]}' "
                           f"(known keys: {', '.join(sorted(KNOWN_KEYS))})", EXIT_USAGE)
    raw_path = section.get("path", "").strip()
    if not raw_path:
        raise CommandError(f"{where}: missing 'path' (the database file)", EXIT_USAGE)
    base = config.parent
    settings = dict(backup_dir=resolve(base, section["backup_dir"]),
                    migrations_dir=resolve(base, section["migrations_dir"]),
                    config=config, keep_backups=whole_number(section, "keep_backups", where),
                    keep_daily=whole_number(section, "keep_daily", where),
                    keep_weekly=whole_number(section, "keep_weekly", where),
                    keep_monthly=whole_number(section, "keep_monthly", where),
                    busy_timeout=seconds(section, where), protected=flag(section, where),
                    verify=verify_setting(section, where))
    return raw_path, settings, where


def fleet_members(group: str, pattern: Path, settings: dict, where: str) -> list[Instance]:
    members = []
    for match in sorted(glob.glob(fleet_glob(pattern))):
        path = Path(match)
        if path.is_dir():
            continue
        if not NAME_PATTERN.fullmatch(path.stem):
            raise CommandError(f"{where}: file {path.name} does not make an instance name "
                               f"(letters, digits, '_' and '-'); rename it", EXIT_USAGE)
        members.append(Instance(name=f"{group}/{path.stem}", path=path, group=group, **settings))
    return members


def resolve(base: Path, value: str) -> Path:
    return Path(os.path.abspath(base / os.path.expanduser(value.strip())))


def written_in(where: str, section: configparser.SectionProxy, key: str) -> str:
    """How a message names the section a key is written in: [DEFAULT] when the section
    takes the value from there."""
    defaults = section.parser.defaults()
    if key in defaults and section.get(key, raw=True) == defaults[key]:
        return where.removesuffix(f"[{section.name}]") + "[DEFAULT]"
    return where


def whole_number(section: configparser.SectionProxy, key: str, where: str) -> int:
    try:
        value = int(section[key])
    except ValueError:
        value = -1
    if value < 0:
        raise CommandError(f"{written_in(where, section, key)}: {key} must be a whole number, 0 or more", EXIT_USAGE)
    return value


def seconds(section: configparser.SectionProxy, where: str) -> float:
    try:
        value = float(section["busy_timeout"])
    except ValueError:
        value = -1.0
    if not 0 <= value < 86400:
        raise CommandError(f"{written_in(where, section, 'busy_timeout')}: busy_timeout must be a number of seconds", EXIT_USAGE)
    return value


def verify_setting(section: configparser.SectionProxy, where: str) -> str:
    value = section["verify"].strip().lower()
    if value not in VERIFY_CHECKS:
        raise CommandError(f"{where}: verify must be full (integrity_check, the default) or "
                           f"quick (quick_check, for nightly backups of very large databases)",
                           EXIT_USAGE)
    return value


def flag(section: configparser.SectionProxy, where: str) -> bool:
    try:
        return section.getboolean("protected")
    except ValueError as exc:
        raise CommandError(f"{written_in(where, section, 'protected')}: protected must be yes or no",
                           EXIT_USAGE) from exc


def select_instances(instances: list[Instance], name: str, config: Path) -> list[Instance]:
    """The instance called NAME, or every member of the fleet called NAME.

    A fleet with no files yet is an empty group, and 'group/stem' for a file that does
    not exist yet is a new member (so that 'migrate group/stem --create' can make it).
    """
    chosen = [i for i in instances if i.name == name or i.group == name]
    group, _, stem = name.partition("/")
    parser = read_config(config) if not chosen else None
    fleet = parser is not None and parser.has_section(group) \
        and is_fleet(parser[group].get("path", ""))
    if fleet and not stem:
        return []
    if fleet and NAME_PATTERN.fullmatch(stem):
        raw_path, settings, _ = section_settings(config, parser[group])
        folder, pattern = os.path.split(raw_path)
        if pattern.count("*") == 1 and not is_fleet(folder):
            path = resolve(config.parent, os.path.join(folder, pattern.replace("*", stem)))
            return [Instance(name=name, path=path, group=group, **settings)]
    if not chosen:
        known = ", ".join(sorted({i.group or i.name for i in instances}))
        raise CommandError(f"{config}: no instance named {name!r} (known: {known})", EXIT_USAGE)
    return chosen


def get_instance(args: argparse.Namespace, name: str | None = None) -> Instance:
    """The single instance named on the command line."""
    config = find_config(args.config)
    name = name or args.name
    chosen = select_instances(load_instances(config), name, config)
    if not chosen:
        raise CommandError(f"fleet '{name}' has no members yet: no file matches its path; make "
                           f"one with 'migrate {name}/NAME --create'", EXIT_USAGE)
    if len(chosen) > 1:
        raise CommandError(f"'{name}' is a group of {len(chosen)} instances; name one member "
                           f"such as '{chosen[0].name}'", EXIT_USAGE)
    return chosen[0]


# --- Connections -------------------------------------------------------------

def require_database(instance: Instance) -> bytes:
    """Refuse a missing file or one that is not an SQLite database; return its header."""
    path = instance.path
    if not path.is_file():
        raise CommandError(missing_database(instance))
    try:
        with open(path, "rb") as handle:
            header = handle.read(20)
    except OSError as exc:
        raise CommandError(f"{instance.name}: cannot read {path}: {exc.strerror}") from exc
    if header and header[:len(SQLITE_HEADER)] != SQLITE_HEADER:
        raise CommandError(f"{instance.name}: {path} is not an SQLite database (damaged, or "
                           f"another file); nothing changed; {emergency_step(instance)}")
    return header


def missing_database(instance: Instance) -> str:
    """No file at the path: restore one that was lost; --create one that never was."""
    signs = signs_of_a_lost_database(instance)
    if signs:
        return (f"{instance.name}: no database at {instance.path}, but it had one "
                f"({'; '.join(signs)}); {lost_database_step(instance)}")
    return (f"{instance.name}: no database at {instance.path} (it never had one); make it with "
            f"'{tool_command('database_migration.py')} migrate {instance.name} --create'")


def lost_database_step(instance: Instance) -> str:
    """What to do about a lost database: restore it; with no verified backup but a -wal
    or -shm left beside it, restore can only fail, so say what the -wal may hold."""
    left = [suffix for suffix in SIDECARS if os.path.lexists(f"{instance.path}{suffix}")]
    if not left or newest_verified(list_backups(instance)) is not None:
        return f"restore it with '{tool_command('safe_db_update.py')} restore {instance.name}'"
    wal = "-wal" in left
    return (f"there is no verified backup to restore; "
            + (f"the -wal may hold committed rows of the deleted database: inspect it, then " if wal
               else "")
            + f"start again with '{tool_command('database_migration.py')} migrate {instance.name} "
              f"--new-empty-database', which moves the {' and '.join(left)} into "
              f"{instance.backup_folder}")


def signs_of_a_lost_database(instance: Instance) -> list[str]:
    """Why a missing database looks lost rather than never made: backups, an audit trail
    that shows a database (a command that succeeded, or one that read a version), or a
    -wal, -journal or -shm file left beside the missing file."""
    signs = []
    backups = list_backups(instance)
    if backups:
        signs.append(f"{len(backups)} backup(s) in {instance.backup_folder}")
    if any(e.get("outcome") == "ok" or e.get("version_before") is not None
           for e in read_history(instance)[0]):
        signs.append(f"an audit trail in {instance.home / 'history.jsonl'}")
    signs += [f"{instance.path}{suffix} is beside it" for suffix in SIDECARS
              if os.path.lexists(f"{instance.path}{suffix}")]
    return signs


def first_problem(problems: list[str], lister: str) -> str:
    """An integrity report, whose rows span lines, as one line of a message: the first
    problem, then how many more and the command that lists them all."""
    prefix = re.match(r"[a-z_ ]+: (?=\*\*\* in database)", problems[0]) if problems else None
    prefix = prefix.group() if prefix else ""
    lines = [line.strip() for problem in problems for line in problem.removeprefix(prefix).splitlines()
             if line.strip() and not line.strip().startswith("*** in database")]
    first = prefix + (lines[0] if lines else "".join(problems).strip())
    return first + (f" (and {len(lines) - 1} more: '{lister}' lists them all)" if len(lines) > 1 else "")


def emergency_step(instance: Instance) -> str:
    """The emergency procedure for a damaged database, by its commands."""
    tool = tool_command("safe_db_update.py")
    return (f"follow 'The database is corrupted' in the manual's emergency procedures: "
            f"'{tool} check {instance.name}', then '{tool} list-backups {instance.name}' and "
            f"'{tool} restore {instance.name} FILE'")


def connect(instance: Instance) -> sqlite3.Connection:
    """A read-write connection in autocommit mode; our own BEGIN/COMMIT only.

    synchronous=EXTRA: in DELETE journal mode a commit also syncs the folder after the
    journal is deleted, so a commit we report survives a power cut, and a restore that
    shrinks the file truncates it only once the journal is gone for good (otherwise a
    cut could bring the journal back over the truncated file).
    """
    require_database(instance)
    conn = open_path(instance.path, instance.busy_timeout)
    conn.execute("PRAGMA synchronous = EXTRA")
    return conn


def open_path(path: Path, timeout: float = 30.0, readonly: bool = False,
              header: bytes | None = None) -> sqlite3.Connection:
    """Open an existing database (never create one); readonly connections cannot write."""
    # A mode=ro connection to a WAL database that nobody has open creates -wal and -shm
    # files it cannot remove; a query_only read-write connection removes them on close.
    quiet_wal = readonly and is_wal(path, header) and not any(
        os.path.exists(f"{path}{suffix}") for suffix in ("-wal", "-shm"))
    # A crashed writer's hot journal must be rolled back before anyone reads; a mode=ro
    # connection cannot ('attempt to write a readonly database'), a query_only one can.
    hot_journal = readonly and os.path.exists(f"{path}-journal")
    mode = "ro" if readonly and not (quiet_wal or hot_journal) else "rw"
    try:
        conn = sqlite3.connect(f"{Path(os.path.abspath(path)).as_uri()}?mode={mode}", uri=True,
                               isolation_level=None, timeout=timeout)
        conn.execute("PRAGMA query_only = ON" if readonly else "PRAGMA foreign_keys = ON")
    except sqlite3.Error as exc:
        raise CommandError(f"cannot open {path}: {exc}") from exc
    return conn


def is_wal(path: Path, header: bytes | None = None) -> bool:
    """True when the file's header says WAL mode (bytes 18 and 19 are 2)."""
    if header is None:
        try:
            with open(path, "rb") as handle:
                header = handle.read(20)
        except OSError:
            return False
    return len(header) == 20 and header[18] == 2 and header[19] == 2


def open_readonly(instance: Instance) -> sqlite3.Connection:
    """A connection that cannot write, so a typo never creates or changes a database.

    A schema written by a newer SQLite is refused here, for every command that reads,
    in the words backup and restore use (refuse_newer_schema): it is not damage.
    """
    header = require_database(instance)
    conn = open_path(instance.path, instance.busy_timeout, readonly=True, header=header)
    try:
        refuse_newer_schema(instance, conn)
    except sqlite3.Error as exc:
        if is_busy(exc):            # the caller's reads would wait again: say it now
            conn.close()
            raise
    except CommandError:
        conn.close()
        raise
    return conn


def refuse_same_file(instance: Instance) -> None:
    """Write commands refuse a second name for one file first, whatever else they find."""
    if instance.same_file_as:
        others = " and ".join(f"'{n}'" for n in instance.same_file_as)
        raise CommandError(f"{instance.config}: instances '{instance.name}' and {others} are the "
                           f"same file {instance.path}; their locks and backups would not guard "
                           f"each other; remove all but one of them from the registry; nothing "
                           f"done", EXIT_USAGE)


@contextmanager
def instance_lock(instance: Instance, command: str) -> Iterator[None]:
    """Keep backup, migrate and restore of one instance from overlapping."""
    refuse_same_file(instance)
    make_private_folder(instance, instance.home)
    lock_path = instance.home / "lock"
    try:
        handle = os.fdopen(open_private(lock_path, os.O_RDWR), "r+", encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"{instance.name}: cannot open lock file {lock_path}: {exc.strerror}") from exc
    with handle:
        if fcntl is not None:
            wait_for_lock(handle, instance, lock_path)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"command": command, "pid": os.getpid(), "since": utc_now()[1]}))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()           # flock is released when the file is closed


def wait_for_lock(handle, instance: Instance, lock_path: Path) -> None:
    deadline = time.monotonic() + instance.busy_timeout
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise CommandError(f"{instance.name}: busy: {describe_holder(lock_path)}; "
                                   f"waited {instance.busy_timeout:g}s; try again when it "
                                   f"has finished") from None
            time.sleep(0.05)


def describe_holder(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text(encoding="utf-8"))
        return f"'{holder['command']}' (pid {holder['pid']}) holds the lock since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"another process holds {lock_path}"


def is_busy(exc: BaseException) -> bool:
    """SQLite gave up waiting for another connection's lock."""
    return isinstance(exc, sqlite3.OperationalError) and any(
        word in str(exc) for word in ("database is locked", "database is busy",
                                      "database table is locked"))


def locked_message(instance: Instance) -> str:
    return (f"{instance.name}: the database is locked by another connection"
            f"{lock_holders(instance.path)} for more than {instance.busy_timeout:g} s; nothing "
            f"changed; try again when it is idle")


def lock_holders(path: Path) -> str:
    """' (the application? pid 4242: gunicorn)': the other processes holding POSIX locks on
    the database or its -shm file, from /proc/locks (Linux); '' when that cannot be told."""
    files = set()
    for candidate in (path, Path(f"{path}-shm")):
        with contextlib.suppress(OSError):
            found = os.stat(candidate)
            files.add(f"{os.major(found.st_dev):02x}:{os.minor(found.st_dev):02x}:{found.st_ino}")
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return " (the application?)"
    pids = sorted({int(f[4]) for f in (line.split() for line in lines)
                   if len(f) >= 6 and f[1] == "POSIX" and f[5] in files and f[4].isdigit()
                   and int(f[4]) != os.getpid()})
    names = []
    for pid in pids[:5]:
        try:
            names.append(f"pid {pid}: {Path(f'/proc/{pid}/comm').read_text().strip()}")
        except OSError:
            names.append(f"pid {pid}")
    return f" (the application? {', '.join(names)})" if names else " (the application?)"


class BoundedSteps:
    """A progress callback for Connection.backup that gives up, with SQLite's own 'database
    is locked', once its steps have waited `timeout` seconds in all for other connections'
    locks: Python's backup() would otherwise retry a busy step forever. then(status,
    remaining, total) is called after each step that was not busy."""

    def __init__(self, timeout: float, then: Callable[[int, int, int], None] | None = None) -> None:
        self.timeout, self.then = timeout, then
        self.waited, self.last = 0.0, time.monotonic()

    def __call__(self, status: int, remaining: int, total: int) -> None:
        if status in (SQLITE_BUSY, SQLITE_LOCKED):
            self.waited += time.monotonic() - self.last
            if self.waited >= self.timeout:
                raise sqlite3.OperationalError(f"database is locked (waited {self.waited:.1f} s)")
        elif self.then is not None:
            self.then(status, remaining, total)
        self.last = time.monotonic()


# --- Small helpers -----------------------------------------------------------

def started_as(default: str, argv: list[str] | None) -> str:
    """The name the command was started by: the script's (database_migration.py) or the
    installed command's (database-migration); default when main() is called with argv."""
    name = os.path.basename(sys.argv[0]) if argv is None and sys.argv and sys.argv[0] else ""
    return name if name and name not in ("-c", "-m", "__main__.py") else default


def program() -> str:
    """The running command's name, for messages."""
    return INVOCATION[0] if INVOCATION else PROG


def tool_command(script: str) -> str:
    """How a message names one of the two tools: as installed commands when this one was
    started as one (safe-db-update), else as scripts (safe_db_update.py)."""
    return script if program().endswith(".py") else CONSOLE_SCRIPTS[script]


def utc_now() -> tuple[str, str]:
    """(file-name stamp, ISO 8601) for the same instant, in UTC."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S%fZ"), now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def make_private_folder(instance: Instance, folder: Path) -> None:
    """Create one of the instance's folders under its backup_dir, and vouch for the chain.

    Every folder made here is 0700 whatever the umask. From backup_dir down (backup_dir
    itself may be a symbolic link an administrator made), every level must be a real
    folder, owned by this user or root and not writable by other users: otherwise another
    user could put links where the lock, the audit trail or a backup is written. The
    instance's own folders below backup_dir are made 0700 when they are ours. Within
    vouched_once, a level already vouched for is not looked at again.
    """
    vouched = COMMAND_FOLDERS[-1].vouched if COMMAND_FOLDERS else set()
    if folder in vouched:
        return
    try:
        if instance.backup_dir not in vouched:
            make_folders(instance.backup_dir)
            check_private(instance.backup_dir, os.stat(instance.backup_dir))
        level, chain = instance.backup_dir, [instance.backup_dir]
        for part in folder.relative_to(instance.backup_dir).parts:
            level = level / part
            chain.append(level)
            if level not in vouched:
                check_private_level(level)
        vouched.update(chain)
    except OSError as exc:
        raise CommandError(f"cannot create folder {folder}: {exc.strerror}"
                           + (f" ({exc.filename})" if exc.filename else "")) from exc


def check_private_level(level: Path) -> None:
    """One level below backup_dir: made if missing (0700), then a real folder of ours or
    root's that no other user can write; ours is made 0700. One lstat when it exists."""
    try:
        info = os.lstat(level)
    except FileNotFoundError:
        if COMMAND_FOLDERS:         # its parent is synced with the command's backup
            make_folder(level, sync=False)
            COMMAND_FOLDERS[-1].unsynced.append(level.parent)
        else:
            make_folder(level)
        info = os.lstat(level)
    if stat.S_ISLNK(info.st_mode):
        raise CommandError(f"{level} is a symbolic link; backups must live in a real folder")
    if info.st_uid == getattr(os, "geteuid", lambda: -1)() \
            and stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(level, 0o700)
        info = os.lstat(level)
    check_private(level, info)


class FolderRecord:
    """What one write command on one instance did to its folders below backup_dir."""

    def __init__(self) -> None:
        self.vouched: set[Path] = set()     # checked: real, ours or root's, private
        self.unsynced: list[Path] = []      # parents of folders made, not yet synced


@contextmanager
def vouched_once() -> Iterator[None]:
    """One write command on one instance: each of its folders is vouched for once, not at
    every step (the lock, the backup, retention, the audit line each asked again), and
    the parents of the folders it makes are synced together (sync_new_folders).

    What was vouched for stays true for the command: every level from backup_dir down
    is owned by this user or root and writable by no other user, so no one else can
    replace it or put a link in it meanwhile. A nested use keeps the outer record.
    """
    COMMAND_FOLDERS.append(COMMAND_FOLDERS[-1] if COMMAND_FOLDERS else FolderRecord())
    try:
        yield
    finally:
        try:
            sync_new_folders()      # folders made, but no backup synced them (nothing pending)
        finally:
            COMMAND_FOLDERS.pop()


def sync_new_folders() -> None:
    """Sync the parents of the folders this command made, deepest first, each once.

    A new folder survives a power cut only once its parent is synced. Within a command
    they are synced right after the backup's own folder (create_backup), not one at a
    time as they are made: by then the syncs of the copy, the manifest and their folder
    have usually written these entries too, so these syncs find little left to write
    (here, ext4: 0.10 ms for both against 0.21 ms at mkdir time). Nothing is relied on
    before: the backup is durable, its whole chain included, before create_backup
    returns, and migrate --create syncs them before it writes (locked_migrate).
    """
    if not COMMAND_FOLDERS:
        return
    unsynced = COMMAND_FOLDERS[-1].unsynced
    for parent in sorted(set(unsynced), key=lambda p: len(p.parts), reverse=True):
        fsync_path(parent, directory=True)
    unsynced.clear()


def check_private(folder: Path, info: os.stat_result, doing: str = "write there") -> None:
    """Refuse a folder another user owns or can write to (a sticky one like /tmp is fine)."""
    if not stat.S_ISDIR(info.st_mode):
        raise CommandError(f"{folder} is not a folder; backups must live in a real folder")
    if hasattr(os, "geteuid") and info.st_uid not in (os.geteuid(), 0):
        raise CommandError(f"{folder} belongs to another user ({owner_name(info.st_uid)}); "
                           f"refusing to {doing}; remove it or run as its owner")
    if writable_by_others(info):
        raise CommandError(f"{folder} can be written by other users (mode "
                           f"{stat.S_IMODE(info.st_mode):04o}); refusing to {doing}; "
                           f"make it private: chmod 700 {folder}")


def trusted_folder(instance: Instance, folder: Path) -> bool:
    """For commands that only read: whether one of the instance's folders exists, after
    vouching for it as make_private_folder does (nothing made or changed). A folder the
    write commands would refuse is refused here too, so that files another user
    planted there (a link to a file only root may read) are never read out. Within
    vouched_once, a folder make_private_folder vouched for is trusted at once."""
    if COMMAND_FOLDERS and folder in COMMAND_FOLDERS[-1].vouched:
        return True
    try:
        if not os.path.lexists(folder):
            return False
        check_private(instance.backup_dir, os.stat(instance.backup_dir), "read from there")
        level = instance.backup_dir
        for part in folder.relative_to(instance.backup_dir).parts:
            level = level / part
            info = os.lstat(level)
            if stat.S_ISLNK(info.st_mode):
                raise CommandError(f"{level} is a symbolic link; backups must live in a real folder; "
                                   f"refusing to read from there")
            check_private(level, info, "read from there")
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise CommandError(f"cannot read folder {folder}: {describe_error(exc)}") from exc
    return True


def writable_by_others(info: os.stat_result) -> bool:
    """World-writable, or group-writable for a group others are in; never a sticky folder.

    A group-writable folder whose group is its owner's own private group (umask 002 on
    systems with user private groups) has no other user in it, so it is not refused.
    """
    if info.st_mode & stat.S_ISVTX:
        return False
    if info.st_mode & 0o002:
        return True
    return bool(info.st_mode & 0o020) and not private_group(info.st_uid, info.st_gid)


def private_group(uid: int, gid: int) -> bool:
    """The user's own group, named after the user, with no other user in it."""
    try:
        import grp
        import pwd
        user, group = pwd.getpwuid(uid), grp.getgrgid(gid)
        others = [p.pw_name for p in pwd.getpwall() if p.pw_gid == gid and p.pw_uid != uid]
    except (ImportError, KeyError):
        return False
    return group.gr_name == user.pw_name and not others \
        and set(group.gr_mem) <= {user.pw_name}


def owner_name(uid: int) -> str:
    try:
        import pwd
        return f"{pwd.getpwuid(uid).pw_name}, uid {uid}"
    except (ImportError, KeyError):
        return f"uid {uid}"


def make_folders(folder: Path) -> None:
    """Create folder and any missing parents, each 0700 whatever the umask."""
    missing = []
    while not os.path.lexists(folder) and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    for level in reversed(missing):
        make_folder(level)


def make_folder(level: Path, sync: bool = True) -> None:
    """One folder, 0700 whatever the umask, made durable at once; nothing if it exists.

    A new folder survives a power cut only once the folder holding it is synced, so its
    parent is fsynced before anything can be written into it. sync False: the caller
    syncs the parent later, before anything written there is relied on (sync_new_folders).
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(level, 0o700)
        os.chmod(level, 0o700)
        if sync:
            fsync_path(level.parent, directory=True)


def open_private(path: Path, flags: int) -> int:
    """Open a file the tool writes (created 0600), never through a symbolic link."""
    try:
        fd = os.open(path, flags | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CommandError(f"{path} is a symbolic link; the tool never writes through one; "
                               f"remove it") from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (hasattr(os, "geteuid")
                                              and info.st_uid != os.geteuid()):
            raise CommandError(f"{path} is not a file of this user's; refusing to write to it; "
                               f"remove it")
        if stat.S_IMODE(info.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def schema_version(conn: sqlite3.Connection) -> int | None:
    """Highest applied migration, 0 when none, None when unreadable."""
    try:
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                              "AND name = 'schema_migrations'").fetchone()
        if not exists:
            return 0
        return int(conn.execute(SCHEMA_VERSION_SQL).fetchone()[0] or 0)
    except (sqlite3.Error, TypeError, ValueError):
        return None


def integrity_problems(conn: sqlite3.Connection, quick: bool = False) -> list[str]:
    pragma = "quick_check" if quick else "integrity_check"
    try:
        rows = [row[0] for row in conn.execute(f"PRAGMA {pragma}")]
    except sqlite3.DatabaseError as exc:
        return [f"{pragma} failed: {exc}"]
    return [] if rows == ["ok"] else [str(row) for row in rows]


def foreign_key_problems(conn: sqlite3.Connection) -> list[str]:
    try:
        rows = conn.execute("PRAGMA foreign_key_check").fetchall()
    except sqlite3.DatabaseError as exc:
        return [f"foreign_key_check failed: {exc}"]
    return [f"foreign key: {table} row {rowid} refers to a missing row in {parent}"
            for table, rowid, parent, _ in rows]


def human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"  # pragma: no cover


# --- Backups -----------------------------------------------------------------

def create_backup(instance: Instance, reason: str = "manual", progress: Progress | None = None,
                  copy: Callable[[Instance, Path], None] | None = None) -> Backup:
    """Copy the live database into a verified, checksummed backup file.

    The copy is written to a hidden temporary name and only renamed into place,
    beside its manifest, once it is complete and synced; a crash leaves nothing
    that looks like a backup. copy: how to take it (default copy_database); it writes
    partial, and describe_copy syncs it. progress: shows the copy and its verification
    on a terminal.
    """
    if not instance.path.is_file():
        raise CommandError(missing_database(instance))
    started = time.perf_counter()
    folder = instance.backup_folder
    make_private_folder(instance, folder)
    clear_leftovers(folder)                 # left by a killed backup; callers hold the lock
    final = unique_backup_path(folder, instance.stem, reason)
    partial = folder / f".{final.name}.partial"
    try:
        with progress_line(instance, partial, progress is not None and progress.enabled):
            (copy or copy_database)(instance, partial)
        if progress is not None:
            progress.step("verifying the backup (integrity_check, SHA-256)")
        backup = describe_copy(instance, partial, final, reason)
        # Durability order: the copy was synced (describe_copy) and the manifest is synced
        # before either is renamed into place, manifest first; then the folder, for both
        # names; then the new folders above it, so the chain survives a power cut too.
        write_manifest(backup, partial)
        fsync_path(folder, directory=True)
        sync_new_folders()
    except (OSError, sqlite3.Error) as exc:
        discard(partial, Path(f"{final}.json.partial"))
        if is_busy(exc):
            raise CommandError(f"{locked_message(instance)} (no backup was made)") from exc
        hint = "" if what_ran_out(exc) else f"; check free space and permissions in {folder}"
        raise CommandError(f"{instance.name}: backup failed: {describe_error(exc)}; the database "
                           f"is unchanged{hint}") from exc
    except BaseException:
        discard(partial, Path(f"{final}.json.partial"))
        raise
    finally:
        if progress is not None:
            progress.done()
    return replace(backup, seconds=time.perf_counter() - started)


def clear_leftovers(folder: Path) -> None:
    """Remove what a killed backup or prune leaves: hidden partial copies, manifest drafts,
    and manifests whose backup file is missing. Only under the instance's lock."""
    for entry in os.scandir(folder):
        name = entry.name
        orphan = name.endswith(".db.json") and BACKUP_NAME.fullmatch(name[:-len(".json")]) \
            and not os.path.lexists(entry.path[:-len(".json")])
        if (name.startswith(".") and name.endswith(".partial")) or name.endswith(".db.json.partial") \
                or orphan:
            discard(Path(entry.path))


def unique_backup_path(folder: Path, stem: str, reason: str) -> Path:
    while True:
        stamp, _ = utc_now()
        final = folder / f"{stem}-{stamp}-{reason}.db"
        if not final.exists():
            return final
        time.sleep(0.000001)


def copy_database(instance: Instance, partial: Path) -> None:
    """One consistent snapshot that never restarts, written to partial and synced.

    A rollback-journal database is copied byte for byte while a read transaction
    holds SQLite's shared lock, so no writer can commit until the copy is done
    (about a third of the time the backup API takes). A WAL database, whose writers
    go on meanwhile, goes through the backup API in one step: one read snapshot.
    """
    with closing(open_readonly(instance)) as source:
        copy_snapshot(instance, source, partial)


def copy_through(source: sqlite3.Connection) -> Callable[[Instance, Path], None]:
    """copy_database through a connection the caller already holds open on the live
    database (migrate's own, which then runs the migration): one connection opened, and
    its schema read, once per run instead of twice. Only while it holds no lock: the
    copy's own read transaction is the snapshot."""
    def copy(instance: Instance, partial: Path) -> None:
        copy_snapshot(instance, source, partial)
    return copy


def copy_snapshot(instance: Instance, source: sqlite3.Connection, partial: Path) -> None:
    fd = os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    with contextlib.suppress(sqlite3.DatabaseError):    # damage: copied for forensics
        refuse_newer_schema(instance, source)
    if not copy_file_while_locked(source, instance.path, partial):
        copy_pages(source, partial, instance.busy_timeout)


def copy_through_sqlite(instance: Instance, partial: Path) -> None:
    """The backup API, the live file opened by SQLite alone: safe while another connection
    of this process holds its locks (closing any descriptor of a file that Python opened
    would drop every POSIX lock the process holds on it)."""
    fd = os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    uri = f"{Path(os.path.abspath(instance.path)).as_uri()}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, isolation_level=None,
                                 timeout=instance.busy_timeout)) as source:
        copy_pages(source, partial, instance.busy_timeout)


def copy_file_while_locked(source: sqlite3.Connection, path: Path, partial: Path) -> bool:
    """The file's bytes under a shared lock; False, copying nothing, for a WAL database."""
    # Our descriptors close only after COMMIT: closing any descriptor of a file drops
    # every POSIX lock this process holds on it, SQLite's shared lock included.
    with open(path, "rb") as original, open(partial, "r+b") as copy:
        source.execute("BEGIN")
        try:
            source.execute("PRAGMA schema_version").fetchone()  # takes the lock; needs no schema
            if os.pread(original.fileno(), 20, 0)[18:20] == b"\x02\x02":
                return False                # WAL: the file alone is not the snapshot
            copy_bytes(original.fileno(), copy.fileno())
        finally:
            source.execute("COMMIT")
    return True


def copy_bytes(source: int, target: int) -> None:
    """The whole file, in the kernel (copy_file_range) where it can, else through a buffer."""
    total, done = os.fstat(source).st_size, 0
    while done < total:
        count = copy_range(source, target, done, min(COPY_STEP, total - done))
        if count <= 0:
            raise OSError(errno.EIO, "the database file ended before its size while copying")
        done += count


def copy_range(source: int, target: int, offset: int, count: int) -> int:
    if hasattr(os, "copy_file_range"):
        try:
            copied = os.copy_file_range(source, target, count, offset, offset)
            if copied > 0:
                return copied
        except OSError as exc:          # not between these files here: copy through a buffer
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise                   # a full disk or a file-size limit fails the backup
    return os.pwrite(target, os.pread(source, min(count, CHUNK), offset), offset)


def copy_pages(source: sqlite3.Connection, partial: Path, timeout: float) -> None:
    """The backup API in one step: it reads a single snapshot and never restarts."""
    with closing(open_path(partial, timeout)) as target:
        target.execute("PRAGMA journal_mode = OFF")   # a fresh file: nothing to protect yet
        target.execute("PRAGMA synchronous = OFF")    # one fsync at the end instead
        source.backup(target, pages=-1, progress=BoundedSteps(timeout))
        if target.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            target.execute("PRAGMA journal_mode = DELETE")


@contextmanager
def progress_line(instance: Instance, partial: Path, enabled: bool, label: str = "backing up",
                  after: str = "copied; verifying") -> Iterator[None]:
    """On a terminal, once a copy takes a while, show how much of it is written."""
    if not enabled:
        yield
        return
    finished = threading.Event()
    total = max(instance.path.stat().st_size, 1)

    def watch() -> None:
        if finished.wait(PROGRESS_AFTER_SECONDS):
            return
        while not finished.wait(0.25):
            with contextlib.suppress(OSError):
                done = partial.stat().st_size
                print(f"\r{instance.name}: {label}: {human_size(done)} of {human_size(total)} "
                      f"({min(100, 100 * done // total)}%)", end="", file=sys.stderr, flush=True)
        print(f"\r{instance.name}: {label}: {after}{' ' * 30}", file=sys.stderr, flush=True)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        finished.set()
        watcher.join()


class Progress:
    """What a long command is doing, on stderr, for someone at a terminal (shows_progress).

    Silent for the first PROGRESS_AFTER_SECONDS of the command; from then on each step is
    shown as it starts, its elapsed time updated in place ('dev: applying 0004 add index
    (12.3 s so far)'). When the next step starts or the command ends, a step is left on a
    line of its own with the time it took; a step that is not kept (housekeeping between
    migrations) only when it took a second or more, else it is wiped. Disabled: nothing.
    """

    def __init__(self, name: str, enabled: bool) -> None:
        self.name, self.enabled = name, enabled
        self.started = time.monotonic()
        self.text, self.since, self.width, self.keep = "", 0.0, 0, True
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.ticker: threading.Thread | None = None

    def step(self, text: str, keep: bool = False) -> None:
        """A new step begins (the one before it has ended); keep: always leave its line."""
        if not self.enabled:
            return
        with self.lock:
            self.show(final=True)
            self.text, self.since, self.keep = text, time.monotonic(), keep
            self.show()
        if self.ticker is None:
            self.ticker = threading.Thread(target=self.tick, daemon=True)
            self.ticker.start()

    def tick(self) -> None:
        while not self.finished.wait(0.25):
            with self.lock:
                self.show()

    def show(self, final: bool = False) -> None:
        now = time.monotonic()
        if not self.text or now - self.started < PROGRESS_AFTER_SECONDS:
            return
        if final and not self.keep and now - self.since < 1.0:
            if self.width:                  # wipe it: the next line takes its place
                print("\r" + " " * self.width + "\r", end="", file=sys.stderr, flush=True)
            self.width = 0
            return
        elapsed = f"took {now - self.since:.1f} s" if final else f"{now - self.since:.1f} s so far"
        line = f"{self.name}: {self.text} ({elapsed})"
        print("\r" + line.ljust(self.width), end="\n" if final else "", file=sys.stderr, flush=True)
        self.width = 0 if final else len(line)

    def done(self) -> None:
        """The step under way has ended; nothing is shown until the next one (a prompt, or
        the backup's own progress, may follow)."""
        with self.lock:
            self.show(final=True)
            self.text = ""

    def close(self) -> None:
        """The command ends: the last step's line is finished."""
        self.finished.set()
        if self.ticker is not None:
            self.ticker.join()
        self.done()


def shows_progress(args: argparse.Namespace) -> bool:
    """Progress goes to stderr when it is a terminal, never under --quiet or --json."""
    return bool(sys.stderr and sys.stderr.isatty()) and not args.quiet and not args.json


def copy_raw(instance: Instance, partial: Path) -> None:
    """A byte-for-byte copy, for a file SQLite cannot open: kept for forensics."""
    fd = os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    shutil.copyfile(instance.path, partial)


def describe_copy(instance: Instance, partial: Path, final: Path, reason: str) -> Backup:
    """Sync, check and hash the copy. For a big copy the three run at once (the check on
    this thread, the fsync and the SHA-256 on two others; each waits outside Python's
    lock), so it costs about its integrity_check, not the sum; all three finish before
    anything is named a backup."""
    quick = instance.verify == "quick" and reason in OPERATOR_REASONS
    at_once = partial.stat().st_size >= VERIFY_AT_ONCE_BYTES
    synced = beside(fsync_path, partial, at_once=at_once)
    digest = beside(sha256_of, partial, at_once=at_once)
    try:
        with closing(open_path(partial, readonly=True)) as copy:
            problems = integrity_problems(copy, quick=quick)
            version = schema_version(copy)
    except (CommandError, sqlite3.Error) as exc:
        problems, version = [str(exc)], None
    finally:
        synced()
    _, created_at = utc_now()
    return Backup(path=final, sha256=digest(), size=partial.stat().st_size,
                  created_at=created_at, source=str(instance.path), schema_version=version,
                  reason=reason, sqlite_version=sqlite3.sqlite_version, verified=not problems,
                  problems=tuple(problems), checked_with=VERIFY_CHECKS["quick" if quick else "full"])


def beside(work: Callable[..., T], *args, at_once: bool = True) -> Callable[[], T]:
    """Start work(*args) on another thread; the function returned waits for it and returns
    its result, or raises its error. Not at_once: the work runs when it is waited for."""
    if not at_once:
        return functools.partial(work, *args)
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, work(*args)))
        except BaseException as exc:    # handed to the waiting thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def wait() -> T:
        thread.join()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value
    return wait


def write_manifest(backup: Backup, partial: Path) -> None:
    """Manifest first, then the database file: a backup is a .db with its .json."""
    manifest = Path(f"{backup.path}.json")
    temporary = Path(f"{manifest}.partial")
    discard(temporary)
    fd = open_private(temporary, os.O_WRONLY | os.O_EXCL)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(backup.manifest(), indent=2, sort_keys=True))   # one write
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(manifest)
    partial.replace(backup.path)


def discard(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def describe_error(exc: BaseException) -> str:
    """An error in a few words; a write that ran out of room says what ran out."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}" + (f" ({exc.filename})" if exc.filename else "")
    else:
        text = str(exc)
    ran_out = what_ran_out(exc)
    return f"{ran_out} ({text})" if ran_out else text


def what_ran_out(exc: BaseException) -> str:
    """'out of disk space', 'out of disk quota', the file size limit, or '' for other errors.

    SQLite reports a full disk as 'database or disk is full' and a file that reached
    the process's size limit (ulimit -f, EFBIG) as 'disk I/O error'.
    """
    number, text = getattr(exc, "errno", None), str(exc)
    limit = file_size_limit()
    if number == errno.EFBIG or (limit is not None and isinstance(exc, sqlite3.Error)
                                 and ("disk I/O error" in text or "disk is full" in text)):
        return ("out of file size: a file reached the process's file size limit (ulimit -f"
                + (f" = {human_size(limit)}" if limit is not None else "") + ")")
    if number == errno.ENOSPC or "database or disk is full" in text:
        return "out of disk space"
    if number == getattr(errno, "EDQUOT", None):
        return "out of disk quota"
    return ""


def file_size_limit() -> int | None:
    """The process's RLIMIT_FSIZE in bytes, or None when there is none."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def read_manifest(path: Path) -> Backup | None:
    """The backup at path, or None when it has no readable manifest."""
    try:
        data = json.loads(Path(f"{path}.json").read_text(encoding="utf-8"))
        return Backup(path=Path(os.path.abspath(path)), sha256=str(data["sha256"]),
                      size=int(data["size"]), created_at=str(data["created_at"]),
                      source=str(data["source"]), schema_version=data.get("schema_version"),
                      reason=str(data["reason"]), sqlite_version=str(data.get("sqlite_version", "")),
                      verified=data.get("verified") is True,
                      checked_with=str(data.get("checked_with", "integrity_check")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):
        return None


def list_backups(instance: Instance) -> list[Backup]:
    """Every backup file in the folder, newest first; one without a readable manifest is
    listed too, as an unverified copy (has_manifest False)."""
    folder = instance.backup_folder
    if not trusted_folder(instance, folder):
        return []
    found = []
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or not BACKUP_NAME.fullmatch(entry.name):
            continue
        backup = read_manifest(Path(entry.path))
        if backup is None and entry.is_file(follow_symlinks=False):
            backup = bare_backup(Path(entry.path))
        if backup is not None:
            found.append(backup)
    return sorted(found, key=lambda b: (b.created_at, b.path.name), reverse=True)


def bare_backup(path: Path) -> Backup | None:
    """A backup file without a readable manifest: its time and reason from its name."""
    match = BACKUP_NAME.fullmatch(path.name)
    try:
        size = path.stat().st_size
    except OSError:
        return None
    return Backup(path=Path(os.path.abspath(path)), sha256="", size=size,
                  created_at=stamp_as_iso(match["stamp"]), source="", schema_version=None,
                  reason=match["reason"], sqlite_version="", verified=False, has_manifest=False)


def stamp_as_iso(stamp: str) -> str:
    """'20261123T020000123456Z' (a file name's time) as '2026-11-23T02:00:00.123456Z'."""
    return (f"{stamp[0:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:"
            f"{stamp[13:15]}.{stamp[15:21]}Z")


def backup_time(backup: Backup) -> datetime.datetime | None:
    """When the backup was made (its created_at, in UTC); None when that cannot be read."""
    try:
        when = datetime.datetime.fromisoformat(backup.created_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.astimezone(datetime.timezone.utc)


def is_future(backup: Backup, now: datetime.datetime) -> bool:
    """Dated after now (the clock was stepped back since), or with no readable time."""
    when = backup_time(backup)
    return when is None or when > now


def newest_verified(backups: list[Backup]) -> Backup | None:
    """'The newest' for restore, verify, info and status: in a newest-first list, the first
    verified backup that is not dated in the future."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return next((b for b in backups if b.verified and not is_future(b, now)), None)


def newest_backup_time(instance: Instance) -> str | None:
    """created_at (from its manifest) of the newest verified backup, for status."""
    newest = newest_verified(list_backups(instance))
    return newest.created_at if newest else None


def find_backup(instance: Instance, file: str | None) -> Backup:
    """The named backup (a path or a bare file name in the folder), or the newest verified."""
    if not file:
        backups = list_backups(instance)
        newest = newest_verified(backups)
        if newest is not None:
            return newest
        if not backups:
            raise CommandError(f"{instance.name}: no backups in {instance.backup_folder}; "
                               f"make one with 'backup {instance.name}'")
        raise CommandError(f"{instance.name}: no verified backup in {instance.backup_folder}, only "
                           f"{len(backups)} unverified or future-dated; see 'list-backups "
                           f"{instance.name}' and name a FILE")
    path = Path(file)
    if not path.exists() and len(path.parts) == 1:
        path = instance.backup_folder / file
    if not path.is_file():
        raise CommandError(f"{instance.name}: no backup file {file}; "
                           f"see 'list-backups {instance.name}'")
    backup = read_manifest(path)
    if backup is None:
        raise CommandError(f"{path}: no readable manifest {path}.json; it is not a complete "
                           f"backup and cannot be verified")
    return backup


def verify_backup(backup: Backup) -> list[str]:
    """Problems with a backup: checksum, size or integrity; empty when it is sound."""
    try:
        size = backup.path.stat().st_size
        if size != backup.size:
            return [f"size is {size}, manifest says {backup.size}"]
        digest = sha256_of(backup.path)
        if digest != backup.sha256.lower():
            return [f"SHA-256 is {digest}, manifest says {backup.sha256}"]
        with open(backup.path, "rb") as handle:
            if handle.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                return ["not an SQLite database"]
        with closing(open_path(backup.path, readonly=True)) as conn:
            return [f"integrity: {p}" for p in integrity_problems(conn)]
    except (OSError, sqlite3.Error, CommandError) as exc:
        return [f"cannot read: {describe_error(exc)}"]


def readable(instance: Instance) -> bool:
    """Can SQLite open the file? A busy database, or a schema written by a newer SQLite,
    is an error, never 'unreadable': neither may be replaced as damaged."""
    try:        # not open_readonly: its refusal of a newer schema is not 'unreadable'
        conn = open_path(instance.path, instance.busy_timeout, readonly=True,
                         header=require_database(instance))
    except (CommandError, sqlite3.Error):
        return False
    with closing(conn):
        try:
            refuse_newer_schema(instance, conn)
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                raise CommandError(locked_message(instance)) from exc
            return False
        except sqlite3.Error:
            return False
    return True


def refuse_newer_schema(instance: Instance, conn: sqlite3.Connection) -> None:
    """Read the schema; refuse, changing nothing, when this SQLite cannot parse it.

    "malformed database schema (v) - near "FIRST": syntax error" means a newer SQLite
    wrote syntax this one does not know; "database disk image is malformed" and "file
    is not a database" are damage, and other errors are raised as they are.
    """
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        text = str(exc)
        if "unsupported file format" in text or (text.startswith("malformed database schema")
                                                 and any(m in text for m in NEWER_SCHEMA)):
            raise CommandError(f"{instance.name}: this SQLite ({sqlite3.sqlite_version}) cannot "
                               f"read the schema of {instance.path} ({text}); it was probably "
                               f"written by a newer SQLite and is not damaged; nothing changed; "
                               f"run the tool with a Python whose SQLite is as new as the "
                               f"application's") from exc
        raise


def restore_backup(instance: Instance, backup: Backup) -> tuple[Backup | None, list[str], list[Path]]:
    """Put backup's contents into the live database, after a pre-restore backup of it.

    Returns the pre-restore backup, the integrity problems found afterwards, and the
    leftover -journal, -wal and -shm files set aside. A missing or unreadable file is
    replaced whole (its bytes kept for forensics).
    """
    if not readable(instance):
        safety = create_backup(instance, "pre-restore", copy=copy_raw) if instance.path.exists() else None
        return (safety, *replace_file(instance, backup))
    wal = is_wal(instance.path)
    # Opened before SQLite's connections and closed after them: closing a descriptor
    # drops every POSIX lock the process holds on the file (SQLite's included).
    with open(instance.path, "rb") as held, \
            closing(open_path(backup.path, readonly=True)) as source, \
            closing(connect(instance)) as live:
        saved: list[Backup] = []
        copy = copy_through_sqlite if wal else copy_held_file(held.fileno())

        def save_first(status: int, remaining: int, total: int) -> None:
            # After the first step the copy holds the live database's write lock until it
            # commits, so no row the application commits can fall between the two. In
            # rollback-journal mode the lock is exclusive and the file still holds the
            # last commit (the step's pages wait in the cache), so its bytes are copied.
            if not saved and status == sqlite3.SQLITE_OK:
                saved.append(create_backup(instance, "pre-restore", copy=copy))

        page_size, page_count = (source.execute(f"PRAGMA {p}").fetchone()[0]
                                 for p in ("page_size", "page_count"))
        left_wal = wal and leave_wal_for_page_size(instance, live, page_size)
        if left_wal:
            copy = copy_held_file(held.fileno())
        try:
            if page_count <= 1:             # one step would finish the copy: save first
                saved.append(create_backup(instance, "pre-restore"))
            live.execute(f"PRAGMA cache_size = -{4 * RESTORE_STEP // 1024}")   # no spill in a step
            try:
                source.backup(live, pages=max(1, min(RESTORE_STEP // page_size, page_count - 1)),
                              progress=BoundedSteps(instance.busy_timeout, save_first))
            except sqlite3.Error as exc:
                if is_busy(exc):
                    raise CommandError(locked_message(instance)) from exc
                raise CommandError(f"{instance.name}: restore failed: {describe_error(exc)}; the "
                                   f"database is unchanged") from exc
            return saved[0], integrity_problems(live), []
        finally:
            if left_wal:
                return_to_wal(instance, live)


def leave_wal_for_page_size(instance: Instance, live: sqlite3.Connection, page_size: int) -> bool:
    """True when the backup's page size differs and the live database left WAL mode for it.

    SQLite cannot change the page size of a database in WAL mode ('attempt to write a
    readonly database'); in rollback-journal mode it can. Leaving WAL mode needs the
    database to itself: while the application has it open, refuse, changing nothing.
    """
    live_size = live.execute("PRAGMA page_size").fetchone()[0]
    if live_size == page_size:
        return False
    try:
        mode = live.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
    except sqlite3.OperationalError as exc:
        mode = str(exc)
    if mode != "delete":
        raise CommandError(f"{instance.name}: the backup's page size ({page_size} bytes) differs "
                           f"from the live database's ({live_size}), and SQLite can change the "
                           f"page size of a database in WAL mode only while no other connection "
                           f"has it open ({mode}); nothing changed; stop the application, then "
                           f"run restore again")
    return True


def return_to_wal(instance: Instance, live: sqlite3.Connection) -> None:
    try:
        mode = live.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    except sqlite3.Error as exc:
        mode = str(exc)
    if mode != "wal":
        print(f"{program()}: warning: {instance.name}: restored, but the database stays in "
              f"rollback-journal mode ({mode}); the application switches it back when it sets "
              f"journal_mode = WAL", file=sys.stderr)


def copy_held_file(held: int) -> Callable[[Instance, Path], None]:
    """A copy function reading the live file through a descriptor that stays open."""
    def copy(instance: Instance, partial: Path) -> None:
        fd = os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            copy_bytes(held, fd)
        finally:
            os.close(fd)
    return copy


def replace_file(instance: Instance, backup: Backup) -> tuple[list[str], list[Path]]:
    """Put a synced copy of the backup at the live path, with the replaced file's owner
    and mode (0600, and the folder's owner when run as root, where there was no file).
    Returns the integrity problems found afterwards and the sidecars set aside."""
    path = instance.path
    draft = path.with_name(f".{path.name}.restoring")
    try:
        make_folders(path.parent)
        like = os.stat(path) if path.exists() else None
        discard(draft)                  # left by a killed restore
        fd = os.open(draft, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            with open(backup.path, "rb") as source:
                copy_bytes(source.fileno(), fd)
            keep_owner_and_mode(instance, fd, like)
            os.fsync(fd)
        finally:
            os.close(fd)
        moved = set_aside_sidecars(instance, "replaced")    # they belong to the file being replaced
        draft.replace(path)
        fsync_path(path.parent, directory=True)
    except OSError as exc:
        discard(draft)
        raise CommandError(f"{instance.name}: restore failed: {describe_error(exc)}; "
                           f"nothing changed") from exc
    except BaseException:
        discard(draft)
        raise
    with closing(open_readonly(instance)) as conn:
        return integrity_problems(conn), moved


def keep_owner_and_mode(instance: Instance, fd: int, like: os.stat_result | None) -> None:
    """Give the new file the replaced file's owner and mode; 0600 where there was none,
    owned (when run as root) by the folder's owner. restore and migrate --create share it."""
    if like is None:
        os.fchmod(fd, 0o600)
        if hasattr(os, "geteuid") and os.geteuid() == 0:    # root: the application's folder
            like = os.stat(instance.path.parent)
            os.fchown(fd, like.st_uid, like.st_gid)
        return
    os.fchmod(fd, stat.S_IMODE(like.st_mode))
    if hasattr(os, "fchown") and (like.st_uid, like.st_gid) != (os.geteuid(), os.getegid()):
        try:
            os.fchown(fd, like.st_uid, like.st_gid)
        except PermissionError as exc:
            raise CommandError(f"{instance.name}: {instance.path} belongs to "
                               f"{owner_name(like.st_uid)}; run restore as that user or as root, "
                               f"so that the restored file keeps its owner; nothing "
                               f"changed") from exc


def set_aside_sidecars(instance: Instance, label: str) -> list[Path]:
    """Move -journal, -wal and -shm files beside the live path into the backup folder.

    They belong to a database file that is gone or being replaced; a new file beside
    them would be read through them (and be corrupt). Nothing is deleted.
    """
    make_private_folder(instance, instance.backup_folder)
    stamp, _ = utc_now()
    moved = []
    for suffix in SIDECARS:
        sidecar = Path(f"{instance.path}{suffix}")
        if os.path.lexists(sidecar):
            target = instance.backup_folder / f"{instance.stem}-{stamp}-{label}.db{suffix}"
            sidecar.replace(target)
            if stat.S_ISREG(os.lstat(target).st_mode):     # never chmod through a link
                os.chmod(target, 0o600)     # it may hold the database's rows: private as a backup
            moved.append(target)
    if moved:
        # Gone for good before a new file arrives: a journal that a power cut brought
        # back would be played back into the new file.
        fsync_path(instance.backup_folder, directory=True)
        sync_new_folders()          # and the folders above it, if this command made them
        fsync_path(instance.path.parent, directory=True)
    return moved


def sidecar_kind(path: Path) -> str:
    """'-wal' for a set-aside prod-...-replaced.db-wal."""
    return next(suffix for suffix in SIDECARS if str(path).endswith(suffix))


def retention_policy(instance: Instance, keep: int | None = None) -> Policy:
    """The instance's retention keys; keep (prune --keep N) stands in for keep_backups."""
    return Policy(last=instance.keep_backups if keep is None else keep, daily=instance.keep_daily,
                  weekly=instance.keep_weekly, monthly=instance.keep_monthly)


def plan_retention(instance: Instance, policy: Policy, spare: Path | None = None) -> list[Verdict]:
    """Every backup, newest first, with the rules that keep it; the rest may be removed.

    Only verified backups dated up to now count. The newest of them is always kept; then
    the newest policy.last backups and, further back, the oldest copy of each of the newest
    policy.last restore points (a run of identical copies, same SHA-256, is one point), and
    the newest backup of each of the last N days, ISO weeks and months (UTC) that have
    one. A backup dated in the future is kept and counts for nothing. An unverified copy
    is kept while it is newer than the oldest verified backup kept. spare (the backup
    just made) and a live database always stay.
    """
    backups = list_backups(instance)
    now = datetime.datetime.now(datetime.timezone.utc)
    rules: dict[Path, list[str]] = {b.path: [] for b in backups}
    live = file_identity(instance.path)
    for backup in backups:
        fixed = (("keep_backups = 0", policy.last == 0), ("just made", backup.path == spare),
                 ("live database", live is not None and file_identity(backup.path) == live),
                 ("future", is_future(backup, now)))
        rules[backup.path].extend(rule for rule, applies in fixed if applies)
    dated = [b for b in backups if b.verified and not is_future(b, now)]
    if dated:
        rules[dated[0].path].append("newest")
    for backup in dated[:policy.last] + restore_points(dated)[:policy.last]:
        if "keep_backups" not in rules[backup.path]:
            rules[backup.path].append("keep_backups")
    for rule, count in (("keep_daily", policy.daily), ("keep_weekly", policy.weekly),
                        ("keep_monthly", policy.monthly)):
        for backup, period in newest_per_period(dated, rule)[:count]:
            rules[backup.path].append(f"{rule} {period}")
    kept = [backup_time(b) for b in dated if rules[b.path]]
    for backup in backups:
        newer = not kept or backup_time(backup) > kept[-1]     # than the oldest verified kept
        if not backup.verified and not rules[backup.path] and newer:
            rules[backup.path].append("unverified")
    return [Verdict(b, tuple(rules[b.path])) for b in backups]


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file a path leads to, links followed; None if there is none.
    One stat, where resolving both paths took one per folder of each: and a second name
    for the live file (a hard link) is the live database too."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def restore_points(backups: list[Backup]) -> list[Backup]:
    """One backup per run of identical copies (same SHA-256) in a newest-first list: its oldest."""
    points: list[Backup] = []
    for backup in backups:
        if points and backup.sha256 == points[-1].sha256:
            points[-1] = backup             # an older copy of the same restore point
        else:
            points.append(backup)
    return points


def newest_per_period(backups: list[Backup], rule: str) -> list[tuple[Backup, str]]:
    """The newest backup of each UTC day, ISO week or month that has one, newest first."""
    chosen: list[tuple[Backup, str]] = []
    for backup in backups:
        when = backup_time(backup)
        if rule == "keep_weekly":
            year, week, _ = when.isocalendar()
            period = f"{year}-W{week:02d}"
        else:
            period = when.strftime("%Y-%m-%d" if rule == "keep_daily" else "%Y-%m")
        if not chosen or chosen[-1][1] != period:
            chosen.append((backup, period))
    return chosen


def prune_backups(instance: Instance, keep: int | None = None,
                  spare: Path | None = None) -> list[Backup]:
    """The backups retention removes (see plan_retention); keep stands in for keep_backups."""
    return [v.backup for v in plan_retention(instance, retention_policy(instance, keep), spare)
            if not v.keep]


def remove_backups(backups: list[Backup]) -> None:
    for backup in backups:
        try:
            backup.path.unlink()
            Path(f"{backup.path}.json").unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CommandError(f"cannot remove {backup.path}: {exc.strerror}") from exc


def backup_with_retention(instance: Instance, reason: str, progress: Progress | None = None,
                          copy: Callable[[Instance, Path], None] | None = None
                          ) -> tuple[Backup, list[Backup]]:
    backup = create_backup(instance, reason, progress, copy)
    removed = prune_backups(instance, spare=backup.path)
    remove_backups(removed)
    return backup, removed


# --- Checks and information --------------------------------------------------

def check_database(instance: Instance, quick: bool = False) -> list[str]:
    with closing(open_readonly(instance)) as conn:
        return integrity_problems(conn, quick) + foreign_key_problems(conn)


def database_info(instance: Instance) -> Info:
    with closing(open_readonly(instance)) as conn:
        def pragma(name: str):
            return conn.execute(f"PRAGMA {name}").fetchone()[0]
        try:
            tables = tuple(describe_table(conn, name) for (name,) in conn.execute(TABLES_SQL).fetchall())
            objects = {kind: tuple(name for (name,) in conn.execute(
                f"SELECT name FROM sqlite_master WHERE type = ? AND {NOT_INTERNAL} "
                "ORDER BY name", (kind,))) for kind in ("index", "view", "trigger")}
            info = Info(instance=instance, size=instance.path.stat().st_size,
                        page_size=pragma("page_size"), page_count=pragma("page_count"),
                        freelist_count=pragma("freelist_count"), journal_mode=pragma("journal_mode"),
                        schema_version=schema_version(conn), tables=tables,
                        indexes=objects["index"], views=objects["view"],
                        triggers=objects["trigger"], backups=tuple(list_backups(instance)))
        except sqlite3.DatabaseError as exc:
            raise CommandError(f"{instance.name}: cannot read {instance.path}: {exc}") from exc
    return info


def describe_table(conn: sqlite3.Connection, name: str) -> Table:
    quoted = '"' + name.replace('"', '""') + '"'
    rows = conn.execute(f"SELECT COUNT(*) FROM {quoted}").fetchone()[0]
    columns = tuple(row[1] for row in conn.execute(f"PRAGMA table_info({quoted})"))
    return Table(name=name, rows=rows, columns=columns)


# --- Audit trail -------------------------------------------------------------

def record_history(instance: Instance, entry: dict) -> None:
    """Append one line to <backup_dir>/<name>/history.jsonl; never fails the command."""
    line = {"created_at": utc_now()[1], "user": current_user(), "host": socket.gethostname(),
            "command": " ".join(INVOCATION or sys.argv), "name": instance.name,
            **{key: value for key, value in entry.items()
               if not (value is None and key.startswith("version_"))}}
    text = json.dumps(line, sort_keys=True) + "\n"
    try:
        make_private_folder(instance, instance.home)
        fd = open_private(instance.home / "history.jsonl", os.O_APPEND | os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                text = "\n" + text     # a torn last line (a power cut): start a fresh one
            os.write(fd, text.encode("utf-8"))
        finally:
            os.close(fd)
    except (OSError, CommandError) as exc:
        if str(exc) not in str(entry.get("outcome")):   # the command's own error said it
            print(f"{program()}: warning: history not written: {exc}", file=sys.stderr)


@functools.lru_cache(maxsize=1)
def current_user() -> str:
    """Who runs the command, for the audit line: looked up once a process (without $USER
    or $LOGNAME it reads the user database), not once per member of a fleet."""
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - getuser raises several types when no name is known
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


@contextmanager
def audited(instance: Instance, command: str, before: int | None = None) -> Iterator[dict]:
    """Record the command's outcome in history.jsonl, failure included.

    A Ctrl-C held back by hold_interrupts() (from a COMMIT until this line is written)
    ends the command here, after the line says what happened: InterruptedAfterCommit.
    The command's folders are vouched for once (vouched_once).
    """
    entry: dict = {"operation": command, "version_before": before, "version_after": before,
                   "backup": None}
    started = time.perf_counter()
    with vouched_once():               # each folder checked once, the audit line's included
        try:
            refuse_same_file(instance)      # every write command is audited: refused before anything
            yield entry
            entry["outcome"] = "ok"
        except CommandError as exc:
            entry["outcome"] = f"failed: {exc}"
            exc.known = known_facts(entry)
            raise
        except KeyboardInterrupt as exc:
            entry["outcome"] = "failed: interrupted (Ctrl-C or SIGINT)"
            exc.known = known_facts(entry)
            raise
        except BaseException as exc:
            entry["outcome"] = f"failed: {type(exc).__name__}" + (f": {exc}" if str(exc) else "")
            raise
        finally:
            entry["seconds"] = round(time.perf_counter() - started, 3)
            previous = entry.pop(HELD_HANDLER, None)
            record_history(instance, entry)
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if entry.get("interrupted"):
            late = InterruptedAfterCommit(
                f"{instance.name}: interrupted after COMMIT: the change was committed (version "
                f"{'none' if entry['version_before'] is None else entry['version_before']} -> "
                f"{entry['version_after']}) and recorded as ok in "
                f"{instance.home / 'history.jsonl'}")
            late.known = known_facts(entry)
            raise late


def hold_interrupts(entry: dict) -> None:
    """From a COMMIT until audited() has written entry, note Ctrl-C in it instead of raising,
    so that a change that committed is never recorded as failed."""
    def note(*_) -> None:
        entry["interrupted"] = "after commit"
    try:
        entry.setdefault(HELD_HANDLER, signal.signal(signal.SIGINT, note))
    except ValueError:              # not the main thread: the signal goes to another one
        pass


def known_facts(entry: dict) -> dict:
    """What a failed write command's audit entry knew, for its --json error document, in
    migrate's words: from_version and to_version (where the database is now), backup."""
    facts = {"from_version": entry.get("version_before"), "to_version": entry.get("version_after"),
             "backup": entry.get("backup")}
    return {key: value for key, value in facts.items() if value is not None}


def read_history(instance: Instance) -> tuple[list[dict], list[int]]:
    """The entries of history.jsonl (in today's keys: current_keys), and the numbers of
    the lines that are not one."""
    path = instance.home / "history.jsonl"
    if not trusted_folder(instance, instance.home):
        return [], []
    try:        # never through a link another user put there
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CommandError(f"{path} is a symbolic link; the tool never reads the audit trail "
                               f"through one; remove it") from exc
        raise CommandError(f"cannot read {path}: {describe_error(exc)}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CommandError(f"{path} is not a regular file; remove it")
    entries, unreadable = [], []
    with open(fd, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                entries.append(current_keys(entry))
            else:
                unreadable.append(number)
    return entries, unreadable


def current_keys(entry: dict) -> dict:
    """A history line in today's words: older lines said instance and time (name and
    created_at now) and wrote null for an unknown version (left out now)."""
    renamed = {"instance": "name", "time": "created_at"}
    return {renamed.get(key, key): value for key, value in entry.items()
            if not (value is None and key.startswith("version_"))}


# --- Presentation ------------------------------------------------------------

def emit(args: argparse.Namespace, text: str, data: dict) -> None:
    if getattr(args, "json", False):
        args.emitted = True             # run() adds no error document after this one
        write_stdout(json.dumps(data, indent=2, sort_keys=True))
    elif not getattr(args, "quiet", False) and text:
        write_stdout(text)


def write_stdout(text: str) -> None:
    """Print a result. A reader that stopped reading (| head -1) is not an error: what is
    left goes to /dev/null, and the command carries on to its own end and exit code."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        silence(sys.stdout)


def silence(stream) -> None:
    """Point a standard stream whose reader has gone at /dev/null."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):     # not a real file (a test's StringIO)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def emit_failure(args: argparse.Namespace, error: str, exit_code: int, known: dict | None = None) -> int:
    """With --json, a command that fails still writes one JSON document on stdout: the error,
    the exit code, and what it knew by then (unless it had already written its own)."""
    if getattr(args, "json", False) and not getattr(args, "emitted", False):
        data = {"error": error, "exit_code": exit_code, "command": getattr(args, "command", None)}
        if getattr(args, "name", None):
            data["name"] = args.name
        emit(args, "", {**data, **(known or {})})
    return exit_code


def confirm(args: argparse.Namespace, instance: Instance, question: str, details: str = "") -> None:
    """Ask on a terminal; refuse without one unless --yes. Prompts go to stderr."""
    if getattr(args, "yes", False):
        return
    if details:
        print(details, file=sys.stderr)
    if not sys.stdin or not sys.stdin.isatty():
        raise CommandError(f"{instance.name}: {question} needs confirmation and there is no "
                           f"terminal to ask; add --yes to proceed")
    if instance.protected:
        print(f"{question}\n{instance.name} is protected: type its name to proceed: ",
              end="", file=sys.stderr, flush=True)
        confirmed = sys.stdin.readline().strip() == instance.name
    else:
        print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
        confirmed = sys.stdin.readline().strip().lower() in ("y", "yes")
    if not confirmed:
        raise CommandError(f"{instance.name}: not confirmed; nothing changed")


def backup_as_json(instance: Instance, backup: Backup) -> dict:
    return {"name": instance.name, "path": str(backup.path), "size": backup.size,
            "sha256": backup.sha256, "seconds": round(backup.seconds, 3),
            "reason": backup.reason, "verified": backup.verified,
            "created_at": backup.created_at, "schema_version": backup.schema_version,
            "checked_with": backup.checked_with}


def format_backup(instance: Instance, backup: Backup, removed: list[Backup]) -> str:
    lines = [f"{instance.name}: backup {backup.path} ({human_size(backup.size)}, "
             f"{backup.seconds:.2f}s){'' if backup.verified else ' UNVERIFIED'}"
             f"{'' if backup.checked_with == 'integrity_check' else ' (verify = quick: quick_check only)'}"]
    if removed:
        lines.append(f"{instance.name}: removed {len(removed)} old backup(s) "
                     f"(retention: {describe_policy(retention_policy(instance))})")
    return "\n".join(lines)


def describe_policy(policy: Policy) -> str:
    """'keep_backups = 7, keep_daily = 14': the keys that are set."""
    keys = (("keep_backups", policy.last), ("keep_daily", policy.daily),
            ("keep_weekly", policy.weekly), ("keep_monthly", policy.monthly))
    return ", ".join(f"{key} = {value}" for key, value in keys if value or key == "keep_backups")


def policy_as_json(policy: Policy) -> dict:
    return {"keep_backups": policy.last, "keep_daily": policy.daily,
            "keep_weekly": policy.weekly, "keep_monthly": policy.monthly}


def verdict_as_json(verdict: Verdict) -> dict:
    return {"path": str(verdict.backup.path), "created_at": verdict.backup.created_at,
            "verified": verdict.backup.verified, "keep": verdict.keep,
            "kept_by": list(verdict.kept_by)}


def format_prune(instance: Instance, policy: Policy, verdicts: list[Verdict], dry_run: bool) -> str:
    verb = "would remove" if dry_run else "removed"
    width = max((len(v.backup.path.name) for v in verdicts), default=0)
    lines = [f"{instance.name}: {'keep' if v.keep else verb:<12} {v.backup.path.name:<{width}}  "
             f"{', '.join(v.kept_by)}".rstrip() for v in verdicts]
    doomed = sum(not v.keep for v in verdicts)
    lines.append(f"{instance.name}: {verb} {doomed} backup(s), keeping {len(verdicts) - doomed} "
                 f"({describe_policy(policy)})")
    return "\n".join(lines)


def backup_marks(backup: Backup, now: datetime.datetime) -> list[str]:
    """What list-backups says beside a backup that is not an ordinary verified one."""
    marks = [] if backup.verified else ["unverified" + ("" if backup.has_manifest else " (no manifest)")]
    return marks + (["dated in the future"] if is_future(backup, now) else [])


def listing_as_json(backup: Backup, now: datetime.datetime) -> dict:
    return {"path": str(backup.path), "created_at": backup.created_at, "size": backup.size,
            "schema_version": backup.schema_version, "reason": backup.reason,
            "sha256": backup.sha256 or None, "verified": backup.verified,
            "future": is_future(backup, now)}


def format_listing(instance: Instance, backups: list[Backup], now: datetime.datetime) -> str:
    if not backups:
        return f"{instance.name}: no backups in {instance.backup_folder}"
    lines = [f"{'file':<52} {'created (UTC)':<27} {'size':>10} {'version':>7}  reason"]
    for b in backups:
        version = "?" if b.schema_version is None else str(b.schema_version)
        marks = backup_marks(b, now)
        lines.append(f"{b.path.name:<52} {b.created_at:<27} {human_size(b.size):>10} "
                     f"{version:>7}  {b.reason}" + (f"  {', '.join(marks).upper()}" if marks else ""))
    if any(not b.verified for b in backups):
        lines.append(f"UNVERIFIED: a copy that failed its integrity check or has no manifest; "
                     f"never restored or verified by default (see 'check {instance.name}')")
    if any(is_future(b, now) for b in backups):
        lines.append("DATED IN THE FUTURE: made while the clock was ahead; kept, never taken "
                     "as the newest")
    return "\n".join(lines)


def info_as_json(info: Info) -> dict:
    newest = newest_verified(list(info.backups))
    return {"name": info.instance.name, "path": str(info.instance.path), "size": info.size,
            "sqlite_version": sqlite3.sqlite_version, "page_size": info.page_size,
            "page_count": info.page_count, "freelist_count": info.freelist_count,
            "journal_mode": info.journal_mode, "schema_version": info.schema_version,
            "tables": [{"name": t.name, "rows": t.rows, "columns": list(t.columns)}
                       for t in info.tables],
            "indexes": list(info.indexes), "views": list(info.views),
            "triggers": list(info.triggers),
            "backups": {"count": len(info.backups),
                        "newest": str(newest.path) if newest else None}}


def format_info(info: Info) -> str:
    newest = newest_verified(list(info.backups))
    unverified = sum(not b.verified for b in info.backups)
    lines = [f"instance:       {info.instance.name}",
             f"path:           {info.instance.path}",
             f"size:           {human_size(info.size)} ({info.size} bytes)",
             f"sqlite:         {sqlite3.sqlite_version}",
             f"pages:          {info.page_count} x {info.page_size} bytes, "
             f"{info.freelist_count} free",
             f"journal mode:   {info.journal_mode}",
             f"schema version: {'unknown' if info.schema_version is None else info.schema_version}",
             f"backups:        {len(info.backups)}"
             + (f" ({unverified} unverified)" if unverified else "")
             + (f", newest verified {newest.created_at} ({newest.path.name})" if newest else ""),
             "tables:"]
    width = max((len(t.name) for t in info.tables), default=0)
    lines += [f"  {t.name:<{width}}  {t.rows:>9} rows  {', '.join(t.columns)}" for t in info.tables]
    for label, names in (("indexes", info.indexes), ("views", info.views),
                         ("triggers", info.triggers)):
        lines.append(f"{label + ':':<15} {', '.join(names) if names else '-'}")
    return "\n".join(lines)


# --- Commands ----------------------------------------------------------------

def cmd_backup(args: argparse.Namespace) -> int:
    config = find_config(args.config)
    instances = load_instances(config)
    if args.all == bool(args.name):
        raise CommandError("backup needs NAME or --all (not both)", EXIT_USAGE)
    chosen = instances if args.all else select_instances(instances, args.name, config)
    results, failed = [], 0
    for name, pattern in empty_fleets(config):
        if args.all or args.name == name:       # nothing to back up is never silent
            print(f"{program()}: error: {name}: a fleet with no members: no file matches {pattern}; "
                  f"nothing backed up for it", file=sys.stderr)
            failed += 1
    for instance in chosen:
        try:
            progress = Progress(instance.name, shows_progress(args))
            try:
                backup, removed = locked_backup(instance, progress, args.reason)
            finally:
                progress.close()
        except CommandError as exc:
            if len(chosen) == 1:
                raise
            print(f"{program()}: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        results.append(backup_as_json(instance, backup))
        if not backup.verified:
            failed += 1
            print(f"{program()}: error: {instance.name}: the copy failed its integrity check; it is "
                  f"kept for forensics as {backup.path}, marked unverified; see "
                  f"'check {instance.name}'", file=sys.stderr)
        if not args.json:
            emit(args, format_backup(instance, backup, removed), {})
    if args.json:
        single = len(chosen) == 1 and not args.all
        emit(args, "", results[0] if single else {"backups": results})
    return EXIT_FAILED if failed else EXIT_OK


def locked_backup(instance: Instance, progress: Progress | None = None,
                  reason: str = "manual") -> tuple[Backup, list[Backup]]:
    """The backup command for one instance: lock, back up, retention, audit line."""
    with audited(instance, "backup") as entry, instance_lock(instance, "backup"):
        require_database(instance)
        backup, removed = backup_with_retention(instance, reason, progress)
        entry.update(backup=str(backup.path), version_before=backup.schema_version,
                     version_after=backup.schema_version, removed=[str(b.path) for b in removed])
        if not backup.verified:
            entry["outcome"] = "failed: backup copy failed its integrity check"
    return backup, removed


def cmd_list_backups(args: argparse.Namespace) -> int:
    instance = get_instance(args)
    backups = list_backups(instance)
    now = datetime.datetime.now(datetime.timezone.utc)
    emit(args, format_listing(instance, backups, now),
         {"name": instance.name, "backups": [listing_as_json(b, now) for b in backups]})
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    instance = get_instance(args)
    backup = find_backup(instance, args.file)
    problems = verify_backup(backup)
    text = (f"{instance.name}: {backup.path} is sound (SHA-256 and integrity check ok)"
            if not problems else "\n".join(f"{instance.name}: {backup.path}: {p}" for p in problems))
    emit(args, text, {"name": instance.name, "path": str(backup.path),
                      "verified": not problems, "problems": problems})
    return EXIT_OK if not problems else EXIT_FAILED


def cmd_restore(args: argparse.Namespace) -> int:
    instance = get_instance(args)
    with audited(instance, "restore") as entry:
        current = live_version(instance)
        entry.update(version_before=current, version_after=current)
        backup = find_backup(instance, args.file)
        entry["restored_from"] = str(backup.path)
        confirm(args, instance, f"Replace the contents of {instance.name} ({instance.path}) "
                                f"with {backup.path.name}?")
        with instance_lock(instance, "restore"):
            problems = verify_backup(backup)    # under the lock: no prune can remove it now
            if problems:
                lister = f"{tool_command('safe_db_update.py')} verify {instance.name} {backup.path.name}"
                raise CommandError(f"{instance.name}: {backup.path} failed verification "
                                   f"({first_problem(problems, lister)}); nothing restored; choose another with "
                                   f"'list-backups {instance.name}'")
            safety, after, moved = restore_backup(instance, backup)
            entry.update(backup=safety and str(safety.path),
                         version_before=safety.schema_version if safety else current)
            if moved:
                entry["set_aside"] = [str(p) for p in moved]
        entry["version_after"] = backup.schema_version
        kept = f"the replaced contents are in {safety.path}" if safety else "there was no file to keep"
        if moved:
            kept += (f"; moved the {' and '.join(sidecar_kind(p) for p in moved)} left beside "
                     f"{instance.path.name} to {', '.join(str(p) for p in moved)}"
                     + (" (the -wal may hold committed rows: inspect it before deleting it)"
                        if any(sidecar_kind(p) == "-wal" for p in moved) else ""))
        if after:
            lister = f"{tool_command('safe_db_update.py')} check {instance.name}"
            raise CommandError(f"{instance.name}: integrity check after restore failed: "
                               f"{first_problem(after, lister)}; "
                               f"{kept}")
    version = "unknown" if backup.schema_version is None else backup.schema_version
    emit(args, f"{instance.name}: restored {backup.path.name} (schema version {version}); {kept}",
         {"name": instance.name, "path": str(instance.path), "restored_from": str(backup.path),
          "schema_version": backup.schema_version,
          "pre_restore_backup": safety and str(safety.path),
          "set_aside": [str(p) for p in moved],
          "seconds": round(entry["seconds"], 3)})
    return EXIT_OK


def live_version(instance: Instance) -> int | None:
    """The live database's schema version; None when there is none or it cannot be read."""
    try:
        with closing(open_readonly(instance)) as conn:
            return schema_version(conn)
    except (CommandError, sqlite3.Error, OSError):
        return None


def cmd_check(args: argparse.Namespace) -> int:
    instance = get_instance(args)
    problems = check_database(instance, args.quick)
    kind = "quick_check" if args.quick else "integrity_check"
    text = (f"{instance.name}: ok ({kind} and foreign_key_check)" if not problems
            else "\n".join(f"{instance.name}: {p}" for p in problems))
    emit(args, text, {"name": instance.name, "path": str(instance.path), "ok": not problems,
                      "problems": problems})
    return EXIT_OK if not problems else EXIT_FAILED


def cmd_info(args: argparse.Namespace) -> int:
    info = database_info(get_instance(args))
    emit(args, format_info(info), info_as_json(info))
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    instance = get_instance(args)
    if args.keep is not None and args.keep < 1:
        raise CommandError(f"--keep {args.keep}: keep at least 1 backup", EXIT_USAGE)
    if not args.dry_run:            # a dry run only reads, as migrate's does
        refuse_same_file(instance)
    policy = retention_policy(instance, args.keep)
    if policy.last == 0:
        emit(args, f"{instance.name}: keep_backups = 0 keeps every backup; nothing to prune "
                   f"(give --keep N to prune anyway)",
             {"name": instance.name, "keep": 0, "dry_run": args.dry_run, "removed": [],
              "policy": policy_as_json(policy), "backups": []})
        return EXIT_OK
    verdicts = plan_retention(instance, policy)
    doomed = [v.backup for v in verdicts if not v.keep]
    if doomed and not args.dry_run:
        confirm(args, instance, f"Remove {len(doomed)} old backup(s) of {instance.name} "
                                f"(retention: {describe_policy(policy)})?")
        with audited(instance, "prune") as entry, instance_lock(instance, "prune"):
            verdicts = plan_retention(instance, policy)
            doomed = [v.backup for v in verdicts if not v.keep]
            entry["removed"] = [str(b.path) for b in doomed]
            remove_backups(doomed)
    emit(args, format_prune(instance, policy, verdicts, args.dry_run),
         {"name": instance.name, "keep": policy.last, "dry_run": args.dry_run,
          "removed": [str(b.path) for b in doomed], "policy": policy_as_json(policy),
          "backups": [verdict_as_json(v) for v in verdicts]})
    return EXIT_OK


# --- Parser and main ---------------------------------------------------------

def common_options(on_subcommand: bool) -> argparse.ArgumentParser:
    """Global options, accepted before and after the command."""
    extra = {"default": argparse.SUPPRESS} if on_subcommand else {}
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--config", type=Path, metavar="PATH",
                         help=f"the instance registry; without it: the file named by "
                              f"${CONFIG_ENV}, else ./{CONFIG_FILE} (the current folder), "
                              f"else {CONFIG_FILE} beside the scripts", **extra)
    options.add_argument("--json", action="store_true",
                         help="one JSON document on stdout, also when the command fails "
                              "(keys: see the manual)", **extra)
    options.add_argument("-q", "--quiet", action="store_true",
                         help="errors only, on stderr (for cron)", **extra)
    options.add_argument("-y", "--yes", action="store_true",
                         help="answer yes to confirmations (needed without a terminal)", **extra)
    return options


def add_command(commands, name: str, handler, help_text: str,
                examples: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A subcommand with the global options, --version, and examples in its --help."""
    epilog = "examples:\n" + "".join(f"  %(prog)s {example}".rstrip() + "\n"
                                      for example in examples) if examples else ""
    parser = commands.add_parser(name, parents=[common_options(True)], help=help_text,
                                 description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=epilog + f"\nThe manual, {MANUAL}, describes every command.")
    root = parser.prog.rsplit(" ", 1)[0]
    parser.add_argument("--version", action="version", version=f"{root} {VERSION}")
    parser.set_defaults(handler=handler)
    return parser


def root_parser(prog: str, doc: str):
    """The CLI's parser with the global options, and its subcommands to fill in."""
    parser = Parser(prog=prog, description=doc.split("\n\n")[0], parents=[common_options(False)],
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog=f"'%(prog)s COMMAND --help' shows a command's options and examples.\n"
                           f"The manual, {MANUAL} (in the project's repository), describes\n"
                           f"every command, instances.ini, cron and the emergency procedures.")
    parser.add_argument("--version", action="version", version=f"{prog} {VERSION}")
    return parser, parser.add_subparsers(dest="command", required=True, metavar="COMMAND")


NAME_HELP = "an instance in instances.ini (or a fleet: every member)"
ONE_NAME_HELP = "an instance in instances.ini, or a fleet member such as tenants/acme"


def add_backup_command(commands) -> None:
    backup = add_command(commands, "backup", cmd_backup, "verified backup of one instance, "
                                                         "a fleet, or all",
                         ("prod", "--all --reason nightly --quiet   # nightly, from cron",
                          "prod --json"))
    backup.add_argument("name", metavar="NAME", nargs="?", help=NAME_HELP)
    backup.add_argument("--all", action="store_true", help="every instance, in file order")
    backup.add_argument("--reason", choices=OPERATOR_REASONS, default="manual",
                        help="why, in the file name and manifest (default: manual; cron: "
                             "nightly)")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser, commands = root_parser(prog, __doc__)
    add_backup_command(commands)
    add_command(commands, "list-backups", cmd_list_backups, "an instance's backups, newest first",
                ("prod", "prod --json")).add_argument("name", metavar="NAME", help=ONE_NAME_HELP)
    verify = add_command(commands, "verify", cmd_verify, "check a backup's SHA-256 and integrity",
                         ("prod", "prod prod-20261123T020000123456Z-manual.db"))
    verify.add_argument("name", metavar="NAME", help=ONE_NAME_HELP)
    verify.add_argument("file", metavar="FILE", nargs="?",
                        help="a backup's path or file name (default: the newest verified backup)")
    restore = add_command(commands, "restore", cmd_restore,
                          "put a verified backup's contents back into the live database",
                          ("prod                # the newest verified backup; asks first",
                           "prod prod-20261123T020000123456Z-pre-migrate.db",
                           "dev FILE --yes      # no terminal: --yes confirms"))
    restore.add_argument("name", metavar="NAME", help=ONE_NAME_HELP)
    restore.add_argument("file", metavar="FILE", nargs="?",
                         help="a backup's path or file name (default: the newest verified backup)")
    check = add_command(commands, "check", cmd_check, "integrity and foreign-key check",
                        ("prod", "prod --quick", "prod --json"))
    check.add_argument("name", metavar="NAME", help=ONE_NAME_HELP)
    check.add_argument("--quick", action="store_true", help="quick_check instead of integrity_check")
    add_command(commands, "info", cmd_info, "what is in a database",
                ("dev", "dev --json")).add_argument("name", metavar="NAME", help=ONE_NAME_HELP)
    prune = add_command(commands, "prune", cmd_prune, "remove the backups that the retention "
                                                      "policy does not keep",
                        ("prod --dry-run     # which rule keeps each backup", "prod --keep 10"))
    prune.add_argument("name", metavar="NAME", help=ONE_NAME_HELP)
    prune.add_argument("--keep", type=int, metavar="N", help="default: keep_backups from the ini")
    prune.add_argument("--dry-run", action="store_true",
                       help="show which rule keeps each backup and what would be removed")
    return parser


def run(parser: argparse.ArgumentParser, prog: str, argv: list[str] | None) -> int:
    """Parse, dispatch, and turn a CommandError or OS error into one line and an exit code
    (with --json, also one JSON document on stdout: emit_failure)."""
    words = sys.argv[1:] if argv is None else list(argv)
    INVOCATION[:] = [prog, *words]
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {exc}", file=sys.stderr)
        return emit_failure(argparse.Namespace(json="--json" in words), str(exc), EXIT_USAGE)
    for option in ("config", "json", "quiet", "yes"):
        if not hasattr(args, option):
            setattr(args, option, None if option == "config" else False)
    try:
        with interrupts_delivered():
            return args.handler(args)
    except CommandError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return emit_failure(args, str(exc), exc.exit_code, getattr(exc, "known", None))
    except BrokenPipeError:             # stderr's reader has gone (stdout's is handled in emit)
        silence(sys.stderr)
        return emit_failure(args, "broken pipe", EXIT_FAILED)
    except OSError as exc:
        print(f"{prog}: error: {describe_error(exc)}", file=sys.stderr)
        return emit_failure(args, describe_error(exc), EXIT_FAILED, getattr(exc, "known", None))
    except InterruptedAfterCommit as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return emit_failure(args, str(exc), EXIT_OK, getattr(exc, "known", None))
    except KeyboardInterrupt as exc:
        print(f"{prog}: interrupted", file=sys.stderr)
        return emit_failure(args, "interrupted", 130, getattr(exc, "known", None))
    except Exception as exc:            # a bug: its traceback, exit 1, and the JSON document
        if not getattr(args, "json", False):
            raise
        traceback.print_exc()
        return emit_failure(args, f"unexpected error: {type(exc).__name__}: {exc}", EXIT_FAILED)


@contextmanager
def interrupts_delivered() -> Iterator[None]:
    """While the command runs, Ctrl-C raises KeyboardInterrupt, so every operation unwinds
    (rolls back, removes its partial files, writes its audit line) before run() prints one
    line. A Ctrl-C held back at start-up (see the top of the module) is raised here,
    before anything is touched; once the command is over, Ctrl-C is held back again and
    the command's own exit code stands."""
    held = hasattr(signal, "pthread_sigmask") and \
        signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        if held:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})   # a held one raises here
        yield
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def main(argv: list[str] | None = None) -> int:
    prog = started_as(PROG, argv)
    return run(build_parser(prog), prog, argv)


if __name__ == "__main__":
    sys.exit(main())
