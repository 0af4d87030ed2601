"""qbert-quantize under torchrun: 2 CPU processes (gloo) make the run 1 process makes, resume after a kill, and
refuse a world size that does not divide the global batch.

Real processes, real launcher: `torchrun --nproc_per_node 2 --no-python qbert-quantize ...`, with the torchrun and
the console script of this test's own environment (so the code under test is this checkout's).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification

from qbert_deploy.checkpoint import Checkpoint, load_checkpoint
from qbert_deploy.cli.export import main as export_main
from qbert_deploy.cli.quantize import main as quantize_main
from qbert_deploy.cli.validate import main as validate_main
from qbert_deploy.data.tsv import Example, write_tsv
from tests.tiny import SENTENCES, save_hf_dir, tiny_config, tokenizer

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
# 33 training examples in global batches of 4: every epoch ends with a batch of 1, which leaves one of the two
# ranks without rows (it repeats the row with weight 0). 10 fine-tune steps cross that batch; QAT runs 30 steps
# with a resume state every 2, so a kill after the first state lands mid-QAT.
ARGS = ["--finetune-steps", "10", "--qat-steps", "30", "--save-every", "2", "--lr", "1e-3", "--qat-lr", "1e-3",
        "--hessian-subsets", "2", "--hessian-batch", "5", "--hessian-iters", "5", "--calibration-batches", "2",
        "--batch-size", "4", "--groups", "4", "--avg-bits", "3", "--bit-choices", "2,4", "--seed", "3",
        # Plain QAT: with distillation and learned ranges (the qbert default) a run splits fine too, but a learned
        # clipping bound can land a float rounding apart, moving the few weights clipped to it by up to ~2e-3.
        "--distill", "none"]
# Two processes compute each step's mean gradient as two half-batch sums added by gloo, one process as one sum:
# the same numbers added in another order, so weights differ by float rounding (about 1e-7 relative per step),
# which 40 Adam steps at lr 1e-3 keep far below 1e-4 (measured: at most 1.3e-6; a resumed 2-process run matches
# the uninterrupted one exactly, since it adds in the same order). A real difference in data or scaling (a batch
# seen twice, a loss not weighted by its share of rows) moves weights by about lr = 1e-3 per step.
ATOL = 1e-4
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tinydist")
    torch.manual_seed(0)
    save_hf_dir(BertForSequenceClassification(tiny_config()), root / "model")
    examples = [Example(s, i % 2) for i, s in enumerate(SENTENCES)]
    write_tsv(root / "train.tsv", examples * 4 + examples[:1])
    write_tsv(root / "dev.tsv", examples)
    return root


def _data(tiny_dir: Path) -> list[str]:
    return ["--model", str(tiny_dir / "model"), "--train", str(tiny_dir / "train.tsv"), "--dev",
            str(tiny_dir / "dev.tsv")]


def _env() -> dict[str, str]:
    # This checkout first, and no GPU: the processes talk over gloo on the CPU, as in CI.
    return {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _torchrun(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--no-python", str(BIN / "qbert-quantize"),
            *_data(tiny_dir), *ARGS, *extra, "-o", str(out)]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env())


def _assert_same_weights(a: Checkpoint, b: Checkpoint) -> None:
    assert a.recipe == b.recipe, "the same eigenvalues must give the same bit allocation"
    assert a.state_dict.keys() == b.state_dict.keys()
    for name, tensor in a.state_dict.items():
        np.testing.assert_allclose(tensor.numpy(), b.state_dict[name].numpy(), rtol=0, atol=ATOL, err_msg=name)
    assert a.activation_ranges.keys() == b.activation_ranges.keys()
    for name, (lo, hi) in a.activation_ranges.items():
        np.testing.assert_allclose([lo, hi], b.activation_ranges[name], rtol=0, atol=ATOL, err_msg=name)


@pytest.fixture(scope="module")
def one_process(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "out"
    result = _run([str(BIN / "qbert-quantize"), *_data(tiny_dir), *ARGS, "-o", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_processes(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two") / "out"
    result = _run(_torchrun(tiny_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_processes_make_the_one_process_model(one_process: Path, two_processes: Path, tiny_dir: Path,
                                                  tmp_path: Path) -> None:
    one, two = load_checkpoint(one_process / "model.pt"), load_checkpoint(two_processes / "model.pt")
    assert one.metrics["world_size"] == 1 and two.metrics["world_size"] == 2
    assert one.metrics["global_batch"] == two.metrics["global_batch"] == 4
    log = (two_processes / "quantize.log").read_text()
    assert "world size 2, global batch 4 (2 per process)" in log
    assert log.count("wrote ") == 1, "only rank 0 logs"
    assert sorted(p.name for p in two_processes.iterdir() if p.name.startswith(".")) == [], "no temporary leftovers"
    assert {b.bits for b in two.recipe.overrides.values()} == {2, 4}
    # Hessian subsets of 5 rows split 3 + 2: the summed, share-weighted products are the whole subset's Hessian.
    # The power iteration stops at a relative change of 1e-2, so rounding may stop it one product apart: the
    # eigenvalues agree to 1e-2 of the largest; rank 0's 3 rows alone give a different Hessian altogether.
    for a, b in zip(json.loads((one_process / "sensitivity.json").read_text())["eigenvalues"],
                    json.loads((two_processes / "sensitivity.json").read_text())["eigenvalues"], strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-2 * max(abs(v) for v in a))
    _assert_same_weights(one, two)
    export = tmp_path / "export"
    assert export_main([str(two_processes / "model.pt"), "-o", str(export)]) == 0
    assert validate_main([str(export), "--checkpoint", str(two_processes / "model.pt"), "--data",
                          str(tiny_dir / "dev.tsv")]) == 0


def _kill_all(launcher: int) -> None:
    """SIGKILL torchrun and its workers together, as a machine failure would: torchrun starts each worker in a
    session of its own, so killing torchrun's process group alone would leave the workers running on."""
    workers = [int(pid) for task in Path(f"/proc/{launcher}/task").iterdir()
               for pid in (task / "children").read_text().split()]
    assert len(workers) == 2, f"torchrun should have 2 workers, has {workers}"
    for pid in [*workers, launcher]:
        os.killpg(os.getpgid(pid), signal.SIGKILL)


def test_killed_distributed_qat_resumes(two_processes: Path, tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    state = out / "qat-state.pt"
    stderr = (tmp_path / "stderr.txt").open("w")
    # Its own session: the kill takes torchrun and both workers at once, as a machine failure would.
    launcher = subprocess.Popen(_torchrun(tiny_dir, out), stdout=subprocess.DEVNULL, stderr=stderr, env=_env(),
                                start_new_session=True)
    try:
        deadline = time.time() + 300
        while not state.exists() and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.05)
        assert state.exists(), f"QAT never saved a resume state: {(tmp_path / 'stderr.txt').read_text()[-3000:]}"
        _kill_all(launcher.pid)
        launcher.wait(timeout=30)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        stderr.close()
    assert not (out / "model.pt").exists(), "a killed run must not leave a model.pt behind"
    result = _run(_torchrun(tiny_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "quantize.log").read_text()
    assert "fp32: reusing" in log and "sensitivity: reusing" in log and "resuming QAT from step" in log, log[-2000:]
    assert not state.exists()
    _assert_same_weights(load_checkpoint(two_processes / "model.pt"), load_checkpoint(out / "model.pt"))


def test_world_size_must_divide_the_global_batch(tiny_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    result = _run(_torchrun(tiny_dir, out, "--batch-size", "5"))
    assert result.returncode != 0
    # Each worker says it in one line (torchrun then reports the failed workers in its own words).
    assert result.stderr.count("qbert-quantize: error: world size 2 does not divide the global batch "
                               "(--batch-size 5)") == 2, result.stderr[-3000:]
    assert not out.exists(), "nothing may be written"
    # The worker's own exit code, without the launcher in between.
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert quantize_main([*_data(tiny_dir), *ARGS, "--batch-size", "6", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qbert-quantize: error: world size 4 does not divide the global batch (--batch-size 6); "
                   "use a multiple of 4"], err
    assert not out.exists()


def _train_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a 2-process train(): joins a gloo group the way a launcher would set it up."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""})
    torch.set_num_threads(1)
    from qbert_deploy.models import distributed

    distributed.setup()
    try:
        model, losses = _tiny_training()
        if distributed.is_main():
            torch.save({"losses": losses, "state": model.state_dict()}, out)
    finally:
        distributed.teardown()


def _tiny_training() -> tuple[torch.nn.Module, list[float]]:
    from qbert_deploy.models.task import Task
    from qbert_deploy.models.train import train

    # 9 examples in global batches of 4: 4, 4, then 1 row, which rank 1 repeats with weight 0.
    task = Task(tokenizer(), [Example(s, i % 2) for i, s in enumerate(SENTENCES + SENTENCES[:1])], [],
                ["negative", "positive"], batch_size=4)
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config())

    def own_loss(seen: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        # A loss_fn may reach into the model (distillation hooks it, reads its config): it gets the model itself.
        assert seen is model, type(seen)
        return torch.nn.functional.cross_entropy(seen(**inputs).logits, labels)

    return model, train(model, task.train_batches, steps=4, lr=1e-3, loss_fn=own_loss)


def test_train_loss_is_the_global_batch_mean(tmp_path: Path) -> None:
    """Each step's logged loss is the global batch's mean, also for a batch too short to give every rank a row
    (gradient clipping and Adam would hide a wrongly weighted gradient in the weights; the loss does not)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "two.pt"
    mp.spawn(_train_worker, args=(2, port, str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    model, losses = _tiny_training()
    np.testing.assert_allclose(two["losses"], losses, rtol=1e-5)
    for name, tensor in model.state_dict().items():
        np.testing.assert_allclose(two["state"][name].numpy(), tensor.numpy(), rtol=0, atol=ATOL, err_msg=name)
