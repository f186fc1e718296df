"""MetaSchedule tuning measured through TVM's RPC tracker (llvm on loopback).

A tracker and one server (TVM's own, each in a subprocess) bound to 127.0.0.1 for the module;
one RPC tuning run of a small block (~40 s here), then a later local compile of the same
tuning_dir must run zero trials and give the same outputs.  An aarch64 server under qemu would
need an aarch64 Python with TVM: not tested here (aarch64 + rpc only up to the tracker check).
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch

from fxpress import backends
from fxpress.errors import LoweringError
from fxpress.ir import capture
from model_factories import TuningBlock as Block

pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado")

TRIALS = 4
KEY = "fxpress-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tracker():
    """(address, tracker) with one server registered under KEY; both torn down afterwards."""
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    from fxpress.backends.tvm.rpc import RemoteDevice, check_tracker

    start = free_port()
    tracker = Tracker(host="127.0.0.1", port=start, port_end=start + 50, silent=True)
    server = None
    try:
        port = free_port()
        server = Server(host="127.0.0.1", port=port, port_end=port + 50,
                        tracker_addr=("127.0.0.1", tracker.port), key=KEY, silent=True)
        check_tracker(RemoteDevice("127.0.0.1", tracker.port, KEY, timeout_s=60))  # registered and free
        yield f"127.0.0.1:{tracker.port}", tracker
    finally:
        if server is not None:
            server.terminate()
        tracker.terminate()


@pytest.fixture(scope="module")
def rpc_tuned(tracker, tmp_path_factory):
    from fxpress.backends.tvm import rpc

    address, _ = tracker
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(32, 64)
    graph = capture(model, (x,), name="block")
    folder = tmp_path_factory.mktemp("rpc-tuning")
    calls = {"runners": 0, "remote_defaults": 0}
    make_runner, measure_remote = rpc.make_runner, rpc.measure_remote

    def counting_make_runner(*args, **kwargs):
        calls["runners"] += 1
        return make_runner(*args, **kwargs)

    def counting_measure_remote(*args, **kwargs):
        calls["remote_defaults"] += 1
        return measure_remote(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rpc, "make_runner", counting_make_runner)
        patch.setattr(rpc, "measure_remote", counting_measure_remote)
        tuned = backends.compile(graph, "llvm", tune_trials=TRIALS, tuning_dir=folder, rpc=address, rpc_key=KEY)
    return model, x, graph, folder, tuned, calls


def test_rpc_tuned_build_matches_a_local_build(rpc_tuned, tracker):
    model, x, graph, folder, tuned, calls = rpc_tuned
    report = tuned.info["tuning"]
    assert report["rpc"] == f"{KEY}@{tracker[0]}"
    assert report["tuned"] >= 1 and report["trials"] == TRIALS
    # every default schedule was timed on the server, and the candidates by MetaSchedule's RPCRunner
    assert calls["runners"] == 1 and calls["remote_defaults"] >= 3
    records_dir = Path(report["dir"])
    assert records_dir.parent == folder
    records = (records_dir / "database_tuning_record.json").read_text().splitlines()
    # defaults + candidates that ran on the server (a failed run is no record, or 1e10 s)
    seconds = [max(json.loads(line)[1][1]) for line in records]
    assert len(records) >= report["tasks"] + TRIALS // 2 and max(seconds) < 1.0
    local = backends.compile(graph, "llvm")
    assert torch.allclose(tuned(x), local(x), atol=1e-5, rtol=1e-4)
    assert (tuned(x) - model(x)).abs().max().item() < 1e-5


def test_rpc_records_load_for_a_later_local_compile(rpc_tuned):
    _, x, graph, folder, tuned, _ = rpc_tuned
    records = Path(tuned.info["tuning"]["dir"]) / "database_tuning_record.json"
    before = records.read_text()
    again = backends.compile(graph, "llvm", tune_trials=TRIALS, tuning_dir=folder)  # no rpc
    assert again.info["tuning"]["dir"] == tuned.info["tuning"]["dir"]
    assert again.info["tuning"]["tuned"] == 0 and again.info["tuning"]["trials"] == 0
    assert again.info["tuning"]["rpc"] is None
    assert records.read_text() == before
    assert torch.equal(again(x), tuned(x))


def test_no_tracker_listening_is_a_clear_error_without_a_wait(rpc_tuned, tmp_path):
    graph = rpc_tuned[2]
    start = time.perf_counter()
    with pytest.raises(LoweringError, match=r"rpc=127\.0\.0\.1:\d+: cannot reach an RPC tracker.*rpc_tracker"):
        backends.compile(graph, "llvm", tune_trials=4, tuning_dir=tmp_path, rpc=f"127.0.0.1:{free_port()}",
                         rpc_key=KEY)
    assert time.perf_counter() - start < 30


def test_a_key_without_a_server_is_a_clear_error(rpc_tuned, tracker, tmp_path, monkeypatch):
    from fxpress.backends.tvm import rpc

    monkeypatch.setattr(rpc, "RPC_TIMEOUT_S", 1.0)
    with pytest.raises(LoweringError, match=f"rpc_key='other': the tracker at {tracker[0]} has no server with "
                                            f"that key \\(keys there: {KEY}\\)"):
        backends.compile(rpc_tuned[2], "llvm", tune_trials=4, tuning_dir=tmp_path, rpc=tracker[0], rpc_key="other")


def test_rpc_options_are_checked(rpc_tuned):
    graph = rpc_tuned[2]
    with pytest.raises(LoweringError, match="pass tune_trials > 0"):
        backends.compile(graph, "llvm", rpc="127.0.0.1:9190", rpc_key=KEY)
    with pytest.raises(LoweringError, match="pass rpc_key='NAME'"):
        backends.compile(graph, "llvm", tune_trials=4, rpc="127.0.0.1:9190")
    with pytest.raises(LoweringError, match="pass rpc='HOST:PORT'"):
        backends.compile(graph, "llvm", tune_trials=4, rpc_key=KEY)
    with pytest.raises(LoweringError, match="expected the tracker as HOST:PORT"):
        backends.compile(graph, "llvm", tune_trials=4, rpc="localhost", rpc_key=KEY)


def test_aarch64_accepts_rpc_and_goes_to_the_tracker(rpc_tuned, tmp_path):
    """aarch64 tuning needs a board's server; here only that the options reach the tracker check."""
    with pytest.raises(LoweringError, match="cannot reach an RPC tracker"):
        backends.compile(rpc_tuned[2], "aarch64", tune_trials=4, tuning_dir=tmp_path,
                         rpc=f"127.0.0.1:{free_port()}", rpc_key="rk3588")


@pytest.mark.parametrize("extra, message", [
    (["--rpc", "127.0.0.1:9190"], "pass --rpc-key too"),
    (["--rpc", "127.0.0.1:9190", "--rpc-key", KEY], "pass --tune-trials N"),
    (["--rpc", "127.0.0.1:9190", "--rpc-key", KEY, "--tune-trials", "4", "--target", "cuda"], "llvm or aarch64"),
])
def test_cli_checks_rpc_options_before_loading_the_model(extra, message, capsys):
    from fxpress.cli import main

    argv = ["run", "cnn-digits", "--pipeline", "fold-constants", "--target", "llvm", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_naive_default_schedules_are_found_again(tmp_path):
    """A function no fxpress rule schedules (max_pool2d) gets TVM's loops as its default record; the
    database's get_top_k skips a record with an empty trace, so without the recorded lookup a later
    compile of the same tuning_dir measured it again (and, with trials, tuned it again)."""

    class Pool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return torch.nn.functional.max_pool2d(self.conv(x).relu(), 2)

    torch.manual_seed(0)
    model, x = Pool().eval(), torch.randn(2, 3, 8, 8)
    graph = capture(model, (x,), name="pool")
    first = backends.compile(graph, "llvm", tuning_dir=tmp_path)
    records = Path(first.info["tuning"]["dir"]) / "database_tuning_record.json"
    before = records.read_text()
    assert len(before.splitlines()) == first.info["tuning"]["tasks"]
    again = backends.compile(graph, "llvm", tuning_dir=tmp_path)
    assert records.read_text() == before
    assert (again(x) - model(x)).abs().max().item() < 1e-5
