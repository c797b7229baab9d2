"""train.py end to end on a miniature demo: command line, checkpoints, resume, the test evaluation."""
import csv
import json
import os

import pytest
import torch

import demo
import train


@pytest.fixture(scope="module")
def mini_demo(tmp_path_factory):
    """A 32/8/8-study demo with a briefly pre-trained LLM and ViT-MAE (seconds, not minutes)."""
    root = tmp_path_factory.mktemp("demo")
    demo.make_demo_dataset(root, n_train=32, n_val=8, n_test=8, seed=3)
    demo.pretrain_demo_llm(root, str(root / "llm"), steps=10, batch_size=4)
    demo.pretrain_demo_encoder(root, str(root / "vit_mae"), steps=2, batch_size=4)
    return root


def args(root, out, *extra):
    return ["--data_dir", str(root), "--llm", str(root / "llm"), "--vision", str(root / "vit_mae"), "--out_dir", str(out), "--epochs", "2",
            "--batch_size", "8", "--eval_batch_size", "8", "--num_workers", "0", "--max_new_tokens", "8",
            "--ckpt_every", "2", "--log_every", "100", *extra]


def test_dataset_mimic_selects_the_paper_preset():
    cfg, _ = train.parse_args(["--dataset", "mimic"])
    assert cfg.dataset == "mimic_cxr" and cfg.llm == "meta-llama/Llama-2-7b-chat-hf" and cfg.lr == 1e-4
    assert cfg.batch_size == 4 and cfg.num_beams == 3 and cfg.data_dir == os.path.join("data", "mimic_cxr")


def test_epoch_indices_give_the_same_global_batches_for_any_world_size():
    one = train.epoch_indices(40, 8, epoch=1, seed=0, rank=0, world=1)
    two = [train.epoch_indices(40, 8, epoch=1, seed=0, rank=r, world=2) for r in range(2)]
    for step in range(5):
        assert sorted(one[step * 8:(step + 1) * 8]) == sorted(two[0][step * 4:(step + 1) * 4] +
                                                              two[1][step * 4:(step + 1) * 4])
    assert train.epoch_indices(40, 8, 1, 0, 0, 1, start_step=3) == one[24:]


def test_train_writes_checkpoints_and_evaluates_the_test_split(mini_demo, tmp_path, monkeypatch):
    # relative data and LLM paths, as `python train.py` passes them (demo_data, demo_data/llm)
    monkeypatch.chdir(mini_demo.parent)
    train.main(args(mini_demo.relative_to(mini_demo.parent), tmp_path))
    assert os.path.exists(mini_demo / "annotation_views.json")        # the views copy was written and read
    best = torch.load(tmp_path / "best.pt", weights_only=True)       # no pickled code needed
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert not any(k.startswith("llm.") for k in best["model"])      # the frozen LLM is never saved
    assert "optimizer" in last and last["loop"]["epoch"] == 2 and last["loop"]["global_step"] == 8
    with open(tmp_path / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(r["reference"] for r in rows)
    metrics = json.load(open(tmp_path / "metrics_test.json"))
    assert set(metrics) == {"model", "most frequent report", "nearest training image"}
    assert 0 <= metrics["model"]["BLEU_4"] <= 1
    # the demo's clinical scores, micro and per finding, as label_scores gives them for the predictions
    import demo
    import evaluate
    expected = evaluate.label_scores([demo.parse_findings(r["reference"]) for r in rows],
                                     [demo.parse_findings(r["generated"]) for r in rows])
    clinical = {k: v for k, v in metrics["model"].items() if k.startswith("clinical_")}
    assert clinical == pytest.approx({f"clinical_{k}": v for k, v in expected.items()})
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]     # atomic writes leave no temp files


def test_resume_refuses_a_checkpoint_of_another_model(mini_demo, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "evaluate_split", lambda *a, **k: None)
    train.main(args(mini_demo, tmp_path, "--epochs", "1"))
    with pytest.raises(ValueError, match="t2v: checkpoint True vs now False"):
        train.main(args(mini_demo, tmp_path, "--t2v", "false", "--resume"))


def test_cuda_runs_keep_the_cudnn_attention_kernel_off(monkeypatch):
    """train.py and evaluate.py set up through setup_distributed, which turns PyTorch's cuDNN attention off
    on CUDA (its backward gives NaN for the fully masked rows of left padding: model.use_safe_attention_kernels)."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    try:
        assert train.setup_distributed()[2].type == "cuda"
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
