"""Executors: run work units and hand their results back to the driver as they finish.

`RayExecutor` is the real one: a local Ray instance, or a cluster named by --address / RAY_ADDRESS. `SerialExecutor`
runs units in-process, for unit tests and debugging. Both call `fn(unit, **shared)` with the same torch thread count,
so a unit returns the same numbers on either. Units return arrays; only the driver writes stores.

Joining a cluster fails within about a minute with one ClusterError line (`connect_ray`): ray.init blocks in C++
retrying the GCS forever when nothing (or something that is not Ray) answers at the address, and ignores SIGTERM
meanwhile.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from pipelines.config import ExecutorConfig
from pipelines.rundir.lock import EXIT_HOOKS


class UnitError(RuntimeError):
    """A work unit failed after its retries; finished units are kept, a rerun resumes."""


class ClusterError(ConnectionError):
    """The Ray cluster named by --address / RAY_ADDRESS cannot be joined; the message names it and what to check."""


# How long joining a cluster may take: the TCP probe of the head's address; the probe and ray.init together
# (under a minute from the start of `dmu run`, with its imports and data loading).
PROBE_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = float(os.environ.get("DMU_CONNECT_TIMEOUT_S", "45"))  # a slow cluster may need more


def cluster_hint(address: str) -> str:
    return (f"is a Ray head running there (`ray status` on that machine), and is {address} its GCS address "
            f"(host:port, port 6379 by default; ray://host:10001 for Ray Client)? check --address and RAY_ADDRESS")


def probe_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Check that something accepts TCP connections at a cluster address (host:port, or ray://host:port) before
    ray.init, which would otherwise retry for ever; ClusterError if not. "auto" / "local" / a bare name without a
    port are left to Ray."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = type(exc).__name__ if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise ClusterError(f"cannot reach a Ray cluster at {address} ({reason}): {cluster_hint(address)}") from None


def connect_ray(ray: Any, address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """ray.init(address=...) bounded in time: probe the address, then join; if that has not returned after
    `timeout` seconds (something that is not a Ray head answers there), print one line, run EXIT_HOOKS and exit
    the process with status 2 (ray.init cannot be interrupted from Python while it waits)."""

    def give_up() -> None:
        print(f"dmu: error: no Ray cluster answered at {address} within {timeout:.0f} s: {cluster_hint(address)}",
              file=sys.stderr, flush=True)
        for hook in EXIT_HOOKS.copy():  # a hook may remove itself from the list
            try:
                hook()
            except Exception:  # noqa: BLE001, S110 (exiting anyway: a failed cleanup must not stop the exit)
                pass
        sys.stdout.flush()  # os._exit skips the interpreter's flushing
        os._exit(2)

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        probe_address(address)
        ray.init(address=address, log_to_driver=True)
    finally:
        watchdog.cancel()


class Executor(ABC):
    def __init__(self, cpus_per_unit: int = 1):
        self.cpus_per_unit = cpus_per_unit
        # one record per finished unit: unit, node, pid, seconds, peak_rss_bytes (what the unit's process held at
        # most while it ran; None where it cannot be measured apart from the driver, i.e. in-process)
        self.unit_stats: list[dict] = []

    @abstractmethod
    def map_unordered(self, fn: Callable, units: Sequence, shared: dict[str, Any] | None = None,
                      ) -> Iterator[tuple[Any, Any]]:
        """Yield (unit, fn(unit, **shared)) for every unit, in order of completion."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def reset_peak_rss() -> bool:
    """Start a new peak-memory measurement for this process (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    """This process's peak resident memory in bytes since start or the last reset_peak_rss (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _run_unit(fn: Callable, unit: Any, threads: int, node: str | None, **shared: Any) -> tuple[Any, dict]:
    """Run one unit; returns its result and where and how it ran. `node` None: a Ray worker, which measures its
    own peak memory (workers are reused, so the peak is reset first) and asks Ray for its node."""
    torch.set_num_threads(threads)  # workers are reused: set it inside every task (docs/methods.md §7)
    measured = node is None and reset_peak_rss()
    start = time.perf_counter()
    result = fn(unit, **shared)
    seconds = time.perf_counter() - start
    if node is None:
        import ray

        node = ray.get_runtime_context().get_node_id()
    return result, {"fn": getattr(fn, "__name__", repr(fn)), "node": node, "pid": os.getpid(), "seconds": seconds,
                    "peak_rss_bytes": peak_rss() if measured else None}


class SerialExecutor(Executor):
    """In-process, one unit after another (unit tests, debugging)."""

    def map_unordered(self, fn, units, shared=None):
        previous = torch.get_num_threads()
        try:
            for unit in units:
                result, stats = _run_unit(fn, unit, self.cpus_per_unit, "local", **(shared or {}))
                self.unit_stats.append({"unit": unit, **stats})
                yield unit, result
        finally:
            torch.set_num_threads(previous)


class RayExecutor(Executor):
    """Ray tasks, one per unit: a local instance with `num_cpus`, or the cluster at `address` / RAY_ADDRESS."""

    def __init__(self, cfg: ExecutorConfig, address: str | None = None):
        super().__init__(cfg.cpus_per_unit)
        import ray

        self.ray = ray
        self.max_retries = cfg.max_retries
        address = address or os.environ.get("RAY_ADDRESS")
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            main_thread = threading.current_thread() is threading.main_thread()
            sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
            if address:
                connect_ray(ray, address)
            else:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local only: silence the 2.60 token warning
                # address "local": a new instance of our own; with None, Ray 2.60 joins any Ray already running on
                # this machine (another run's), and then refuses num_cpus
                ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True,
                         configure_logging=False)
            # ray.init replaces the SIGTERM handler with one that exits at once; keep the caller's (`dmu run`
            # turns SIGTERM into Ctrl-C, whose unwinding cancels pending units and shuts Ray down in close())
            if callable(sigterm):
                signal.signal(signal.SIGTERM, sigterm)
        resources = ray.cluster_resources()
        if cfg.gpus_per_unit is None:
            self.gpus_per_unit = 1.0 if resources.get("GPU", 0) > 0 else 0.0
        else:
            self.gpus_per_unit = cfg.gpus_per_unit
        self.parallelism = max(1, int(resources.get("CPU", 1) // self.cpus_per_unit))

    def map_unordered(self, fn, units, shared=None):
        ray = self.ray
        refs = {k: ray.put(v) for k, v in (shared or {}).items()}  # large inputs go to the object store once
        remote = ray.remote(_run_unit).options(num_cpus=self.cpus_per_unit, num_gpus=self.gpus_per_unit,
                                               max_retries=self.max_retries)
        todo = list(units)
        pending: dict[Any, Any] = {}
        window = 2 * self.parallelism  # bounded in flight: results are consumed (and written) as they come
        try:
            while todo or pending:
                while todo and len(pending) < window:
                    unit = todo.pop(0)
                    pending[remote.remote(fn, unit, self.cpus_per_unit, None, **refs)] = unit
                ready, _ = ray.wait(list(pending), num_returns=1)
                unit = pending.pop(ready[0])
                try:
                    result, stats = ray.get(ready[0])
                except ray.exceptions.RayError as exc:
                    raise UnitError(f"work unit {unit!r} failed after {self.max_retries} retries: {exc}") from exc
                self.unit_stats.append({"unit": unit, **stats})
                yield unit, result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self.owns_ray and self.ray.is_initialized():
            self.ray.shutdown()


def make_executor(cfg: ExecutorConfig, address: str | None = None) -> Executor:
    if cfg.kind == "serial":
        return SerialExecutor(cfg.cpus_per_unit)
    return RayExecutor(cfg, address)
