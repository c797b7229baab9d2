"""DDP correctness: torchrun with 2 processes (gloo, CPU) ends with the weights of 1 process on the same
global batches (train.epoch_indices gives every world size the same global batches)."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

import demo
from conftest import env_without_java, largest_difference
from data import clean_report_mimic_cxr
from view_classifier import write_annotation_with_views

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = 1e-3


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """16 training studies (2 steps of 8 per epoch), 2 + 2 to evaluate; the true views as the T2V views
    (so train.py does not train the view classifier); a demo LLM after one pre-training step."""
    root = tmp_path_factory.mktemp("demo")
    demo.make_demo_dataset(root, n_train=16, n_val=2, n_test=2, seed=5)
    demo.pretrain_demo_llm(root, str(root / "llm"), steps=1, batch_size=4)
    with open(root / "views.csv") as f:
        views = {row["image_path"]: row["view"] for row in csv.DictReader(f)}
    write_annotation_with_views(root / "annotation.json", root / "annotation_views.json", views)
    return root


def report_lengths(root):
    tok = AutoTokenizer.from_pretrained(root / "llm")
    reports = [clean_report_mimic_cxr(e["report"]) for e in json.loads((root / "annotation.json").read_text())["train"]]
    return [len(ids) for ids in tok(reports, add_special_tokens=False).input_ids]


def train_weights(root, out, nproc, *extra):
    """train.py's trained weights after 2 epochs x 2 steps of global batch 8, on `nproc` processes."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--standalone", "--nproc_per_node", str(nproc)]
    args = ["--data_dir", str(root), "--llm", str(root / "llm"), "--vision", "", "--out_dir", str(out), "--epochs", "2",
            "--batch_size", "8", "--lr", str(LR), "--eval_batch_size", "2", "--num_workers", "0",
            "--max_new_tokens", "2", "--ckpt_every", "0", "--log_every", "100", *extra]
    # one thread per process in both runs (torchrun's default for 2 processes)
    env = env_without_java(threads=1)
    run = subprocess.run([*launcher, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert f"global batch 8 on {nproc} x cpu" in run.stdout
    with open(out / "predictions_test.csv") as f:             # every rank's shard, gathered by rank 0
        assert [r["id"] for r in csv.DictReader(f)] == ["test-00000", "test-00001"]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["loop"]["global_step"] == 4
    return ckpt["model"]


@pytest.fixture(scope="module")
def one_process(small_demo, tmp_path_factory):
    """A single-process run: its out_dir (best.pt, the test split's predictions and metrics) and weights."""
    out = tmp_path_factory.mktemp("one")
    return out, train_weights(small_demo, out, 1)


def test_two_processes_end_with_the_weights_of_one(small_demo, one_process, tmp_path):
    """All three losses on; reports of different lengths. Adam moves each weight by about lr per step;
    the runs must agree to a hundredth of one step. Rounding alone leaves ~2e-6 here; a real difference
    moves weights by ~lr: a rank-dependent crop or seed, a gradient not averaged, clipping before the
    all-reduce, or L_VTC averaged per process (each process's mean over its own report tokens, then DDP's
    mean of those means, weighs a token by 1/(2 x its process's token count) instead of 1/(the global
    batch's token count): 4e-3 here before train.py weighted each micro-batch by its share of the tokens)."""
    assert len(set(report_lengths(small_demo))) > 1                 # so the token weighting matters
    one = one_process[1]
    for name, extra in (("two", ()), ("two, accumulating", ("--micro_batch_size", "2"))):
        two = train_weights(small_demo, tmp_path / name, 2, *extra)
        diff, param = largest_difference(one, two)
        assert diff < 1e-2 * LR, (name, diff, param)


def test_evaluate_py_under_torchrun_writes_and_scores_what_one_process_does(one_process, tmp_path):
    """Each rank generates its shard of the test split (study r, r+W, ...); rank 0 gathers the shards in
    order, writes the predictions and scores the whole split once. The single-process reference is the
    test evaluation at the end of the one-process training run, from the same best.pt."""
    out, _ = one_process
    shutil.copy(out / "best.pt", tmp_path / "best.pt")       # evaluate.py writes next to the checkpoint
    env = {**env_without_java(threads=1), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "evaluate.py", "--ckpt", str(tmp_path / "best.pt")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.count("test split, 2 studies") == 1                # scored once, by rank 0
    assert (tmp_path / "predictions_test.csv").read_text() == (out / "predictions_test.csv").read_text()
    two, one = (json.loads((d / "metrics_test.json").read_text())["model"] for d in (tmp_path, out))
    assert {k: v for k, v in two.items() if k != "reports_per_second"} == \
        {k: v for k, v in one.items() if k != "reports_per_second"}
