"""Exact resume: a run killed with SIGKILL and restarted writes the loss sequence of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import TINY_DIT, make_cache, tiny_config, write_toml

from kandinsky5.train import load_config, train
from kandinsky5.train.checkpointing import latest_checkpoint, list_checkpoints
from kandinsky5.train.trainer import read_metrics

RUNNER = Path(__file__).with_name("run_training.py")
MAX_STEPS = 24


def _losses(output_dir: Path) -> list[tuple[str, str, str]]:
    return [(row["step"], row["loss"], row["lr"]) for row in read_metrics(output_dir)]


def _run_config(root: Path, name: str) -> Path:
    values = dict(
        model=dict(TINY_DIT),
        init="random",
        cache_dir=str(root / "cache"),
        output_dir=str(root / name),
        batch_size=2,
        grad_accum=2,
        lr=1e-3,
        warmup_steps=3,
        lr_schedule="cosine",
        max_steps=MAX_STEPS,
        log_every=1,
        checkpoint_every=3,
        keep_last_k=2,
        device="cpu",
    )
    return write_toml(root / f"{name}.toml", values)


def _start(config: Path, delay: float) -> subprocess.Popen:
    """The runner in a fresh process; its stderr goes to a file beside the config (no pipe to fill up)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    log = config.with_suffix(f".{time.monotonic_ns()}.log").open("wb")
    proc = subprocess.Popen([sys.executable, str(RUNNER), str(config), str(delay)], env=env, stdout=log, stderr=log)
    proc.log_path = Path(log.name)  # type: ignore[attr-defined]
    log.close()  # the child holds its own descriptor
    return proc


def _log(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text(errors="replace")[-3000:]


def _finish(proc: subprocess.Popen) -> None:
    proc.wait(timeout=120)
    assert proc.returncode == 0, _log(proc)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_and_resume_reproduces_the_uninterrupted_losses(tmp_path: Path):
    make_cache(tmp_path / "cache", n=7)  # 7 samples: batches of 2 and one of 1, epochs roll over
    killed_config = _run_config(tmp_path, "killed")
    proc = _start(killed_config, 0.05)
    deadline = time.monotonic() + 60
    while len(list_checkpoints(tmp_path / "killed")) < 2:  # poll the output folder
        assert proc.poll() is None, _log(proc)
        assert time.monotonic() < deadline, "no checkpoints appeared"
        time.sleep(0.01)
    time.sleep(0.07)  # land somewhere inside the next steps, not right at a checkpoint
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    interrupted_at = latest_checkpoint(tmp_path / "killed")
    assert interrupted_at is not None and interrupted_at.name != f"step_{MAX_STEPS:07d}"

    resumed = _start(killed_config, 0.0)  # resumes from the latest checkpoint
    # Meanwhile the uninterrupted reference runs here, on one thread like the subprocesses.
    train(load_config(_run_config(tmp_path, "reference")))
    _finish(resumed)

    expected = _losses(tmp_path / "reference")
    assert [int(s) for s, _, _ in expected] == list(range(1, MAX_STEPS + 1))
    assert _losses(tmp_path / "killed") == expected  # bit for bit: the CSV holds repr(float)


def test_resume_in_process_matches_one_long_run(tmp_path: Path):
    make_cache(tmp_path / "cache", n=5)
    full = train(tiny_config(tmp_path, output_dir=str(tmp_path / "full"), max_steps=8, checkpoint_every=3))
    train(tiny_config(tmp_path, output_dir=str(tmp_path / "split"), max_steps=4, checkpoint_every=3))
    split = train(tiny_config(tmp_path, output_dir=str(tmp_path / "split"), max_steps=8, checkpoint_every=3))
    assert split.step == full.step == 8
    assert split.loss == full.loss
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")


def test_a_finished_run_is_not_trained_again(tmp_path: Path):
    make_cache(tmp_path / "cache", n=4)
    first = train(tiny_config(tmp_path, max_steps=3))
    again = train(tiny_config(tmp_path, max_steps=3))
    assert (again.step, again.loss, again.checkpoint) == (3, first.loss, first.checkpoint)
    assert len(read_metrics(tmp_path / "run")) == 3
