"""One `dmu run` per run directory: its lock file."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable, Self

from attribution.store import StoreError, as_path, is_local, make_dirs, write_text

log = logging.getLogger("dmu")

# Called (no arguments) before the process exits from a ray.init that hangs (engine.executor.connect_ray), where no
# finally block can run: a held `RunLock` registers its release here.
EXIT_HOOKS: list[Callable[[], None]] = []
LOCK_NAME = ".dmu.lock"


class RunLock:
    """One `dmu run` per run directory: `<run_dir>/.dmu.lock`, JSON naming the holder (host, pid, start time),
    held for the whole run and removed on release (a context manager: also on Ctrl-C and errors).

    A second run on the directory while the holder lives refuses with StoreError naming it. A lock whose process
    is gone on this host (os.kill(pid, 0) raises ProcessLookupError) is taken over with a warning; a lock from
    another host cannot be checked from here, so it refuses, telling how to remove it. Locally the lock file is
    created atomically (O_CREAT | O_EXCL); on an object store it is checked, then written (best effort: S3 has no
    create-if-absent here, so two runs started in the same instant can both take it)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = as_path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.held = False

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        make_dirs(self.run_dir)
        text = json.dumps(self.holder)
        for _ in range(2):  # a second try after taking over a stale lock
            if self._create(text):
                self.held = True
                EXIT_HOOKS.append(self.release)
                return
            old = self._read()
            if old is None:  # removed (or half-written) between our create and read: try once more
                continue
            if old.get("host") != self.holder["host"] or not isinstance(old.get("pid"), int):
                raise StoreError(f"{self.run_dir} is in use by `dmu run` on host {old.get('host')} (pid "
                                 f"{old.get('pid')}, started {old.get('started')}): wait for it to finish, or "
                                 f"delete {self.path} if that run is gone")
            if _alive(old["pid"]):
                raise StoreError(f"{self.run_dir} is in use by `dmu run` pid {old['pid']} on {old['host']} "
                                 f"(started {old.get('started')}): wait for it to finish or stop it (one run per "
                                 f"run directory); delete {self.path} only if that pid is not a dmu run")
            log.warning("dmu: taking over the lock of %s from pid %s on %s (started %s), which is gone",
                        self.run_dir, old["pid"], old["host"], old.get("started"))
            # only if it is still the stale one: another run may have just taken it over (two runs taking over
            # the same stale lock in the same instant can still both succeed: the window is this read to the unlink)
            if self._read() == old:
                self._remove()
        raise StoreError(f"cannot take the lock {self.path} (unreadable, or changing): if no `dmu run` is using "
                         f"{self.run_dir}, delete it and rerun")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.release in EXIT_HOOKS:
            EXIT_HOOKS.remove(self.release)
        old = self._read()
        if old is not None and old.get("pid") == self.holder["pid"] and old.get("host") == self.holder["host"]:
            self._remove()

    def _create(self, text: str) -> bool:
        if is_local(self.path):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        # object store: no O_EXCL here, so check then write (one PUT) - best effort, see the class docstring
        if self.path.exists():
            return False
        write_text(self.path, text)
        return True

    def _read(self) -> dict | None:
        try:
            old = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return old if isinstance(old, dict) else None

    def _remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
