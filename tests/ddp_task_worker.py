"""Run by test_task.py on 2 gloo ranks (forked, tests/forked_ranks.py; ``torch.distributed.run`` runs
it as a script too): two StimTask steps with DDP.

Each rank takes its half of a fixed global batch; rank 0 writes the final parameters of both step
protocols (summed loss, ``backward_fn``).
"""
import os
import sys

import timm
import torch
import torch.distributed as dist

import stim_timm

STEPS, BATCH, LR = 2, 8, 0.1


def build():
    torch.manual_seed(0)
    return timm.create_model('stim_resnet20_cifar', num_classes=10, zero_init_last=False)


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
            for _ in range(STEPS)]


def task_kwargs():
    return dict(num_subnets=3, rule='uniform', kl_minus=True, small_input=0.5, seed=5, verbose=False)


def train(stepwise: bool, rank: int, world: int):
    """STEPS updates through DDP, with the loss returned whole or term by term (``backward_fn``)."""
    task = stim_timm.StimTask(build(), torch.nn.CrossEntropyLoss(), **task_kwargs())
    task.prepare_distributed()
    opt = torch.optim.SGD(task.trainable_module.parameters(), lr=LR)
    task.train()
    half = BATCH // world
    for step, (x, y) in enumerate(batches()):
        opt.zero_grad()
        task.set_step(step)
        kwargs = {'backward_fn': torch.Tensor.backward} if stepwise else {}
        out = task(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half], **kwargs)
        out['loss'].backward()
        opt.step()
    return {k: v.detach().clone() for k, v in task.trainable_module.module.named_parameters()}


def main(out_path: str) -> None:
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    params = {mode: train(mode == 'backward_fn', rank, world) for mode in ('summed', 'backward_fn')}
    if rank == 0:
        torch.save(params, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
