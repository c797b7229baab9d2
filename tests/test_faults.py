"""Nothing lost, nothing unsafe: every fault of issue 7 tried once (killed runs, signals, non-finite
losses, bad data, bad checkpoints and options, a dead rank under torchrun, metrics that cannot run),
plus gradient accumulation, which must not change what a step computes.

Each training test runs train.py for real on a miniature data set (8 training studies of 64 x 64
pixels, batch 4, 2 epochs of 2 steps) and the random 2-layer Llama of conftest.py; the test split's
final evaluation is stubbed out in-process (it is evaluate.py's own business, tried in its tests).
"""
import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import model as M
import train
from conftest import WORDS, env_without_java, largest_difference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, STEPS = 8, 4                     # 2 epochs x 2 steps of 4


def write_dataset(root, n_train=N_TRAIN, n_val=4, n_test=4, seed=0):
    """R2Gen layout: annotation.json and images/; reports of 3 to 14 words, so that micro-batches and
    ranks hold different numbers of report tokens."""
    rng = random.Random(seed)
    os.makedirs(root / "images", exist_ok=True)
    words = [w for w in WORDS if w not in (":", ",", ".")]
    ann = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        ann[split] = []
        for i in range(n):
            path = f"{split}{i}.png"
            pixels = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (64, 72), np.uint8)
            Image.fromarray(pixels, "L").save(root / "images" / path)
            report = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + "."
            ann[split].append(dict(id=f"{split}{i}", report=report, image_path=[path], split=split))
    (root / "annotation.json").write_text(json.dumps(ann))
    return ann


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_data")
    write_dataset(root)
    return root


def run_args(root, llm_dir, out, *extra):
    return ["--preset", "tiny", "--dataset", "mimic", "--data_dir", str(root), "--annotation", "annotation.json",
            "--llm", llm_dir, "--vision", "", "--out_dir", str(out), "--resize", "64", "--image_size", "64", "--epochs", "2",
            "--batch_size", "4", "--eval_batch_size", "4", "--num_workers", "0", "--max_new_tokens", "2",
            "--num_beams", "1", "--ckpt_every", "1", "--log_every", "1", *extra]


def train_in_process(monkeypatch, *argv):
    """train.main with the test split's evaluation replaced by a note that it was reached."""
    reached = []
    monkeypatch.setattr(train, "evaluate_split", lambda *a, **k: reached.append(True))
    train.main(list(argv))
    return reached


def weights(out):
    return torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]


@pytest.fixture(scope="module")
def straight(dataset, llm_dir, tmp_path_factory):
    """The weights of an uninterrupted run: every interrupted-then-resumed run must end with them."""
    out = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as mp:
        assert train_in_process(mp, *run_args(dataset, llm_dir, out)) == [True]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["loop"]["epoch"] == 2 and ckpt["loop"]["global_step"] == STEPS
    return ckpt["model"]


def script_without_test_evaluation(tmp_path):
    """train.py's main, with the test split's evaluation replaced by a line saying it was reached."""
    path = tmp_path / "train_no_test_eval.py"
    path.write_text(f"import sys\nsys.path.insert(0, {REPO!r})\nimport train\n"
                    "train.evaluate_split = lambda *a, **k: print('test evaluation reached', flush=True)\n"
                    "train.main(sys.argv[1:])\n")
    return str(path)


# -----------------------------------------------------------------------------
# 1. killed training


def test_sigkill_mid_run_then_resume_ends_with_the_straight_runs_weights(dataset, llm_dir, tmp_path, straight,
                                                                        monkeypatch, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *run_args(dataset, llm_dir, out)], cwd=REPO,
                            env=env_without_java(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:                   # the log of step 1 comes after the checkpoint of step 0
        seen.append(line)
        if line.startswith("epoch 0 step 1/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    loop = train.load_checkpoint(out / "last.pt")["loop"]          # whole, wherever the kill landed
    assert (loop["epoch"], loop["global_step"]) >= (0, 1)
    reached = train_in_process(monkeypatch, *run_args(dataset, llm_dir, out, "--resume"))
    assert reached == [True]
    # continued from the saved step (a run from scratch would also end with the straight run's weights)
    assert f"resumed from {out / 'last.pt'}: epoch {loop['epoch']}, step {loop['step']}" in capsys.readouterr().out
    assert largest_difference(straight, weights(out))[0] < 1e-6


def test_death_during_a_checkpoint_write_keeps_the_previous_one(dataset, llm_dir, tmp_path, straight, monkeypatch,
                                                                capsys):
    """A process dies half-way through writing its 2nd checkpoint (epoch 0 step 2): last.pt is still
    the 1st (step 1), whole; the half-written temporary file is never read; the next start-up removes it."""
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    class Killed(BaseException):
        pass

    def save_and_die(obj, f, *a, **k):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *a, **k)
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise Killed

    monkeypatch.setattr(torch, "save", save_and_die)
    with pytest.raises(Killed):
        train_in_process(monkeypatch, *run_args(dataset, llm_dir, out))
    monkeypatch.setattr(torch, "save", real_save)
    partial = [f for f in os.listdir(out) if f.startswith("last.pt.tmp.")]
    assert len(partial) == 1 and os.path.getsize(out / partial[0]) > 0
    assert train.load_checkpoint(out / "last.pt")["loop"]["step"] == 1
    (out / "last.pt.tmp.99999").write_bytes(b"PK\x03\x04 cut short")      # another dead writer's leftover
    capsys.readouterr()
    assert train_in_process(monkeypatch, *run_args(dataset, llm_dir, out, "--resume")) == [True]
    log = capsys.readouterr().out
    assert "resumed from" in log and "epoch 0, step 1" in log
    assert log.count("a checkpoint that a killed run left half-written") == 2
    assert not [f for f in os.listdir(out) if ".tmp." in f]
    assert largest_difference(straight, weights(out))[0] < 1e-6


# -----------------------------------------------------------------------------
# 2. SIGTERM / Ctrl-C


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_resumable_checkpoint_and_exits(dataset, llm_dir, tmp_path, straight, monkeypatch, capfd, sig):
    """The signal arrives during step 0 (here from inside the optimizer step, at a known moment; a
    scheduler's comes from outside, through the same handler). Step 1 still finishes; then last.pt is
    saved and the run exits with 128 + the signal number; --resume ends where the straight run ends."""
    out = tmp_path / "run"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    real_step, calls = torch.optim.AdamW.step, []

    def step_and_signal(self, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            # without train.py's handler the signal would end pytest itself
            assert signal.getsignal(sig) not in (signal.SIG_DFL, handlers[sig == signal.SIGTERM])
            os.kill(os.getpid(), sig)
            os.kill(os.getpid(), sig)                     # a repeat (torchrun forwards Ctrl-C) is ignored
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_and_signal)
    with pytest.raises(SystemExit) as stop:
        train_in_process(monkeypatch, *run_args(dataset, llm_dir, out))
    assert stop.value.code == 128 + sig
    log = capfd.readouterr()
    assert f"[rank 0] {sig.name}: stopping at the end of this step" in log.err
    assert f"{sig.name}: saving a resumable checkpoint" in log.out and f"stopped by {sig.name}" in log.out
    assert len(calls) == 2                                # the step in progress finished, no further one
    loop = train.load_checkpoint(out / "last.pt")["loop"]
    assert (loop["epoch"], loop["step"], loop["global_step"]) == (0, 2, 2)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers   # restored
    if sig == signal.SIGTERM:                             # what follows does not depend on the signal
        monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
        assert train_in_process(monkeypatch, *run_args(dataset, llm_dir, out, "--resume")) == [True]
        assert f"resumed from {out / 'last.pt'}: epoch 0, step 2" in capfd.readouterr().out
        assert largest_difference(straight, weights(out))[0] < 1e-6


def test_a_signal_during_an_epochs_last_step_still_stops_the_run(dataset, llm_dir, tmp_path, monkeypatch):
    """The signal arrives in the optimizer step of epoch 0's last step, after that step read the flag:
    the run must still stop before validation and the next epoch, not drop it with the handlers."""
    real_step, calls = torch.optim.AdamW.step, []

    def step_and_signal(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:                               # epoch 0 has two steps
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_and_signal)
    with pytest.raises(SystemExit) as stop:
        train_in_process(monkeypatch, *run_args(dataset, llm_dir, tmp_path / "run"))
    assert stop.value.code == 128 + signal.SIGTERM and len(calls) == 2
    loop = train.load_checkpoint(tmp_path / "run" / "last.pt")["loop"]
    assert (loop["epoch"], loop["step"], loop["global_step"]) == (0, 2, 2)   # resumes with epoch 0's validation


# -----------------------------------------------------------------------------
# 3. non-finite loss or gradient


def test_non_finite_loss_stops_naming_step_terms_and_ids(dataset, llm_dir, tmp_path, straight, monkeypatch):
    out = tmp_path / "run"
    real_rec, calls = M.ReportGenerator.loss_rec, []

    def rec_nan_at_step_1(self, *a):
        calls.append(1)
        loss = real_rec(self, *a)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(M.ReportGenerator, "loss_rec", rec_nan_at_step_1)
    with pytest.raises(FloatingPointError) as err:
        train_in_process(monkeypatch, *run_args(dataset, llm_dir, out))
    msg = str(err.value)
    order = train.epoch_indices(N_TRAIN, 4, epoch=0, seed=0, rank=0, world=1)
    ids = [f"train{i}" for i in order[4:8]]                   # the batch of step 1
    assert "non-finite loss at epoch 0 step 1" in msg and "'rec': nan" in msg and "'v2t': " in msg, msg
    assert str(ids) in msg and "last good checkpoint" in msg and "(epoch 0 step 1)" in msg, msg
    ckpt = train.load_checkpoint(out / "last.pt")
    assert ckpt["loop"]["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    monkeypatch.setattr(M.ReportGenerator, "loss_rec", real_rec)
    train_in_process(monkeypatch, *run_args(dataset, llm_dir, out, "--resume"))
    assert largest_difference(straight, weights(out))[0] < 1e-6          # the bad step was never applied


def test_non_finite_gradient_stops_before_the_step(dataset, llm_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_inf_at_step_1(params, max_norm, *a, **k):
        calls.append(1)
        norm = real_clip(params, max_norm, *a, **k)
        return norm * float("inf") if len(calls) == 2 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_inf_at_step_1)
    real_step, steps = torch.optim.AdamW.step, []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    with pytest.raises(FloatingPointError, match=r"non-finite gradient norm at epoch 0 step 1 .*study ids \['train"):
        train_in_process(monkeypatch, *run_args(dataset, llm_dir, out))
    assert len(steps) == 1 and train.load_checkpoint(out / "last.pt")["loop"]["step"] == 1


def test_a_run_that_crashes_with_loader_workers_running_exits(dataset, llm_dir, tmp_path):
    """An uncaught error in a step (here a simulated CUDA out-of-memory) ends the process with its
    traceback while the DataLoader's workers are alive. The workers ignore SIGTERM (so a signal to the
    whole process group lets the step finish); left to the interpreter's exit, which stops children with
    SIGTERM and waits for them, they kept the crashed run, and torchrun above it, waiting forever."""
    script = tmp_path / "train_oom_at_step_1.py"
    script.write_text(f"import runpy, sys, torch\nsys.path.insert(0, {REPO!r})\nimport model\n"
                      "real, calls = model.ReportGenerator.loss_rec, []\n"
                      "def rec_oom_at_step_1(self, *a):\n"
                      "    calls.append(1)\n"
                      "    if len(calls) == 2:\n"
                      "        raise torch.OutOfMemoryError('CUDA out of memory (simulated)')\n"
                      "    return real(self, *a)\n"
                      "model.ReportGenerator.loss_rec = rec_oom_at_step_1\n"
                      f"runpy.run_path({os.path.join(REPO, 'train.py')!r}, run_name='__main__')\n")
    args = run_args(dataset, llm_dir, tmp_path / "run", "--num_workers", "1")
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=REPO, env=env_without_java(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=240)   # ~15 s; before the fix it never returned
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("train.py crashed but did not exit: " + proc.communicate()[0][-2000:])
    assert proc.returncode == 1 and "OutOfMemoryError: CUDA out of memory (simulated)" in log, log[-2000:]


# -----------------------------------------------------------------------------
# 4. bad data in a run (each case's own check is in test_data.py)


def test_unreadable_training_image_is_replaced_logged_and_counted(llm_dir, tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    write_dataset(root)
    (root / "images" / "train5.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert train_in_process(monkeypatch, *run_args(root, llm_dir, tmp_path / "out", "--epochs", "1")) == [True]
    log = capsys.readouterr().out
    assert "skipped a training record (replaced by the next readable one): record 'train5'" in log
    assert "train5.png: cannot read image" in log
    assert "1 unreadable records replaced this epoch" in log
    assert "val BLEU-4" in log and "; 1 unreadable training records replaced" in log


def test_unreadable_validation_image_stops_and_the_run_resumes_after_the_fix(llm_dir, tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_dataset(root)
    good = (root / "images" / "val2.png").read_bytes()
    (root / "images" / "val2.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    with pytest.raises(data.DataError, match=r"record 'val2': .*val2.png: cannot read image"):
        train_in_process(monkeypatch, *run_args(root, llm_dir, out, "--epochs", "1"))
    loop = train.load_checkpoint(out / "last.pt")["loop"]
    assert (loop["epoch"], loop["step"]) == (0, 2)             # the epoch's training is kept
    (root / "images" / "val2.png").write_bytes(good)
    assert train_in_process(monkeypatch, *run_args(root, llm_dir, out, "--epochs", "1", "--resume")) == [True]


def test_bad_annotation_stops_at_start_up_naming_every_record(llm_dir, tmp_path, monkeypatch):
    root = tmp_path / "data"
    ann = write_dataset(root)
    ann["train"][3]["report"] = " \n "
    del ann["val"][1]["image_path"]                           # only the first failing split is reported
    ann["train"][7]["id"] = "train6"
    ann["test"][0]["report"] = "..."                          # empty only after cleaning
    (root / "annotation.json").write_text(json.dumps(ann))
    with pytest.raises(data.DataError) as err:
        train_in_process(monkeypatch, *run_args(root, llm_dir, tmp_path / "out"))
    msg = str(err.value)
    assert "2 bad record(s)" in msg and "record 'train3': empty report" in msg and "record 'train6': duplicate id" in msg
    del ann["train"][7], ann["val"][1]
    ann["train"][3]["report"] = "the heart is normal."
    (root / "annotation.json").write_text(json.dumps(ann))
    with pytest.raises(data.DataError, match=r"split 'test' have a report that is empty after cleaning.*'test0'"):
        train_in_process(monkeypatch, *run_args(root, llm_dir, tmp_path / "out"))


def test_studies_with_another_image_count_than_the_config_are_refused(dataset, llm_dir, tmp_path, monkeypatch):
    """One image per study read with images_per_study 2 (IU-Xray's): refused at start-up, before training."""
    with pytest.raises(data.DataError, match=r"annotation.json: the 'train' studies have 1 image\(s\) each, but "
                                             r"images_per_study is 2 .*--images_per_study 1"):
        train_in_process(monkeypatch, *run_args(dataset, llm_dir, tmp_path / "out"), "--images_per_study", "2")
    assert not (tmp_path / "out" / "last.pt").exists()


def test_bad_data_exits_with_the_message_and_no_traceback(tmp_path, llm_dir):
    root = tmp_path / "data"
    ann = write_dataset(root, n_train=4, n_val=1, n_test=1)
    os.remove(root / "images" / "val0.png")
    run = subprocess.run([sys.executable, "train.py", *run_args(root, llm_dir, tmp_path / "out")], cwd=REPO,
                         env=env_without_java(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "train.py: error:" in run.stderr and "record 'val0': image file" in run.stderr


# -----------------------------------------------------------------------------
# 5. bad checkpoints and options


def _config(**overrides):
    from dataclasses import asdict
    return asdict(M.tiny(**overrides))


def test_checkpoint_of_another_preset_or_ablation_is_refused():
    cfg = M.tiny()
    with pytest.raises(train.RunError, match="t2v: checkpoint False vs now True"):
        train.check_same_model(cfg, _config(t2v=False), "x.pt")
    with pytest.raises(train.RunError, match=r"vision: checkpoint 'facebook/vit-mae-large' vs now 'demo_data/vit_mae'.*vision_width: checkpoint 1024"):
        train.check_same_model(cfg, {**_config(), **M.paper().__dict__}, "x.pt")
    train.check_same_model(cfg, _config(lr=1.0, epochs=99), "x.pt")       # training settings may differ
    ckpt = {"config": _config(batch_size=8), "loop": {"n_train": 16}}
    with pytest.raises(train.RunError, match="batch_size: checkpoint 8 vs now 16"):
        train.check_resumable(cfg, ckpt, "x.pt", 16)
    with pytest.raises(train.RunError, match="trained on 16 training records, the annotation now has 20"):
        train.check_resumable(cfg, {**ckpt, "config": _config()}, "x.pt", 20)


def test_truncated_foreign_or_code_carrying_checkpoints_are_refused(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "config": {}}, good)
    assert train.load_checkpoint(good)["model"]["w"].shape == (1000,)
    blob = good.read_bytes()
    for cut in (len(blob) // 2, len(blob) - 30, 0):
        (tmp_path / "cut.pt").write_bytes(blob[:cut])
        with pytest.raises(train.RunError, match="cut.pt is truncated"):
            train.load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(train.RunError, match=r"not a train.py checkpoint .* lacks \['model', 'config'\]"):
        train.load_checkpoint(tmp_path / "other.pt")
    # a pickle that would run code when loaded: refused, and the code never runs
    marker = tmp_path / "ran"
    torch.save({"model": {}, "config": {}, "x": _RunsCode(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(train.RunError, match=r"refused .*evil.pt: it holds pickled Python objects .*could run "
                                             r"arbitrary code .*GLOBAL"):
        train.load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(train.RunError, match="no checkpoint at"):
        train.load_checkpoint(tmp_path / "missing.pt")


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))                   # unpickling would create the file


def test_resume_refuses_a_truncated_last_checkpoint(dataset, llm_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "last.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(train.RunError, match="last.pt is truncated"):
        train_in_process(monkeypatch, *run_args(dataset, llm_dir, out, "--resume"))


def test_a_new_run_never_overwrites_or_resumes_an_old_one_by_accident(dataset, llm_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(train.RunError, match="--resume: no checkpoint at"):
        train_in_process(monkeypatch, *run_args(dataset, llm_dir, out, "--resume"))
    (out / "last.pt").write_bytes(b"a run of days")
    with pytest.raises(train.RunError, match="last.pt already exists: add --resume to continue that run"):
        train_in_process(monkeypatch, *run_args(dataset, llm_dir, out))
    assert (out / "last.pt").read_bytes() == b"a run of days"


def test_unknown_and_mistyped_options_are_refused_listing_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--learning_rate", "1e-4", "--epoch", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unrecognized arguments: --learning_rate 1e-4 --epoch 3" in err
    assert "--epoch -> --epochs?" in err
    assert "valid options: --annotation --backbone --batch_size" in err and " --weight_decay" in err
    for bad in (["--epochs", "two"], ["--lr", "fast"], ["--t2v", "maybe"], ["--dataset", "chexpert"],
                ["--resize", "100"]):                     # a 112 crop from a 100-pixel edge
        with pytest.raises(SystemExit):
            train.parse_args(bad)
        assert "error: " in capsys.readouterr().err
    cfg, resume = train.parse_args(["--t2v", "false", "--lr", "3e-4"])   # and valid ones are taken
    assert cfg.t2v is False and cfg.lr == 3e-4 and not resume


# -----------------------------------------------------------------------------
# 6. a rank dies under torchrun --max-restarts


def _workers(parent_pid):
    """{RANK: pid} of the processes that torchrun started (Linux /proc)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent_pid:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            if b"RANK" in env:
                found[int(env[b"RANK"])] = int(pid)
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_torchrun_restarts_a_killed_rank_and_the_run_finishes(dataset, llm_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts",
           "1", "--monitor-interval", "0.5", script_without_test_evaluation(tmp_path), *run_args(dataset, llm_dir, out)]
    env = env_without_java(threads=1)
    # a session of its own: torchrun signals its process group, and a hang must not outlive the test
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    watchdog = threading.Timer(300, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    log, killed = [], None
    try:
        for line in proc.stdout:
            log.append(line)
            if killed is None and line.startswith("epoch 0 step 1/"):
                killed = _workers(proc.pid).get(1)
                assert killed, "".join(log)
                os.kill(killed, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
    text = "".join(log)
    assert killed and proc.returncode == 0, text[-4000:]
    assert "torchrun restart 1: resuming from" in text and "resumed from" in text, text[-4000:]
    loop = train.load_checkpoint(out / "last.pt")["loop"]
    assert loop["epoch"] == 2 and loop["global_step"] == STEPS and "test evaluation reached" in text


# -----------------------------------------------------------------------------
# 7. metrics that cannot run


def test_generated_reports_are_written_before_scoring(dataset, llm_dir, tmp_path, monkeypatch):
    """A scorer that fails after generation loses nothing: the predictions are on disk, to score again."""
    from transformers import AutoTokenizer
    cfg, _ = train.parse_args(run_args(dataset, llm_dir, tmp_path))
    tok = AutoTokenizer.from_pretrained(llm_dir)
    model = M.ReportGenerator(cfg, M.load_frozen_llm(cfg), tok)
    images = str(dataset / "images")
    records = {s: data.load_annotation(dataset / "annotation.json", s, images) for s in data.SPLITS}

    def scorer_fails(*a, **k):
        raise RuntimeError("a scorer died")

    monkeypatch.setattr(evaluate, "caption_scores_of", scorer_fails)
    monkeypatch.setattr(evaluate, "load_scorers", lambda *a, **k: {})
    with pytest.raises(RuntimeError, match="a scorer died"):
        evaluate.evaluate_split(model, cfg, "test", records, images, data.clean_report_mimic_cxr,
                                data.make_collate(tok, tok, 60, 64), tok, torch.device("cpu"), out_dir=str(tmp_path))
    with open(tmp_path / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [f"test{i}" for i in range(4)] and all(r["reference"] for r in rows)


# -----------------------------------------------------------------------------
# gradient accumulation (issue 6): micro-batches change nothing but memory


def test_micro_batches_give_the_weights_of_the_full_batch(dataset, llm_dir, tmp_path, straight, monkeypatch, capsys):
    """Reports of different lengths (3 to 14 words), so that the token weighting matters. Adam divides
    each gradient by its own running size, so for weights whose gradient nearly cancels, rounding
    (the gradients themselves agree to float precision: the next test) grows after a few steps: 2.7e-4
    in the weights, against 3.6e-3 for a plain average of the micro-batches' per-token means (both
    measured by hand on 2026-11-30, with the sin-cos position embeddings). The bound is one Adam step
    at lr 1e-3."""
    out = tmp_path / "micro"
    train_in_process(monkeypatch, *run_args(dataset, llm_dir, out, "--micro_batch_size", "2"))
    assert "2 micro-batches of 2 per process" in capsys.readouterr().out
    assert largest_difference(straight, weights(out))[0] < 1e-3


def test_micro_batch_gradients_equal_the_full_batch_gradient(dataset, llm_dir):
    """accumulate_gradients over micro-batches of 1 and of 2 leaves the gradient of the full batch of 4
    in .grad (reports of 3 to 14 words: a plain average of per-micro-batch token means would not)."""
    from contextlib import nullcontext
    from transformers import AutoTokenizer
    cfg, _ = train.parse_args(run_args(dataset, llm_dir, "unused"))
    tok = AutoTokenizer.from_pretrained(llm_dir)
    images = str(dataset / "images")
    records = data.load_annotation(dataset / "annotation.json", "train", images)[:4]
    ds = data.ReportDataset(records, images, data.clean_report_mimic_cxr, train=False, resize=64, crop=64)
    collate = data.make_collate(tok, tok, cfg.max_report_tokens, cfg.max_text_tokens)
    assert len({len(r.report.split()) for r in records}) > 1                 # the lengths differ
    torch.manual_seed(0)
    model = M.ReportGenerator(cfg, M.load_frozen_llm(cfg), tok)

    def grads(size):
        model.zero_grad(set_to_none=True)
        micro = [collate([ds[i] for i in range(j, j + size)]) for j in range(0, 4, size)]
        train.accumulate_gradients(model, micro, 4, 1, torch.device("cpu"), nullcontext())
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full = grads(4)
    for size in (1, 2):
        micro = grads(size)
        assert micro.keys() == full.keys()
        for n in full:
            torch.testing.assert_close(micro[n], full[n], rtol=1e-4, atol=1e-6, msg=f"{n}, micro-batches of {size}")


def test_micro_batch_size_must_divide_the_per_process_batch(dataset, llm_dir, tmp_path, monkeypatch):
    with pytest.raises(train.RunError, match=r"batch_size 4 must be a multiple of the number of processes \(1\) "
                                             r"times micro_batch_size \(3\)"):
        train_in_process(monkeypatch, *run_args(dataset, llm_dir, tmp_path, "--micro_batch_size", "3"))
