"""One rank of a context-parallel run of a tiny transformer (`torchrun --nproc_per_node 2`, gloo on
the CPU), for tests/test_context_parallel.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/cp_run.py OUT KIND ORDER [MODE]

KIND: wan or flux. ORDER: `patch-first` (agentsd.patch, then enable_parallelism), `parallel-first`
(the other way round), or `unpatched`. MODE: ulysses (default) or ring. Rank 0 saves the output and
agentsd's status to OUT (torch.save)."""

import sys

import torch
import torch.distributed as dist

# diffusers 0.42 places each rank on device `rank % torch.accelerator.device_count()`, which is 0 on
# a machine without accelerators (a ZeroDivisionError): one "device", the CPU, for every rank.
torch.accelerator.device_count = lambda: 1


def main(out: str, kind: str, order: str, mode: str = "ulysses") -> None:
    from diffusers import ContextParallelConfig
    from test_context_parallel import PATCH, model_and_inputs

    import agentsd

    dist.init_process_group("gloo")
    model, inputs = model_and_inputs(kind)
    config = ContextParallelConfig(**{f"{mode}_degree": dist.get_world_size()})
    if order == "patch-first":
        agentsd.patch(model, **PATCH)
    model.enable_parallelism(config=config)
    if order == "parallel-first":
        agentsd.patch(model, **PATCH)
    with torch.no_grad():
        output = model(**inputs, return_dict=False)[0]
    if hasattr(output, "wait"):  # the gather's AsyncCollectiveTensor (Flux): a plain tensor to save
        output = output.wait()
    if dist.get_rank() == 0:
        report = agentsd.status(model)
        reasons = sorted({layer.reason for layer in report.layers})
        torch.save(dict(output=output, reasons=reasons, calls=report.activity.calls), out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
