"""Worker of the distributed tests: ``python -m torch.distributed.run --nproc_per_node 2 dist_worker.py OUT [IDS]``.

Joins a gloo process group (CPU), then for each case of ``dist_cases.CASES`` (or the ids given) and each of DDP,
FSDP1 (``FullyShardedDataParallel`` with one unit per block plus the root, ``use_orig_params=True``) and FSDP2
(``fully_shard`` per block, then the root): builds the case's PEFT model (same seed in every rank), trains
``STEPS`` AdamW steps on this rank's part of the global batch, and records on rank 0, in ``OUT/<case>/<mode>/``:

* ``result.pt``: the adapter gradients of the first step (DTensors gathered with ``full_tensor``; FSDP1's shards
  gathered with ``summon_full_params(with_grads=True)``), the global loss of every step (all-reduced mean of the
  rank losses), which parameters are trainable / sharded / got gradients, which frozen ones changed;
* the adapter saved after the last step (``save_pretrained`` on rank 0; under FSDP1 / FSDP2 from the full state
  dict that ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` gathers).
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_cases import CASES, CASES_BY_ID, LR, STEPS, DistCase, adapter_grads  # noqa: E402

from structpeft.peft.model import state_dict_name  # noqa: E402  (FSDP1's parameter names as the model's)

MODES = ("ddp", "fsdp1", "fsdp2")


def run_case(case: DistCase, mode: str, out_dir: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = case.model()
    model.train()
    part = case.micro_batches(world)[rank]
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    elif mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        # one FSDP unit per block plus the root; use_orig_params because each unit mixes frozen base weights and
        # trainable structured parameters in one flat parameter
        wrapped = FullyShardedDataParallel(
            model,
            auto_wrap_policy=ModuleWrapPolicy({type(b) for b in case.blocks(model)}),
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )
        full_numel = {n: p.numel() for n, p in case.model().named_parameters()}
    else:
        from torch.distributed.fsdp import fully_shard

        for block in case.blocks(model):
            fully_shard(block)
        fully_shard(model)
        wrapped = model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if mode == "fsdp1":
        # the original parameters are views of this rank's shard of the flat parameters: fewer local elements
        local = {state_dict_name(n): p.numel() for n, p in wrapped.named_parameters()}
        sharded = sorted(n for n, k in local.items() if k < full_numel[n])
        trainable = {state_dict_name(n) for n, p in wrapped.named_parameters() if p.requires_grad}
    else:
        sharded = sorted(n for n, p in model.named_parameters() if type(p.data).__name__ == "DTensor")
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    grads, losses = None, []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = case.loss(wrapped, part)
        loss.backward()
        if step == 0:
            if mode == "fsdp1":
                from torch.distributed.fsdp import FullyShardedDataParallel

                # the full parameters and gradients, gathered from the shards (a collective: every rank calls it)
                with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
                    grads = {state_dict_name(n): g for n, g in adapter_grads(model).items()}
                    frozen_with_grad = sorted(
                        state_dict_name(n)
                        for n, p in model.named_parameters()
                        if not p.requires_grad and p.grad is not None
                    )
            else:
                grads = adapter_grads(model)  # collective under FSDP2 (full_tensor): every rank calls it
                frozen_with_grad = sorted(
                    n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None
                )
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(float(mean_loss / world))
        opt.step()
    folder = os.path.join(out_dir, case.id, mode)
    if mode == "ddp":
        state = model.state_dict()
        model.save_pretrained(os.path.join(folder, "adapter"), is_main_process=rank == 0)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))
        model.save_pretrained(os.path.join(folder, "adapter"), state_dict=state, is_main_process=rank == 0)
    # the frozen base weights after training, against a freshly built (identical) model's
    fresh = case.model()
    frozen_changed = sorted(
        n for n, p in fresh.named_parameters() if not p.requires_grad and not torch.equal(state[n], p.detach())
    )
    if rank == 0:
        torch.save(
            {
                "grads": grads,
                "losses": losses,
                "trainable": sorted(trainable),
                "sharded": sharded,
                "frozen_with_grad": frozen_with_grad,
                "frozen_changed": frozen_changed,
                "world": world,
            },
            os.path.join(folder, "result.pt"),
        )
    dist.barrier()


def main() -> None:
    out_dir = sys.argv[1]
    ids = sys.argv[2:] or [c.id for c in CASES]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        for case_id in ids:
            for mode in MODES:
                run_case(CASES_BY_ID[case_id], mode, out_dir)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
