"""Remote measurement for MetaSchedule tuning: candidates timed on a device behind TVM's RPC tracker.

``fxpress run ... --target llvm --rpc HOST:PORT --rpc-key NAME --tune-trials N`` (or
``compile(..., rpc="HOST:PORT", rpc_key="NAME", tune_trials=N)``): candidates are still built in
this process (:class:`~fxpress.backends.tvm.tuning.InProcessBuilder`), exported as a shared library
(cross-linked with ``aarch64-linux-gnu-g++`` for aarch64 when it is installed, else a tar of objects
that the server links), and MetaSchedule's ``RPCRunner`` uploads each one to a server that the
tracker hands out for the key and times it there (same :data:`~fxpress.backends.tvm.tuning.EVALUATOR`).
The records land in the same database layout as a local tuning, so a later local compile with the
same ``tuning_dir`` reads them and runs zero trials.

The tracker needs ``tornado`` (``pip install tornado``); servers register with
``python -m tvm.exec.rpc_server --tracker HOST:PORT --key NAME``.  Before any work the tracker is
checked (:func:`check_tracker`): nothing listening, not a tracker, or no free server for the key
within :data:`RPC_TIMEOUT_S` is a :class:`LoweringError` naming the option and the fix, not a hang.
"""
from __future__ import annotations

import logging
import os
import platform
import shutil
import socket
import struct
import tempfile
import time
from dataclasses import dataclass

from fxpress.errors import LoweringError

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 30.0  # to reach the tracker and get a free server; also the limit of one remote measurement
AARCH64_CXX = "aarch64-linux-gnu-g++"


@dataclass(frozen=True)
class RemoteDevice:
    """A tracker address and the key its servers registered under."""

    host: str
    port: int
    key: str
    timeout_s: float = RPC_TIMEOUT_S

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_remote(rpc: str | None, rpc_key: str | None, timeout_s: float | None = None) -> RemoteDevice | None:
    """The RemoteDevice of the ``rpc`` / ``rpc_key`` compile options (None when neither is given);
    timeout_s: :data:`RPC_TIMEOUT_S` when None."""
    if rpc is None and rpc_key is None:
        return None
    if not rpc:
        raise LoweringError(f"rpc_key={rpc_key!r} names the device of a tracker: pass rpc='HOST:PORT' "
                            "(--rpc HOST:PORT) too")
    if not rpc_key:
        raise LoweringError(f"rpc={rpc!r} needs the key its servers registered under: pass rpc_key='NAME' "
                            "(--rpc-key NAME), as given to 'python -m tvm.exec.rpc_server --key NAME'")
    host, sep, port = str(rpc).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LoweringError(f"rpc={rpc!r}: expected the tracker as HOST:PORT, e.g. 127.0.0.1:9190")
    return RemoteDevice(host.strip("[]"), int(port), str(rpc_key), RPC_TIMEOUT_S if timeout_s is None else timeout_s)


def _tracker_call(remote: RemoteDevice, request: list):
    """One request to the tracker on a socket with a timeout (TVM's own client retries for 60 s)."""
    from tvm.rpc import base

    fix = (f"start one with 'python -m tvm.exec.rpc_tracker --host {remote.host} --port {remote.port}' "
           f"or pass the right --rpc HOST:PORT")
    try:
        sock = socket.create_connection((remote.host, remote.port), timeout=remote.timeout_s)
    except OSError as err:
        raise LoweringError(f"rpc={remote.address}: cannot reach an RPC tracker there ({err}); {fix}") from err
    try:
        with sock:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(sock, 4))[0]
            if magic != base.RPC_TRACKER_MAGIC:
                raise LoweringError(f"rpc={remote.address}: what listens there is not a TVM RPC tracker; {fix}")
            base.sendjson(sock, request)
            return base.recvjson(sock)
    except (OSError, struct.error, ValueError) as err:  # timeout, reset, a closed or garbled reply
        raise LoweringError(f"rpc={remote.address}: no answer from an RPC tracker there "
                            f"({type(err).__name__}: {err}); {fix}") from err


def tracker_summary(remote: RemoteDevice) -> dict:
    from tvm.rpc import base

    return _tracker_call(remote, [base.TrackerCode.SUMMARY])[1]


def check_tracker(remote: RemoteDevice, poll_s: float = 0.5) -> int:
    """The number of servers registered for the key; a LoweringError (after at most the timeout)
    when the tracker cannot be reached or none of its servers with the key is free."""
    deadline = time.monotonic() + remote.timeout_s
    while True:
        summary = tracker_summary(remote)
        queue = summary.get("queue_info", {}).get(remote.key, {})
        servers = sum(1 for info in summary.get("server_info", [])
                      if info.get("key", "").partition(":")[2] == remote.key)
        if queue.get("free", 0) > 0:
            return servers
        if time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    keys = sorted({info.get("key", "").partition(":")[2] for info in summary.get("server_info", [])})
    if not servers:
        raise LoweringError(
            f"rpc_key={remote.key!r}: the tracker at {remote.address} has no server with that key "
            f"(keys there: {', '.join(keys) or 'none'}); start one with 'python -m tvm.exec.rpc_server "
            f"--tracker {remote.address} --key {remote.key}' or pass the right --rpc-key")
    raise LoweringError(f"rpc_key={remote.key!r}: the tracker at {remote.address} has {servers} server(s) with "
                        f"that key but none was free within {remote.timeout_s:.0f} s; wait for the other "
                        f"sessions or start another server with that key")


def make_runner(remote: RemoteDevice, evaluator):
    """MetaSchedule's RPCRunner for `remote` (one connection at a time), each measurement killed after
    the session timeout plus a minute (a server that dies mid-tuning fails candidates, not a hang)."""
    from tvm.s_tir.meta_schedule.runner import RPCConfig, RPCRunner

    config = RPCConfig(tracker_host=remote.host, tracker_port=remote.port, tracker_key=remote.key,
                       session_timeout_sec=max(1, round(remote.timeout_s)))
    runner = RPCRunner(config, evaluator, max_workers=1)
    pool = runner.pool
    if hasattr(pool, "_timeout"):
        pool._timeout = remote.timeout_s + 60  # noqa: SLF001 - RPCRunner makes its pool without one
    return runner


def cross_compiler(target):
    """How to link a library for `target` into a .so here: None for the host (TVM's default), a cross
    compiler for aarch64 when ``aarch64-linux-gnu-g++`` is installed; "tar" when there is none
    (the server links the objects)."""
    from tvm.support import cc

    triple = str(target.attrs.get("mtriple", ""))
    if not triple.startswith("aarch64") or platform.machine() in ("aarch64", "arm64"):
        return None
    if shutil.which(AARCH64_CXX):
        return cc.cross_compiler(AARCH64_CXX)
    return "tar"


def export_for_upload(library, target, root: str | None = None) -> str:
    """Export a built candidate for a remote server: a .so (a .tar of objects for a cross target
    without a cross linker) in a new folder under `root` (the system's temporary folder when None);
    its path."""
    folder = tempfile.mkdtemp(prefix="fxpress-rpc-", dir=root)
    fcompile = cross_compiler(target)
    if fcompile == "tar":
        from tvm.support.tar import tar

        path = os.path.join(folder, "candidate.tar")
        library.export_library(path, fcompile=tar)
    else:
        path = os.path.join(folder, "candidate.so")
        library.export_library(path, fcompile=fcompile) if fcompile else library.export_library(path)
    return path


def measure_remote(runner, library, args_info, target, root: str | None = None) -> list[float]:
    """Seconds per run of a built library on the remote device (through `runner`); LoweringError
    when the measurement fails (the default schedule must run there)."""
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    path = export_for_upload(library, target, root)
    try:
        (future,) = runner.run([RunnerInput(path, "cpu", args_info)])
        result = future.result()
    finally:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    if result.error_msg:
        raise LoweringError(f"measuring the default schedule on the RPC server failed: "
                            f"{str(result.error_msg).strip().splitlines()[-1][:300]}")
    return [float(seconds) for seconds in result.run_secs]
