"""Faults during training and sampling (issue #14 part 3).

* SIGKILL in the middle of a step, of writing the resume state (sidecar) and of writing the
  aggregator: the toy trainer of test_train_core in a child process that kills itself at an exact
  point (a patched method: no timing involved), then the `train` CLI on real ComfyUI (one process,
  and torchrun with 2 gloo processes). Afterwards the last good aggregator loads, no temp file is
  left once training restarts, and the resumed run ends where an uninterrupted one ends: the
  toy runs bit for bit (weights, AdamW moments, loss curve), the CLI runs within rel 1e-5 per loss.
* A save that fails with ENOSPC keeps the previous files byte for byte and says why and where.
* A NaN or inf loss stops training naming the step and keeps the last good file.
* Cancel (POST /interrupt) during the AFA Train Aggregator node and during sampling: the prompt
  ends within one step (counted in steps, timed for the report) and leaves no half-written file.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_train_core import INFO, _assert_same_run, experts, run

from afa_nodes.core.aggregator_file import load_aggregator
from afa_nodes.core.errors import TrainingError
from afa_nodes.core.train import state_path

pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

# Applied in a child process before it trains: SIGKILL itself at `AFA_KILL_WHERE` of step
# `AFA_KILL_AT` ("step": gradients computed, weights not yet updated; "state": the sidecar's temp
# file half written; "aggregator": the aggregator's temp file half written, the sidecar done).
KILLER = textwrap.dedent("""
    import json, os, signal
    import torch
    import afa_nodes.core.aggregator_file as aggregator_file
    import afa_nodes.core.train as train
    import afa_nodes.core.train_state as train_state

    WHERE, AT = os.environ["AFA_KILL_WHERE"], int(os.environ["AFA_KILL_AT"])
    RANK = int(os.environ.get("RANK", 0))

    def die(tmp=None):
        if tmp is not None:
            with open(tmp, "wb") as f:
                f.write(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)

    if WHERE == "step":
        step = train.AggregatorTrainer.optimizer_step
        def optimizer_step(self, loss):
            if self.step + 1 == AT and RANK == 0:
                die()
            return step(self, loss)
        train.AggregatorTrainer.optimizer_step = optimizer_step
    elif WHERE == "state":
        save = torch.save
        class _Torch:
            def __getattr__(self, name):
                return getattr(torch, name)
            @staticmethod
            def save(obj, f, *a, **k):
                if isinstance(obj, dict) and obj.get("step") == AT:
                    die(f)
                return save(obj, f, *a, **k)
        train_state.torch = _Torch()
    elif WHERE == "aggregator":
        save_file = aggregator_file.save_file
        def killing_save_file(tensors, tmp, metadata=None):
            if json.loads(metadata["afa"])["training"]["step"] == AT:
                die(tmp)
            return save_file(tensors, tmp, metadata=metadata)
        aggregator_file.save_file = killing_save_file
""")

TOY_CHILD = KILLER + textwrap.dedent("""
    import sys
    from pathlib import Path
    torch.set_num_threads(1)
    from test_train_core import run
    run(Path(sys.argv[1]), sys.argv[2], steps=8, save_every=2)
""")


def child_env(**extra) -> dict:
    path = os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **extra)


def temps(folder: Path) -> list:
    return sorted(p.name for p in folder.glob(".*.tmp"))


# ---------------------------------------------------------------- SIGKILL, toy trainer
@pytest.mark.parametrize("where, at, saved", [("step", 5, 4), ("state", 4, 2), ("aggregator", 4, 2)])
def test_sigkill_then_resume_ends_exactly_where_an_uninterrupted_run_ends(tmp_path, where, at, saved):
    straight = run(tmp_path, "straight.safetensors", steps=8, save_every=2)
    out = tmp_path / "killed.safetensors"
    done = subprocess.run([sys.executable, "-c", TOY_CHILD, str(tmp_path), out.name], cwd=tmp_path,
                          env=child_env(AFA_KILL_WHERE=where, AFA_KILL_AT=str(at)), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert load_aggregator(out).training["step"] == saved          # the last good file loads
    if where != "step":
        assert temps(tmp_path), "the kill was meant to leave a half-written temp file"
    resumed = run(tmp_path, out.name, steps=8, save_every=2, resume=True)
    assert not temps(tmp_path), temps(tmp_path)                      # removed when training restarted
    assert resumed.step == 8 and [h[0] for h in resumed.history] == list(range(1, 9))
    assert resumed.history == straight.history                       # the loss curve, bit for bit
    _assert_same_run(tmp_path / "straight.safetensors", out)         # weights and AdamW moments
    assert not Path(str(state_path(out)) + ".prev").exists()


# ---------------------------------------------------------------- ENOSPC, NaN/inf
def test_a_full_disk_keeps_the_previous_files_and_says_why(tmp_path, monkeypatch):
    import afa_nodes.core.aggregator_file as aggregator_file
    out = tmp_path / "agg.safetensors"
    steps = []
    run(tmp_path, out.name, steps=2, save_every=2)
    before = out.read_bytes(), state_path(out).read_bytes()

    def full_disk(tensors, tmp, metadata=None):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(aggregator_file, "save_file", full_disk)
    with pytest.raises(TrainingError, match=r"saving step 4 failed.*agg\.safetensors: No space left on device.*"
                                            r"previous file is unchanged.*kept: .*agg\.safetensors \(step 2\)"):
        run(tmp_path, out.name, steps=6, save_every=2, resume=True, progress=lambda s, t, loss: steps.append(s))
    assert steps == [3, 4]
    assert (out.read_bytes(), state_path(out).read_bytes()) == before  # byte for byte
    assert not temps(tmp_path)
    monkeypatch.undo()
    resumed = run(tmp_path, out.name, steps=4, save_every=2, resume=True)   # and it resumes from step 2
    assert resumed.history[-2][0] == 3 and resumed.step == 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_loss_stops_naming_the_step_and_keeps_the_last_good_file(tmp_path, bad):
    exps, poisoned = experts(), []
    original = exps[1].run_block

    def run_block(stage, index, h, emb, context, output_shape=None):
        out = original(stage, index, h, emb, context, output_shape)
        return out * bad if poisoned and stage == "output" else out
    exps[1].run_block = run_block

    def progress(step, total, loss):
        if step == 5:
            poisoned.append(step)
    with pytest.raises(TrainingError, match=rf"loss became (nan|inf) at step 6.*kept: .*agg.safetensors \(step 4\)"):
        run(tmp_path, exps=exps, steps=10, save_every=2, progress=progress)
    kept = load_aggregator(tmp_path / "agg.safetensors")
    assert kept.training["step"] == 4 and all(torch.isfinite(v).all() for v in kept.state_dict.values())
    assert kept.experts == INFO and not temps(tmp_path)


# ---------------------------------------------------------------- SIGKILL, the train CLI
RUN_CLI = "\nimport sys\nfrom afa_nodes.__main__ import main\nsys.exit(main(sys.argv[1:]))\n"
CLI_STEPS = 4


def train_cli(comfyui_path, tmp: Path, out: Path, data: Path, checkpoints, *, kill=None, nproc=1, resume=False):
    """`python -m afa_nodes train` (or torchrun with `nproc` gloo processes) with KILLER applied;
    `kill` = (where, step). Returns the CompletedProcess (its own session: killed whole on a timeout)."""
    script = tmp / "afa_train_killer.py"
    script.write_text(KILLER + RUN_CLI, encoding="utf-8")
    env = child_env(COMFYUI_PATH=str(comfyui_path), AFA_KILL_WHERE=kill[0] if kill else "none",
                    AFA_KILL_AT=str(kill[1] if kill else -1))
    launch = [sys.executable, str(script)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(script)]
    args = ["train", "--data", data, "--out", out, "--steps", CLI_STEPS, "--batch-size", 2, "--resolution", 64,
            "--lr", 1e-3, "--warmup", 0, "--save-every", 1, "--val-fraction", 0.34, "--seed", 1,
            "--no-grad-checkpointing", "--resume" if resume else "--no-resume"]
    for p in checkpoints:
        args += ["--checkpoint", p]
    proc = subprocess.Popen(launch + [str(a) for a in args], cwd=tmp, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"train CLI did not finish in 400 s:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def assert_same_curve(resumed: Path, straight: Path, rel: float):
    a, b = load_aggregator(resumed).training, load_aggregator(straight).training
    assert a["step"] == b["step"] == CLI_STEPS and a["finished"]
    assert [s for s, _ in a["loss_curve"]] == list(range(1, CLI_STEPS + 1))
    for (step, x), (_, y) in zip(a["loss_curve"], b["loss_curve"]):
        assert x == pytest.approx(y, rel=rel), f"step {step}: {x} vs {y}"
    assert a["final_val_loss"] == pytest.approx(b["final_val_loss"], rel=rel)


@pytest.fixture(scope="module")
def cli_run(comfyui_path, sd15_checkpoints, tmp_path_factory):
    from toy_dataset import make_dataset
    tmp = tmp_path_factory.mktemp("faults_cli")
    data = make_dataset(tmp / "data")
    ckpts = sd15_checkpoints[:2]
    straight = tmp / "straight.safetensors"
    done = train_cli(comfyui_path, tmp, straight, data, ckpts)
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(tmp=tmp, data=data, ckpts=ckpts, straight=straight)


@pytest.mark.comfyui
@pytest.mark.slow
@pytest.mark.parametrize("nproc, where", [(1, "aggregator"), (2, "step")], ids=["cli-mid-write", "torchrun-mid-step"])
def test_train_cli_sigkill_then_resume_matches_an_uninterrupted_run(comfyui_path, cli_run, nproc, where):
    tmp, out = cli_run["tmp"], cli_run["tmp"] / f"killed_{nproc}.safetensors"
    done = train_cli(comfyui_path, tmp, out, cli_run["data"], cli_run["ckpts"], kill=(where, 3), nproc=nproc)
    assert done.returncode != 0, done.stderr[-3000:]
    if nproc == 1:
        assert done.returncode == -signal.SIGKILL
    assert load_aggregator(out).training["step"] == 2                       # the last good file loads
    done = train_cli(comfyui_path, tmp, out, cli_run["data"], cli_run["ckpts"], nproc=nproc, resume=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resuming killed" in done.stderr and "fresh optimizer" not in done.stderr, done.stderr[-3000:]
    assert not temps(tmp)
    # one process: the same arithmetic as the straight run; two: the data-parallel sum (test_train_comfy)
    assert_same_curve(out, cli_run["straight"], rel=1e-5 if nproc == 1 else 1e-4)
    for k, v in load_aggregator(cli_run["straight"]).state_dict.items():
        torch.testing.assert_close(load_aggregator(out).state_dict[k], v, rtol=1e-3, atol=1e-5, msg=k)


# ---------------------------------------------------------------- Cancel from ComfyUI's interface
def _wait_interrupted(srv, prompt_id, timeout=120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = srv.history(prompt_id)
        if entry is not None and (entry.get("status") or {}).get("completed") is not None:
            events = [e for e, _ in entry["status"].get("messages") or []]
            assert "execution_interrupted" in events, entry["status"]
            return entry
        time.sleep(0.05)
    raise AssertionError(f"the prompt did not stop within {timeout} s of the interrupt\n{srv.log_tail()}")


@pytest.mark.comfyui
@pytest.mark.slow
def test_cancel_training_from_the_interface_stops_within_one_step_and_leaves_a_whole_file(
        comfy_server, sd15_checkpoints):
    from reliability import BLOCK_AVERAGE
    from toy_dataset import make_dataset
    srv = comfy_server
    make_dataset(srv.input_dir / "afa_rel_cancel_ds")
    afa_dir = Path(srv.models_dir) / "afa"
    target = afa_dir / "afa_rel_cancel.safetensors"
    prompt = {
        "1": {"class_type": "AFAEnsembleLoader", "inputs": dict(
            srv.widget_defaults("AFAEnsembleLoader"), ckpt_1=sd15_checkpoints[0].name, ckpt_2=sd15_checkpoints[1].name,
            aggregator="none", mode=BLOCK_AVERAGE)},
        "2": {"class_type": "AFATrainAggregator", "inputs": dict(
            srv.widget_defaults("AFATrainAggregator"), model=["1", 0], clip=["1", 1], vae=["1", 2],
            dataset_folder="afa_rel_cancel_ds", save_name=target.stem, steps=100_000, save_every=1, batch_size=2,
            resolution=64, resume=False, gradient_checkpointing=False, validation_fraction=0.34)},
    }
    step_of = lambda: load_aggregator(target).training["step"] if target.exists() else 0  # noqa: E731
    try:
        prompt_id = srv.queue(prompt)
        seen, deadline = [], time.monotonic() + 300
        while len(seen) < 3:   # three saved steps: training is under way, and their pace is known
            assert time.monotonic() < deadline and srv.history(prompt_id) is None, srv.log_tail()
            step = step_of()
            if step and (not seen or step != seen[-1][1]):
                seen.append((time.monotonic(), step))
            time.sleep(0.02)
        srv.interrupt()
        asked, at_interrupt = time.monotonic(), step_of()
        _wait_interrupted(srv, prompt_id)
        seconds = time.monotonic() - asked
        final = load_aggregator(target).training
        step_seconds = (seen[-1][0] - seen[0][0]) / (seen[-1][1] - seen[0][1])
        print(f"\ncancel during training: stopped {seconds:.2f} s after the interrupt, at step {final['step']} "
              f"(step {at_interrupt} saved when asked; a step takes {step_seconds:.2f} s)")
        assert at_interrupt <= final["step"] <= at_interrupt + 1 and not final["finished"]
        assert torch.load(state_path(target), weights_only=True)["step"] == final["step"]
        assert not temps(afa_dir) and not Path(str(state_path(target)) + ".prev").exists()
    finally:
        for p in afa_dir.glob(target.name + "*"):
            p.unlink()


@pytest.mark.comfyui
@pytest.mark.slow
def test_cancel_sampling_from_the_interface_stops_within_one_step_and_saves_nothing(
        comfy_server, sd15_checkpoints):
    import re

    from reliability import BLOCK_AVERAGE, afa_prompt
    srv = comfy_server
    steps, prefix = 400, "afa_rel_cancelled"
    prompt = afa_prompt([p.name for p in sd15_checkpoints[:2]], BLOCK_AVERAGE, 64, 9, prefix=prefix, steps=steps)
    log_start = len(srv.log_text())
    progress = re.compile(rf"(\d+)/{steps} \[")

    def sampled():
        counts = [int(n) for n in progress.findall(srv.log_text()[log_start:])]
        return max(counts, default=0)
    prompt_id = srv.queue(prompt)
    deadline = time.monotonic() + 300
    while sampled() < 3:
        assert time.monotonic() < deadline and srv.history(prompt_id) is None, srv.log_tail()
        time.sleep(0.05)
    srv.interrupt()
    asked, at_interrupt = time.monotonic(), sampled()
    _wait_interrupted(srv, prompt_id)
    seconds, final = time.monotonic() - asked, sampled()
    print(f"\ncancel during sampling: stopped {seconds:.2f} s after the interrupt, after step {final} of {steps} "
          f"({at_interrupt} shown when asked)")
    assert final <= at_interrupt + 2 < steps    # one step in flight, one the progress bar had not printed yet
    assert not list(srv.output_dir.glob(prefix + "*")) and not temps(srv.output_dir)
    entry = srv.run(afa_prompt([p.name for p in sd15_checkpoints[:2]], BLOCK_AVERAGE, 64, 10, prefix=prefix), 300)
    assert srv.output_images(entry)[0].is_file()        # and the server goes on serving
