"""
Train the bidirectional report generator (Eq. 3), pick the checkpoint by validation BLEU-4, and
evaluate it on the test split.

    python train.py                                        # the built-in demo, end to end, on a CPU
    torchrun --nproc_per_node 4 train.py --dataset mimic   # the paper's MIMIC-CXR run
    python train.py --t2v false --rec false                # an ablation: any Config field, by name

A hand-written loop: DDP from torchrun's environment variables (gloo on CPU, nccl on GPU), bf16
autocast on GPU, AdamW with cosine annealing, atomic checkpoints that hold only trained weights plus
optimizer and loop state, and `--resume` to continue a stopped run where it stopped.
"""

import argparse
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from data import CLEANERS, ReportDataset, load_annotation, make_collate
from evaluate import caption_scores, clinical_scores, evaluate_split, generate_reports
from model import PRESETS, Config, ReportGenerator, config_from_dict, load_frozen_llm

DATASETS = {"demo": "demo", "iu_xray": "iu_xray", "mimic": "mimic_cxr", "mimic_cxr": "mimic_cxr"}


# -----------------------------------------------------------------------------
# Command line: every Config field is an option of the same name; unknown names are refused.


def parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model size; default: tiny for the demo, paper for iu_xray and mimic")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt")
    for f in fields(Config):
        kind = parse_bool if f.type is bool else f.type          # int, float or str
        p.add_argument(f"--{f.name}", type=kind, default=None, metavar=f.type.__name__.upper(),
                       help=f"default: {f.default!r} (tiny preset)")
    args = p.parse_args(argv)
    if args.dataset is not None:
        if args.dataset not in DATASETS:
            p.error(f"--dataset must be one of {sorted(DATASETS)}, got {args.dataset!r}")
        args.dataset = DATASETS[args.dataset]
    dataset = args.dataset or "demo"
    preset = args.preset or ("tiny" if dataset == "demo" else "paper")
    overrides = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    if dataset != "demo":
        overrides.setdefault("data_dir", os.path.join("data", dataset))
        overrides.setdefault("out_dir", os.path.join("out", dataset))
        overrides.setdefault("images_per_study", 2 if dataset == "iu_xray" else 1)
    return PRESETS[preset](**overrides), args.resume


# -----------------------------------------------------------------------------
# Distributed setup


def setup_distributed():
    """(rank, world_size, device) from torchrun's environment; a single process otherwise."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# Checkpoints: a plain dict of tensors and numbers, written atomically, loaded without unpickling code


def save_checkpoint(path, model, cfg, optimizer=None, loop=None, metrics=None):
    state = {"model": model.trainable_state_dict(), "config": asdict(cfg), "loop": loop or {},
             "metrics": metrics or {}}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)                       # atomic: a reader sees the old file or the new one


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot load checkpoint {path}: {e}") from e


def check_same_model(cfg: Config, saved: dict, path: str):
    """Resuming or evaluating with different model fields would silently load mismatched weights."""
    model_fields = ("llm", "vision", "patch_size", "vision_width", "vision_layers", "text_encoder",
                    "text_width", "text_layers", "t2v", "rec", "images_per_study", "image_size")
    diff = {k: (saved.get(k), getattr(cfg, k)) for k in model_fields if saved.get(k) != getattr(cfg, k)}
    if diff:
        raise ValueError(f"{path} was trained with a different model: " +
                         ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items()))


# -----------------------------------------------------------------------------
# Data order: the same global batches for any number of ranks, and resumable mid-epoch


def epoch_indices(n, batch_size, epoch, seed, rank, world, start_step=0):
    """This rank's sample indices for one epoch, from global step `start_step` on.

    Global batch j is order[j*B:(j+1)*B] whatever the world size; rank r takes its contiguous slice
    of it, so 1 process and N processes see exactly the same global batches."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    steps, b = n // batch_size, batch_size // world
    return [order[j * batch_size + rank * b + i] for j in range(start_step, steps) for i in range(b)]


def get_lr(step, total_steps, cfg: Config):
    """Cosine annealing from cfg.lr to cfg.min_lr over the whole run (Sec. 4.1)."""
    progress = min(step / max(1, total_steps), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg, resume = parse_args(argv)
    hf_logging.disable_progress_bar()
    rank, world, device = setup_distributed()
    master = rank == 0
    torch.manual_seed(cfg.seed + rank)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    use_cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else nullcontext()

    if cfg.dataset == "demo":
        # The demo makes its data, pre-trains its frozen LLM (never on test reports) and labels every
        # image's view with a classifier trained on training images (Sec. 3), the first time only.
        if master:
            import demo
            import view_classifier
            demo.ensure_demo(cfg.data_dir, cfg.llm)
            view_classifier.ensure_views(cfg.data_dir, labels="demo")
        if world > 1:
            dist.barrier()
    ann = os.path.join(cfg.data_dir, cfg.annotation or ("annotation_views.json" if os.path.exists(
        os.path.join(cfg.data_dir, "annotation_views.json")) else "annotation.json"))
    images_root = os.path.join(cfg.data_dir, "images")
    cleaner = CLEANERS["mimic_cxr" if cfg.dataset == "demo" else cfg.dataset]
    records = {s: load_annotation(ann, s, images_root) for s in ("train", "val", "test")}
    labeller = None
    if cfg.dataset == "demo":                 # the demo's findings can be read back from any report
        from demo import parse_findings as labeller
    print0(f"data: {ann}: " + ", ".join(f"{s} {len(r)}" for s, r in records.items()))
    if cfg.t2v and any(r.views is None for r in records["train"]):
        print0(f"note: {ann} has no 'views' field, so the text-to-vision branch reads each report without "
               "its view (Sec. 3 appends it); run view_classifier.py to write annotation_views.json")

    tokenizer = AutoTokenizer.from_pretrained(cfg.llm)
    text_tokenizer = AutoTokenizer.from_pretrained(cfg.text_tokenizer) if cfg.text_tokenizer else tokenizer
    collate = make_collate(tokenizer, text_tokenizer, cfg.max_report_tokens, cfg.max_text_tokens)
    train_ds = ReportDataset(records["train"], images_root, cleaner, train=True, resize=cfg.resize,
                             crop=cfg.image_size, seed=cfg.seed)
    val_ds = ReportDataset(records["val"], images_root, cleaner, train=False, resize=cfg.resize,
                           crop=cfg.image_size)

    model = ReportGenerator(cfg, load_frozen_llm(cfg), tokenizer, text_tokenizer).to(device)
    counts = model.parameter_counts()
    print0("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    print0("trained modules: " + ", ".join(sorted({n.split(".")[0] for n, p in model.named_parameters()
                                                   if p.requires_grad})))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],   # no decay on biases/norms
        lr=cfg.lr, betas=(0.9, 0.999), fused=use_cuda)

    steps_per_epoch = len(train_ds) // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch
    loop = {"epoch": 0, "step": 0, "global_step": 0, "best_bleu4": -1.0}
    os.makedirs(cfg.out_dir, exist_ok=True)
    last_path, best_path = os.path.join(cfg.out_dir, "last.pt"), os.path.join(cfg.out_dir, "best.pt")
    if resume:
        if not os.path.exists(last_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {last_path}")
        ckpt = load_checkpoint(last_path)
        check_same_model(cfg, ckpt["config"], last_path)
        model.load_trainable_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loop = ckpt["loop"]
        print0(f"resumed from {last_path}: epoch {loop['epoch']}, step {loop['step']}")
    raw_model = model
    if world > 1:
        model = DDP(model, device_ids=[device.index] if use_cuda else None)

    def checkpoint_now(epoch, step):
        if master:
            save_checkpoint(last_path, raw_model, cfg, optimizer,
                            {**loop, "epoch": epoch, "step": step})

    print0(f"training: {cfg.epochs} epochs x {steps_per_epoch} steps, global batch {cfg.batch_size} "
           f"on {world} x {device.type}")
    t_start = time.time()
    for epoch in range(loop["epoch"], cfg.epochs):
        train_ds.set_epoch(epoch)
        start = loop["step"] if epoch == loop["epoch"] else 0
        order = epoch_indices(len(train_ds), cfg.batch_size, epoch, cfg.seed, rank, world, start)
        loader = DataLoader(train_ds, batch_size=cfg.batch_size // world, sampler=order,
                            collate_fn=collate, num_workers=cfg.num_workers, drop_last=True)
        model.train()
        t0 = time.time()
        for step, batch in enumerate(loader, start=start):
            lr = get_lr(loop["global_step"], total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                losses = model(batch["pixel_values"].to(device), batch["report_ids"].to(device),
                               batch["report_mask"].to(device), batch["text_ids"].to(device),
                               batch["text_mask"].to(device))
            loss = losses["loss"]
            finite = torch.isfinite(loss.detach()).float()
            if world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() < 1:
                terms = {k: round(v.item(), 4) for k, v in losses.items()}
                raise FloatingPointError(f"non-finite loss at epoch {epoch} step {step}: {terms}; "
                                         f"study ids {batch['ids']}; the last good checkpoint is {last_path}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loop["global_step"] += 1
            if step % cfg.log_every == 0 or step == steps_per_epoch - 1:
                dt = (time.time() - t0) / (step - start + 1)
                terms = " ".join(f"{k} {v.item():.4f}" for k, v in losses.items() if k != "loss")
                print0(f"epoch {epoch} step {step}/{steps_per_epoch} loss {loss.item():.4f} ({terms}) "
                       f"lr {lr:.2e} {dt * 1000:.0f} ms/step {cfg.batch_size / dt:.1f} samples/s")
            if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < steps_per_epoch:
                checkpoint_now(epoch, step + 1)

        # Validation BLEU-4 over the whole split (every rank generates a shard; scored once) picks the
        # checkpoint to keep (Sec. 4.1).
        rows = generate_reports(raw_model, val_ds, collate, tokenizer, cleaner, cfg, device, autocast)
        if master:
            refs, hyps = [r["reference"] for r in rows], [r["generated"] for r in rows]
            bleu4 = caption_scores(refs, hyps, meteor=False)["BLEU_4"]
            improved = bleu4 > loop["best_bleu4"]
            clinical = f", clinical F1 {clinical_scores(refs, hyps, labeller)['f1']:.3f}" if labeller else ""
            print0(f"epoch {epoch}: val BLEU-4 {bleu4:.4f}{clinical}{' (best so far, saved)' if improved else ''} "
                   f"[{time.time() - t_start:.0f} s]")
            if improved:
                loop["best_bleu4"] = bleu4
                save_checkpoint(best_path, raw_model, cfg, metrics={"val_BLEU_4": bleu4, "epoch": epoch})
        if world > 1:
            best = torch.tensor([loop["best_bleu4"]])
            dist.broadcast(best, 0)
            loop["best_bleu4"] = best.item()
        checkpoint_now(epoch + 1, 0)

    # The test split, with the checkpoint that validation chose.
    raw_model.load_trainable_state_dict(load_checkpoint(best_path)["model"])
    evaluate_split(raw_model, cfg, "test", records, images_root, cleaner, collate, tokenizer, device,
                   autocast, out_dir=cfg.out_dir, labeller=labeller)
    if world > 1:
        del model, optimizer
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
