"""How long `migrate` on a big database keeps a terminal silent: run it on a pseudo-terminal
(stdout and stderr both, as at an operator's shell) and time every piece of output.

    python bench/silence.py --size-mib 256 [--checkout PATH] [--workdir DIR] [--dry-run]

--checkout: the folder holding the database_migration.py to measure (default: this one),
so that an older checkout can be measured on the same data. The big database is built
once (bench/fixtures.py, version 3 with the ten benchmark migrations pending) and copied
afresh for each run.
"""
from __future__ import annotations

import argparse
import os
import pty
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402


def run_on_terminal(argv: list[str]) -> tuple[float, list[tuple[float, str]]]:
    """(seconds to exit, [(seconds since start, text)]) of a command whose output is a pty."""
    leader, follower = pty.openpty()
    started = time.monotonic()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    pieces = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:                     # EIO: the command has exited and closed the pty
            break
        if not data:
            break
        pieces.append((time.monotonic() - started, data.decode("utf-8", "replace")))
    process.wait()
    os.close(leader)
    return time.monotonic() - started, pieces


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=float, default=256)
    parser.add_argument("--checkout", type=Path, default=fixtures.ROOT)
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench-silence"))
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    workdir = args.workdir
    migrations = fixtures.write_migrations(workdir / "migrations")
    big = fixtures.build_big(workdir, migrations, workdir / f"big{args.size_mib:g}.db", args.size_mib)
    live = workdir / "live.db"
    shutil.copyfile(big, live)
    shutil.rmtree(workdir / "backups", ignore_errors=True)
    ini = fixtures.write_ini(workdir / "silence.ini", {"big": str(live)}, migrations)
    argv = [sys.executable, str(args.checkout / "database_migration.py"), "--config", str(ini),
            "migrate", "big"] + (["--dry-run"] if args.dry_run else [])
    total, pieces = run_on_terminal(argv)
    moments = [0.0] + [at for at, _ in pieces] + [total]
    gaps = [later - earlier for earlier, later in zip(moments, moments[1:])]
    print(f"{args.checkout}: migrate{' --dry-run' if args.dry_run else ''} of "
          f"{os.path.getsize(big) / 2**20:.0f} MiB: {total:.1f} s in all; first output after "
          f"{pieces[0][0] if pieces else total:.1f} s; longest silence {max(gaps):.1f} s")
    for at, text in pieces:
        for part in text.replace("\r\n", "\n").split("\n"):
            if part.strip():
                print(f"  {at:6.1f} s  {part.split(chr(13))[-1][:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
