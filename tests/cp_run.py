"""One rank of a context-parallel run of a tiny transformer (`torchrun --nproc_per_node 2`, gloo on
the CPU), for tests/test_context_parallel.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/cp_run.py OUT KIND ORDER PHASE [MODE]

KIND, PHASE: see `model_and_inputs` and `PHASES` there. ORDER: `patch-first` (agentsd.patch, then
enable_parallelism), `parallel-first` (the other way round). MODE: ulysses (default) or ring. Rank 0
saves the output, agentsd's status and the elements this rank sent through
`torch.distributed.all_gather` (agentsd's collectives) to OUT (torch.save)."""

import sys

import torch
import torch.distributed as dist

# diffusers 0.42 places each rank on device `rank % torch.accelerator.device_count()`, which is 0 on
# a machine without accelerators (a ZeroDivisionError): one "device", the CPU, for every rank.
torch.accelerator.device_count = lambda: 1


def main(out: str, kind: str, order: str, phase: str, mode: str = "ulysses") -> None:
    from diffusers import ContextParallelConfig
    from test_context_parallel import PHASES, model_and_inputs

    import agentsd

    sent = []
    all_gather = dist.all_gather

    def counting(parts, tensor, *args, **kwargs):
        sent.append(tensor.numel())
        return all_gather(parts, tensor, *args, **kwargs)

    dist.all_gather = counting
    dist.init_process_group("gloo")
    model, inputs = model_and_inputs(kind)
    config = ContextParallelConfig(**{f"{mode}_degree": dist.get_world_size()})
    if order == "patch-first":
        agentsd.patch(model, **PHASES[phase])
    model.enable_parallelism(config=config)
    if order == "parallel-first":
        agentsd.patch(model, **PHASES[phase])
    with torch.no_grad():
        output = model(**inputs, return_dict=False)[0]
    if hasattr(output, "wait"):  # the gather's AsyncCollectiveTensor (Flux): a plain tensor to save
        output = output.wait()
    if dist.get_rank() == 0:
        report = agentsd.status(model)
        reasons = sorted({str(layer.reason) for layer in report.layers})
        modes = sorted({str(layer.mode) for layer in report.layers})
        grids = sorted({layer.grid for layer in report.layers if layer.grid})
        result = dict(output=output, reasons=reasons, modes=modes, grids=grids, sent=sum(sent), text=str(report))
        torch.save(result, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
