"""Passes across processes (fxpress.utils.distributed): two processes on loopback give the one-process result.

`remove-layers{metric=ppl}` scores each rank's share of the calibration batches and all-reduces the sums;
`distill{batch=2}` trains each step on two batches, one per rank, on an FSDP2-sharded copy of the student
(gradients reduce-scattered: their sum over ranks); the tail-drop autoencoder trainer splits each
minibatch's rows.  Two gloo processes (torchrun --standalone: a free port on localhost) must agree with
each other exactly and with one process up to float summation order: scores within 1e-9 relative,
distilled weights within 1e-6 (here the two-term gradient sum is the same addition either way, and the
weights come out identical), the autoencoder within 1e-5.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fxpress.cli import main
from fxpress.utils import distributed
from hf_factories import save_tiny

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
PIPELINE = "remove-layers{metric=ppl,count=1},distill{steps=3,batch=2,tail=1,lr=0.001}"
# sparsity masks kept through FSDP2 training, plain logit KD, and batch=3 over 2 processes (one pads a step)
MASKED = "prune-obs{sparsity=0.5,score=magnitude},distill{steps=2,batch=3,tail=0,lr=0.001}"


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGS` (gloo on CPU), one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_one_process_is_rank_0_of_1_and_every_helper_is_the_identity():
    assert distributed.world() == (0, 1) and distributed.is_main()
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.sum_floats([0.5, 1.5]) == [0.5, 1.5]
    tensor = torch.arange(3.0)
    assert distributed.all_reduce_sum(tensor) is tensor
    param = torch.nn.Parameter(torch.ones(2))
    distributed.sum_gradients([param])
    assert param.grad is None


def test_shards_are_strided_and_cover_the_batches_once(monkeypatch):
    items = list(range(7))
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 3))
        shares.append(distributed.shard(items))
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shares, [])) == items


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("dist") / "llama")


def _close(a: float, b: float, rel: float = 1e-9) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


@pytest.mark.slow
def test_two_processes_score_remove_and_distill_as_one(tiny_llama, tmp_path):
    from distributed_worker import run_pipeline

    run_pipeline(str(tiny_llama), PIPELINE, str(tmp_path / "one"))
    torchrun(str(WORKER), str(tiny_llama), PIPELINE, str(tmp_path / "two"))

    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    for rank in (0, 1):
        two = json.loads((tmp_path / "two" / f"rank{rank}.json").read_text())
        for metric in ("ppl", "angular"):
            assert all(_close(a, b) for a, b in zip(one["scores"][metric], two["scores"][metric])), \
                (metric, one["scores"][metric], two["scores"][metric])
        assert two["passes"][0]["stats"]["removed"] == one["passes"][0]["stats"]["removed"]
        assert two["passes"][1]["stats"]["loss_last"] == pytest.approx(one["passes"][1]["stats"]["loss_last"], rel=1e-6)

    single = load_file(tmp_path / "one" / "rank0.safetensors")
    ranks = [load_file(tmp_path / "two" / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert single.keys() == ranks[0].keys() == ranks[1].keys()
    for path, tensor in single.items():
        assert torch.equal(ranks[0][path], ranks[1][path]), path  # every rank holds the same student
        assert torch.allclose(ranks[0][path], tensor, rtol=1e-5, atol=1e-6), path


@pytest.mark.slow
def test_two_processes_distill_a_masked_student_with_an_odd_batch_as_one(tiny_llama, tmp_path):
    from distributed_worker import run_pipeline

    run_pipeline(str(tiny_llama), MASKED, str(tmp_path / "one"), "")
    torchrun(str(WORKER), str(tiny_llama), MASKED, str(tmp_path / "two"), "")
    single = load_file(tmp_path / "one" / "rank0.safetensors")
    ranks = [load_file(tmp_path / "two" / f"rank{rank}.safetensors") for rank in (0, 1)]
    zeros = 0
    for path, tensor in single.items():
        assert torch.equal(ranks[0][path], ranks[1][path]), path
        assert torch.allclose(ranks[0][path], tensor, rtol=1e-5, atol=1e-6), path
        zeros += int(((tensor == 0) & (ranks[0][path] == 0)).sum())
    assert zeros > 0  # the pruned weights stayed zero on both sides


@pytest.mark.slow
def test_torchrun_cli_writes_once_from_rank_0_what_one_process_writes(tiny_llama, tmp_path, capsys):
    assert main(["run", str(tiny_llama), "--pipeline", PIPELINE, "--export-hf", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    done = torchrun("-m", "fxpress.cli", "run", str(tiny_llama), "--pipeline", PIPELINE,
                    "--export-hf", str(tmp_path / "two"))
    assert done.stdout.count("distill{") == 1, done.stdout  # one pass table: rank 1 prints nothing
    single = load_file(tmp_path / "one" / "model.safetensors")
    both = load_file(tmp_path / "two" / "model.safetensors")
    assert single.keys() == both.keys()
    for name, tensor in single.items():
        assert torch.allclose(both[name], tensor, rtol=1e-5, atol=1e-6), name


@pytest.mark.slow
def test_two_processes_train_the_tail_drop_autoencoder_as_one(tmp_path):
    from distributed_worker import train_tokens

    train_tokens(str(tmp_path / "one"))
    torchrun(str(WORKER), "tokens", str(tmp_path / "two"))
    single = load_file(tmp_path / "one" / "rank0.safetensors")
    ranks = [load_file(tmp_path / "two" / f"rank{rank}.safetensors") for rank in (0, 1)]
    for name, tensor in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], tensor, rtol=1e-4, atol=1e-5), name  # gradient summation order
