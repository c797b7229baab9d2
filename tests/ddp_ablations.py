"""Run by tests/test_paper.py under `torchrun --nproc_per_node 2`: two DDP training steps of every
ablation of Tables 3 and 4 (DDP fails at the second step if a trainable parameter got no gradient)."""
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import Config, ReportGenerator, load_frozen_llm, load_tokenizer  # noqa: E402
from test_model import batch  # noqa: E402
from test_paper import ABLATIONS  # noqa: E402


def main(llm_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(llm_dir)
    for name, flags in ABLATIONS.items():
        torch.manual_seed(0)
        cfg = Config(llm=llm_dir, vision="", **flags)
        model = ReportGenerator(cfg, load_frozen_llm(cfg), tokenizer)
        trained = sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})
        ddp = DDP(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for step in range(2):
            ddp(**batch(tokenizer, seed=10 * rank + step))["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        # the replicas stay identical: same weights on both ranks after two steps
        flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
        other = flat.clone()
        dist.broadcast(other, 0)
        assert torch.allclose(flat, other), name
        if rank == 0:
            print(f"ok {name}: trained {', '.join(trained)}", flush=True)
        del ddp, opt
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
