"""One rank of a context-parallel run of a tiny transformer (`torchrun --nproc_per_node 2`, gloo on
the CPU), for tests/test_context_parallel.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/cp_run.py OUT KIND ORDER PHASE [MODE [PARAM]]

KIND, PHASE: see `model_and_inputs` and `PHASES` there. ORDER: `patch-first` (agentsd.patch, then
enable_parallelism), `parallel-first` (the other way round). MODE: ulysses (default) or ring.
PARAM: a parameter's name, to also run the backward pass of a fixed weighting of the output
(`output_weights`) and report the gradients of the input and of that parameter. Rank 0 saves the
output, the first patched layer's output(s) (its shard), agentsd's status, the elements it sent
through agentsd's collectives (those of `agentsd.core.sharded`) and, with
PARAM, the gradients summed over the ranks to OUT (torch.save)."""

import faulthandler
import gc
import sys

import torch
import torch.distributed as dist

# The collectives agentsd's sharded attention sends through (diffusers' own Ulysses and ring use
# the functional collectives, so they are not counted).
COUNTED = ("all_gather_single", "all_gather_into_tensor", "all_to_all_single")


def count_sent(sent):
    for name in COUNTED:
        collective = getattr(dist, name, None)  # all_gather_single: torch 2.13 and later
        if collective is None:
            continue

        def counting(output, tensor, *args, collective=collective, **kwargs):
            sent.append(tensor.numel())
            return collective(output, tensor, *args, **kwargs)

        setattr(dist, name, counting)


def main(out: str, kind: str, order: str, phase: str, mode: str = "ulysses", grad: str = "") -> None:
    faulthandler.enable(all_threads=True)  # where a rank aborts, every thread's Python stack to stderr
    from diffusers import ContextParallelConfig
    from test_context_parallel import PHASES, model_and_inputs, output_weights

    import agentsd

    sent = []
    count_sent(sent)
    dist.init_process_group("gloo")
    model, inputs = model_and_inputs(kind)
    config = ContextParallelConfig(**{f"{mode}_degree": dist.get_world_size()})
    settings = PHASES[kind.split("-")[0]][phase]
    if order == "patch-first":
        agentsd.patch(model, **settings)
    model.enable_parallelism(config=config)
    if order == "parallel-first":
        agentsd.patch(model, **settings)
    result = {}
    first = model.transformer_blocks[0].attn if kind.startswith("flux") else model.blocks[0].attn1

    def keep(module, args, output):
        result.setdefault("layer", tuple(output) if isinstance(output, tuple) else (output,))

    first.register_forward_hook(keep)
    if grad:
        sample = inputs["hidden_states"].requires_grad_(True)
        output = model(**inputs, return_dict=False)[0]
        (output * output_weights(output)).sum().backward()
        weight = dict(model.named_parameters())[grad]
        for name, g in (("input_grad", sample.grad), ("weight_grad", weight.grad)):
            dist.all_reduce(g)  # each rank holds its shard's part of the gradient
            result[name] = g
        output = output.detach()
    else:
        with torch.no_grad():
            output = model(**inputs, return_dict=False)[0]
    if hasattr(output, "wait"):  # the gather's AsyncCollectiveTensor: a plain tensor to save
        output = output.wait()
    if dist.get_rank() == 0:
        report = agentsd.status(model)
        reasons = sorted({str(layer.reason) for layer in report.layers})
        modes = sorted({str(layer.mode) for layer in report.layers})
        grids = sorted({layer.grid for layer in report.layers if layer.grid})
        result.update(output=output, reasons=reasons, modes=modes, grids=grids, sent=sum(sent), text=str(report))
        torch.save(result, out)
    # Every rank waits for rank 0 to save, and drops the model (its hooks and parallel configuration
    # hold the process groups) before the groups go: nothing of the group outlives its destruction.
    dist.barrier()
    del model, output, first
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    from agentsd.bench.collectives import cpu_shims

    # diffusers 0.42 on a machine without accelerators: its device lookup divides by
    # torch.accelerator.device_count() (0 here), and its native backend returns no log-sum-exp, which
    # ring attention needs (agentsd's bench carries both shims, documented there).
    with cpu_shims():
        main(*sys.argv[1:])
