"""
Train the bidirectional report generator (Eq. 3), pick the checkpoint by validation BLEU-4, and
evaluate it on the test split.

    python train.py                                        # the built-in demo, end to end, on a CPU
    torchrun --nproc_per_node 4 train.py --dataset mimic   # the paper's MIMIC-CXR run
    python train.py --t2v false --rec false                # an ablation: any Config field, by name

A hand-written loop: DDP from torchrun's environment variables (gloo on CPU, nccl on GPU), bf16
autocast on GPU, AdamW with cosine annealing, gradient accumulation (--micro_batch_size), atomic
checkpoints that hold only trained weights plus optimizer and loop state, and --resume to continue a
stopped run where it stopped.

What ends a run, and how it continues (each case is tried by tests/test_faults.py):
  killed (SIGKILL, a crash, a lost node)  checkpoints are written to a temporary file and renamed,
                                          so <out_dir>/last.pt is always the last whole one: --resume
  SIGTERM, Ctrl-C (preemption)            the step finishes, last.pt is saved, exit code 128 + signal
                                          (143, 130): --resume
  a rank dies under torchrun              with --max-restarts N the restarted workers resume from
                                          last.pt by themselves
  a non-finite loss or gradient           stops before the step is applied, naming the step, the loss
                                          terms and the study ids; last.pt keeps the last good weights
  an unreadable training image            replaced by the next readable record, logged and counted
  any other bad input or checkpoint       refused at start-up with a message naming it (data.py)
A fresh run refuses an <out_dir> that already holds last.pt, so it can never be overwritten (or
resumed) by accident.
"""

import argparse
import difflib
import glob
import math
import os
import pickle
import signal
import sys
import time
import zipfile
from contextlib import closing, contextmanager, nullcontext
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from transformers.utils import logging as hf_logging

from data import (CLEANERS, DataError, ReportDataset, annotation_path, check_images_per_study, clean_reports,
                  load_annotation, make_collate)
from evaluate import caption_scores, clinical_scores, evaluate_split, generate_reports
from model import (PRESETS, Config, ReportGenerator, load_frozen_llm, load_tokenizer, parse_bool,
                   use_safe_attention_kernels)

DATASETS = {"demo": "demo", "iu_xray": "iu_xray", "mimic": "mimic_cxr", "mimic_cxr": "mimic_cxr"}


class RunError(ValueError):
    """A run that must not start or continue as asked (a checkpoint, the out_dir, the options); the
    message says what and how to go on."""


# -----------------------------------------------------------------------------
# Command line: every Config field is an option of the same name; unknown names are refused.


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model size; default: tiny for the demo, paper for iu_xray and mimic")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out_dir>/last.pt (automatic when torchrun restarts the workers)")
    for f in fields(Config):
        kind = parse_bool if f.type is bool else f.type          # int, float or str
        p.add_argument(f"--{f.name}", type=kind, default=None, metavar=f.type.__name__.upper(),
                       help=f"default: {f.default!r} (tiny preset)")
    args, unknown = p.parse_known_args(argv)
    if unknown:
        valid = ["--preset", "--resume"] + [f"--{f.name}" for f in fields(Config)]
        hints = [f"{u} -> {close[0]}?" for u in unknown if u.startswith("--")
                 for close in [difflib.get_close_matches(u.split("=")[0], valid, n=1)] if close]
        p.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean: {', '.join(hints)})" if hints else "")
                + f"\nvalid options: {' '.join(sorted(valid))}")
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
    try:
        return PRESETS[preset](**overrides), args.resume
    except ValueError as e:                              # Config refuses a combination: say it as a usage error
        p.error(str(e))


# -----------------------------------------------------------------------------
# Distributed setup


def setup_distributed():
    """(rank, world_size, device) from torchrun's environment; a single process otherwise."""
    use_safe_attention_kernels()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's store outlives a restart of the workers (--max-restarts), and torch 2.14 keeps no
        # per-attempt namespace in it: restarted workers can read the dead workers' addresses and fail
        # to connect, or wait forever (pytorch issue 135712). A prefix per attempt keeps them apart.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
        store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    else:
        dist.init_process_group(backend)
    return rank, world, device


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def gather(obj, world) -> list:
    """Every rank's `obj`, in rank order (for error messages: rare, so an object collective is fine)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# -----------------------------------------------------------------------------
# Checkpoints: a plain dict of tensors and numbers, written atomically, loaded without unpickling code


def save_checkpoint(path, model, cfg, optimizer=None, loop=None, metrics=None):
    state = {"model": model.trainable_state_dict(), "config": asdict(cfg), "loop": loop or {},
             "metrics": metrics or {}}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    # A process killed mid-write leaves only the temporary file (removed at the next start-up); the
    # rename is atomic, so `path` is always the previous whole checkpoint or the new whole one. fsync
    # first, so that after a machine crash the new name cannot point at data never written to disk.
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_partial_checkpoints(out_dir) -> list[str]:
    """Delete the temporary files of checkpoint writes that a killed run never finished."""
    partial = glob.glob(os.path.join(glob.escape(out_dir), "*.pt.tmp.*"))
    for path in partial:
        os.remove(path)
    return partial


def load_checkpoint(path, need=("model", "config")) -> dict:
    """A checkpoint written by save_checkpoint, or RunError saying why not.

    weights_only=True: tensors, numbers, strings and plain containers only. A file that needs any
    other object (a class, a function: what a pickle uses to run code) is refused, never unpickled."""
    if not os.path.isfile(path):
        raise RunError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):     # torch.save writes a zip: this is a cut or foreign file
            raise RunError(f"{path} is truncated or not a checkpoint (not a whole torch.save file)") from e
        msg = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise RunError(f"refused {path}: it holds pickled Python objects other than tensors and plain "
                       f"containers, and unpickling them could run arbitrary code ({msg})") from e
    except Exception as e:                   # zip without its central directory, short read, ...
        raise RunError(f"{path} is truncated or corrupt, cannot load it ({type(e).__name__}: {e})") from e
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise RunError(f"{path} is not a train.py checkpoint with {list(need)}: it lacks {missing}")
    return ckpt


# Config fields that change the trained weights' shapes or meaning: a checkpoint is only valid for these.
MODEL_FIELDS = ("llm", "vision", "patch_size", "vision_width", "vision_layers", "vision_heads", "decoder_width",
                "decoder_layers", "decoder_heads", "text_encoder", "text_tokenizer", "text_width", "text_layers",
                "text_heads", "backbone", "t2v", "rec", "clip", "clip_dim", "images_per_study", "image_size")


def check_same_model(cfg: Config, saved: dict, path: str, names=MODEL_FIELDS):
    """Resuming or evaluating with different model fields (another preset, another ablation) would load
    mismatched weights, or fail with a bare shape error."""
    diff = {k: (saved.get(k), getattr(cfg, k)) for k in names if saved.get(k) != getattr(cfg, k)}
    if diff:
        raise RunError(f"{path} was trained with a different model: " +
                       ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items()))


def check_resumable(cfg: Config, ckpt: dict, path: str, n_train: int):
    """The same model, and the same global batches: the saved step counts mean nothing otherwise.
    The number of processes and micro_batch_size may change (epoch_indices and the accumulation give
    every layout the same steps)."""
    check_same_model(cfg, ckpt["config"], path, MODEL_FIELDS + ("batch_size", "seed"))
    if ckpt["loop"].get("n_train", n_train) != n_train:
        raise RunError(f"{path} was trained on {ckpt['loop']['n_train']} training records, the annotation "
                       f"now has {n_train}: its batches are not these")


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
# One step's gradient, over micro-batches


def accumulate_gradients(model, micro_batches, batch_size, world, device, autocast):
    """Forward and backward over this process's micro-batches of one step, leaving in .grad the gradient
    of Eq. 3 over the whole global batch of `batch_size` samples. Returns the loss term names and, per
    micro-batch, its terms as the model gave them and weighted by its share of the global batch (summed
    over micro-batches and processes, the weighted terms are the global batch's).

    The model gives a micro-batch's L_VTC as a mean over its report tokens, and its other terms as means
    over its samples (model.py). Weighting each micro-batch by its share of the global batch's tokens
    (L_VTC) or samples (the others) makes the accumulated gradient exactly that of the full-batch loss,
    for any micro_batch_size and any number of processes. (A plain average of micro-batch means would
    not: it weighs each token of a short report more than one of a long report.) The CLIP row's
    contrastive loss is the exception: its negatives are the studies of the micro-batches that the
    processes hold at the same time, not the whole global batch."""
    tokens = torch.tensor(float(sum(m["report_mask"].sum() for m in micro_batches)), device=device)
    if world > 1:
        dist.all_reduce(tokens)
    tokens = tokens.item()                                          # the global batch's report tokens
    raw, weighted = [], []
    for k, m in enumerate(micro_batches):
        # DDP all-reduces the gradients in the backward of the last micro-batch only
        with model.no_sync() if world > 1 and k < len(micro_batches) - 1 else nullcontext():
            with autocast:
                losses = model(m["pixel_values"].to(device), m["report_ids"].to(device), m["report_mask"].to(device),
                               m["text_ids"].to(device), m["text_mask"].to(device))
            token_share = m["report_mask"].sum().item() / tokens    # of the global batch's report tokens
            sample_share = len(m["ids"]) / batch_size                # of its samples
            # losses["loss"] - losses["v2t"] = lambda1 L_TVC + lambda2 L_REC (+ CLIP): the per-sample terms
            loss = token_share * losses["v2t"] + sample_share * (losses["loss"] - losses["v2t"])
            (world * loss).backward()          # DDP averages the processes' gradients: `world *` makes it their sum
        share = {name: token_share if name == "v2t" else sample_share for name in losses if name != "loss"}
        raw.append(torch.stack([losses["loss"].detach()] + [losses[name].detach() for name in share]))
        weighted.append(torch.stack([loss.detach()] + [share[name] * losses[name].detach() for name in share]))
    return ["loss", *share], raw, weighted


# -----------------------------------------------------------------------------
# Stopping cleanly on SIGTERM (schedulers send it before preemption) and Ctrl-C


@contextmanager
def stop_signals(rank):
    """During the training steps, SIGTERM and SIGINT only set a flag (the yielded list gets the signal
    number); the loop reads it at the end of each step, in the same all-reduce on every rank, saves
    last.pt and exits. Repeats are ignored: torchrun passes the terminal's Ctrl-C on to its workers
    as a second signal. Outside the steps (start-up, validation, test) the signals act as usual."""
    received = []

    def handle(signum, frame):
        if not received:                   # os.write: print() is not safe inside a signal handler
            os.write(sys.stderr.fileno(), f"[rank {rank}] {signal.Signals(signum).name}: stopping at the end of "
                     "this step (SIGKILL stops at once)\n".encode())
        received.append(signum)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def batches_of(loader):
    """The loader's batches. Closing this generator (`with closing(...)`, as the training loop does)
    frees the loader's iterator, which shuts its worker processes down, also when a step raises. They
    ignore SIGTERM (ignore_stop_signals); left alive in a traceback until interpreter exit, they would
    be sent SIGTERM there and waited for, forever."""
    yield from loader


def ignore_stop_signals(worker_id):
    # DataLoader workers: a Ctrl-C reaches the whole process group, and a worker that died of it
    # would fail the main process before it reaches the end of the step
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg, resume = parse_args(argv)
    hf_logging.disable_progress_bar()
    rank, world, device = setup_distributed()
    master = rank == 0
    micro = cfg.micro_batch_size or cfg.batch_size // world
    if micro < 1 or cfg.batch_size % (world * micro):
        raise RunError(f"batch_size {cfg.batch_size} must be a multiple of the number of processes ({world}) "
                       f"times micro_batch_size ({micro}): every step takes {cfg.batch_size} samples, split "
                       "evenly over the processes, then into micro-batches of micro_batch_size")
    accum = cfg.batch_size // (world * micro)            # micro-batches per process per step
    use_cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else nullcontext()

    # Resume, start, or refuse: decided before anything slow is loaded.
    os.makedirs(cfg.out_dir, exist_ok=True)
    last_path, best_path = os.path.join(cfg.out_dir, "last.pt"), os.path.join(cfg.out_dir, "best.pt")
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and not resume:              # torchrun --max-restarts restarted the workers after a failure
        resume = os.path.exists(last_path)
        print0(f"torchrun restart {restarts}: " + (f"resuming from {last_path}" if resume else
                                                   f"no {last_path} was written yet, starting from the beginning"))
    if resume and not os.path.exists(last_path):
        raise RunError(f"--resume: no checkpoint at {last_path}")
    if not resume and os.path.exists(last_path):
        raise RunError(f"{last_path} already exists: add --resume to continue that run (a finished run goes "
                       "straight to the test evaluation), or delete it or choose another --out_dir to start anew")
    if master:
        for path in remove_partial_checkpoints(cfg.out_dir):
            print0(f"removed {path}: a checkpoint that a killed run left half-written")

    if cfg.dataset == "demo":
        # The demo makes its data, pre-trains its frozen LLM (never on test reports) and its ViT-MAE (on
        # training images; cfg.vision, demo_data/vit_mae by default, "" = a random encoder) and labels every
        # image's view with a classifier trained on training images (Sec. 3), the first time only.
        if master:
            import demo
            demo.ensure_demo(cfg.data_dir, cfg.llm, vision_dir=cfg.vision if cfg.backbone == "mae" else None,
                             cfg=cfg, views=True)
        if world > 1:
            dist.barrier()
    ann = annotation_path(cfg.data_dir, cfg.annotation)
    images_root = os.path.join(cfg.data_dir, "images")
    cleaner = CLEANERS[cfg.dataset]
    # Every annotation problem stops the run here, at start-up (data.load_annotation), the test split's
    # included, rather than after days of training.
    records = {s: load_annotation(ann, s, images_root) for s in ("train", "val", "test")}
    check_images_per_study(records, cfg.images_per_study, ann)
    clean_reports(records["test"], cleaner)
    labeller = None
    if cfg.dataset == "demo":                 # the demo's findings can be read back from any report
        from demo import parse_findings as labeller
    print0(f"data: {ann}: " + ", ".join(f"{s} {len(r)}" for s, r in records.items()))
    if cfg.t2v and any(r.views is None for r in records["train"]):
        print0(f"note: {ann} has no 'views' field, so the text-to-vision branch reads each report without "
               "its view (Sec. 3 appends it); run view_classifier.py to write annotation_views.json")

    tokenizer = load_tokenizer(cfg.llm)
    text_tokenizer = load_tokenizer(cfg.text_tokenizer) if cfg.text_tokenizer else tokenizer
    collate = make_collate(tokenizer, text_tokenizer, cfg.max_report_tokens, cfg.max_text_tokens)
    # An unreadable training image is found only when it is decoded, maybe days in: it is replaced by
    # the next readable record, logged and counted. Validation and test images are never replaced.
    train_ds = ReportDataset(records["train"], images_root, cleaner, train=True, resize=cfg.resize,
                             crop=cfg.image_size, seed=cfg.seed, substitute_bad_images=True)
    val_ds = ReportDataset(records["val"], images_root, cleaner, train=False, resize=cfg.resize,
                           crop=cfg.image_size)

    # Seeded here, after the demo's first-time set-up, which draws from the same generator: seeded before
    # it, a fresh `python train.py` and a second one on the existing demo_data trained different models.
    torch.manual_seed(cfg.seed + rank)
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
    loop = {"epoch": 0, "step": 0, "global_step": 0, "best_bleu4": -1.0, "skipped": 0, "n_train": len(train_ds)}
    if resume:
        ckpt = load_checkpoint(last_path, need=("model", "config", "optimizer", "loop"))
        check_resumable(cfg, ckpt, last_path, len(train_ds))
        model.load_trainable_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loop.update(ckpt["loop"])
        print0(f"resumed from {last_path}: epoch {loop['epoch']}, step {loop['step']}")
    raw_model = model
    if world > 1:
        model = DDP(model, device_ids=[device.index] if use_cuda else None)
    last_good = f"{last_path} (epoch {loop['epoch']} step {loop['step']})" if resume else "none: no checkpoint yet"

    def checkpoint_now(epoch, step):
        nonlocal last_good
        if master:
            save_checkpoint(last_path, raw_model, cfg, optimizer, {**loop, "epoch": epoch, "step": step})
        last_good = f"{last_path} (epoch {epoch} step {step})"

    print0(f"training: {cfg.epochs} epochs x {steps_per_epoch} steps, global batch {cfg.batch_size} "
           f"on {world} x {device.type}" + (f", {accum} micro-batches of {micro} per process" if accum > 1 else ""))
    t_start, stopped_by = time.time(), 0
    for epoch in range(loop["epoch"], cfg.epochs):
        train_ds.set_epoch(epoch)
        start = loop["step"] if epoch == loop["epoch"] else 0
        if start == 0:
            loop["skipped"] = 0                # unreadable training records replaced, this epoch
        order = epoch_indices(len(train_ds), cfg.batch_size, epoch, cfg.seed, rank, world, start)
        loader = DataLoader(train_ds, batch_size=micro, sampler=order, collate_fn=collate,
                            num_workers=cfg.num_workers, worker_init_fn=ignore_stop_signals)
        model.train()
        t0 = time.time()
        with stop_signals(rank) as received, closing(batches_of(loader)) as batches:
            for step in range(start, steps_per_epoch):
                lr = get_lr(loop["global_step"], total_steps, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                micro_batches = [next(batches) for _ in range(accum)]
                for m in micro_batches:
                    for problem in m["skipped"]:
                        print(f"[rank {rank}] skipped a training record (replaced by the next readable one): "
                              f"{problem}", flush=True)

                names, raw, weighted = accumulate_gradients(model, micro_batches, cfg.batch_size, world, device,
                                                            autocast)
                # One all-reduce (besides accumulate_gradients' token count) carries the full-batch loss
                # terms, whether a process was asked to stop, and how many records were replaced.
                local = torch.tensor([float(bool(received)), float(sum(len(m["skipped"]) for m in micro_batches))],
                                     device=device)
                summed = torch.cat([torch.stack(weighted).sum(0), local])
                if world > 1:
                    dist.all_reduce(summed)
                terms, stop, skipped = summed[:-2], summed[-2].item() > 0, int(summed[-1].item())
                loop["skipped"] += skipped

                if not torch.isfinite(terms).all():
                    mine = [dict(rank=rank, micro=k, ids=m["ids"], terms={name: round(v, 4) for name, v in
                                                                          zip(names, raw[k].tolist())})
                            for k, m in enumerate(micro_batches) if not torch.isfinite(raw[k]).all()]
                    bad = [d for ds in gather(mine, world) for d in ds]
                    raise FloatingPointError(
                        f"non-finite loss at epoch {epoch} step {step} (global step {loop['global_step']}): " +
                        "; ".join(f"rank {d['rank']} micro-batch {d['micro']}: loss terms {d['terms']}, "
                                  f"study ids {d['ids']}" for d in bad) +
                        f". This step was not applied; last good checkpoint: {last_good}")
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if not torch.isfinite(norm):           # identical on every process: DDP averaged the gradients
                    ids = [i for ids in gather([i for m in micro_batches for i in m["ids"]], world) for i in ids]
                    raise FloatingPointError(
                        f"non-finite gradient norm at epoch {epoch} step {step} (global step {loop['global_step']}) "
                        f"although the loss is finite ({dict(zip(names, [round(v, 4) for v in terms.tolist()]))}); "
                        f"study ids {ids}. This step was not applied; last good checkpoint: {last_good}")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loop["global_step"] += 1

                if step % cfg.log_every == 0 or step == steps_per_epoch - 1 or stop:
                    dt = (time.time() - t0) / (step - start + 1)
                    print0(f"epoch {epoch} step {step}/{steps_per_epoch} loss {terms[0].item():.4f} (" +
                           " ".join(f"{n} {v:.4f}" for n, v in zip(names[1:], terms[1:].tolist())) +
                           f") lr {lr:.2e} {dt * 1000:.0f} ms/step {cfg.batch_size / dt:.1f} samples/s" +
                           (f", {loop['skipped']} unreadable records replaced this epoch" if loop["skipped"] else ""))
                if stop:
                    signum = torch.tensor(received[0] if received else 0, device=device)
                    if world > 1:
                        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
                    stopped_by = int(signum.item())
                    print0(f"{signal.Signals(stopped_by).name}: saving a resumable checkpoint")
                    checkpoint_now(epoch, step + 1)
                    break
                if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < steps_per_epoch:
                    checkpoint_now(epoch, step + 1)
            else:
                # A signal that came after the last step read the flag would be dropped when the handlers
                # are restored: read it once more, on every rank, before leaving them.
                signum = torch.tensor(received[0] if received else 0, device=device)
                if world > 1:
                    dist.all_reduce(signum, op=dist.ReduceOp.MAX)
                if signum.item():
                    stopped_by = int(signum.item())
                    print0(f"{signal.Signals(stopped_by).name}: saving a resumable checkpoint")
                    checkpoint_now(epoch, steps_per_epoch)
        if stopped_by:
            break
        # The epoch's training is saved before validation: a run stopped during validation resumes
        # with the validation, not with the epoch.
        checkpoint_now(epoch, steps_per_epoch)

        # Validation BLEU-4 over the whole split (every rank generates a shard; scored once) picks the
        # checkpoint to keep (Sec. 4.1).
        rows = generate_reports(raw_model, val_ds, collate, tokenizer, cleaner, cfg, device, autocast)
        if master:
            refs, hyps = [r["reference"] for r in rows], [r["generated"] for r in rows]
            bleu4 = caption_scores(refs, hyps, meteor=False)["BLEU_4"]
            improved = bleu4 > loop["best_bleu4"]
            clinical = f", clinical F1 {clinical_scores(refs, hyps, labeller)['f1']:.3f}" if labeller else ""
            skipped = f"; {loop['skipped']} unreadable training records replaced" if loop["skipped"] else ""
            print0(f"epoch {epoch}: val BLEU-4 {bleu4:.4f}{clinical}{' (best so far, saved)' if improved else ''} "
                   f"[{time.time() - t_start:.0f} s]{skipped}")
            if improved:
                loop["best_bleu4"] = bleu4
                save_checkpoint(best_path, raw_model, cfg, metrics={"val_BLEU_4": bleu4, "epoch": epoch})
        if world > 1:
            best = torch.tensor([loop["best_bleu4"]], dtype=torch.float64, device=device)  # nccl: CUDA tensors only
            dist.broadcast(best, 0)
            loop["best_bleu4"] = best.item()
        checkpoint_now(epoch + 1, 0)

    if not stopped_by:
        # The test split, with the checkpoint that validation chose.
        raw_model.load_trainable_state_dict(load_checkpoint(best_path)["model"])
        evaluate_split(raw_model, cfg, "test", records, images_root, cleaner, collate, tokenizer, device,
                       autocast, out_dir=cfg.out_dir, labeller=labeller)
    if world > 1:
        # No barrier here: the other ranks are done once the test split is generated and gathered, and
        # rank 0 alone scores it (the nearest-image baseline reads every training image), which can take
        # longer than NCCL's 10-minute collective timeout; a rank waiting in a barrier would be aborted.
        del model, optimizer
        dist.destroy_process_group()
    if stopped_by:
        print0(f"stopped by {signal.Signals(stopped_by).name}: {last_good} saved; continue with --resume "
               "(and the same options)")
        raise SystemExit(128 + stopped_by)     # the shell's convention: 143 after SIGTERM, 130 after Ctrl-C


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (RunError, DataError, FloatingPointError) as e:   # the message names the problem: no traceback
        sys.exit(f"train.py: error: {e}")
