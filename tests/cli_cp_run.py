"""One process of `agentsd ARGS` launched by `torchrun` (gloo on this CPU), for
tests/test_cli_context_parallel.py:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/cli_cp_run.py RECORD ARGS...

Besides running the command, each process saves to RECORD.rank{R}.npz what the test checks: the
videos the pipeline decoded, in call order, as floats in [0, 1] before they became 8-bit frames
(`frames`), every file it put in place (`written`: the command writes each file through a
temporary file renamed with `os.replace`), and whether a process group is left when the command
returns (`group_left`)."""

import contextlib
import os
import sys

import numpy as np
import torch

# diffusers 0.42 places each rank on device `rank % torch.accelerator.device_count()`, which is 0 on
# a machine without accelerators (a ZeroDivisionError): one "device", the CPU, for every rank.
torch.accelerator.device_count = lambda: 1


@contextlib.contextmanager
def recorded(path):
    """Inside the block, the videos the pipelines decode and the files put in place are kept; saved
    to `path` (numpy .npz) at its end."""
    from diffusers.video_processor import VideoProcessor

    frames, written = [], []
    postprocess, replace = VideoProcessor.postprocess_video, os.replace

    def keeping_frames(self, video, *args, **kwargs):
        frames.append((video / 2 + 0.5).clamp(0, 1).float().numpy())  # as diffusers denormalizes it
        return postprocess(self, video, *args, **kwargs)

    def keeping_paths(source, target, *args, **kwargs):
        written.append(str(target))
        return replace(source, target, *args, **kwargs)

    VideoProcessor.postprocess_video, os.replace = keeping_frames, keeping_paths
    try:
        yield
    finally:
        VideoProcessor.postprocess_video, os.replace = postprocess, replace
        left = torch.distributed.is_initialized()
        np.savez(path, frames=np.array(frames), written=np.array(written, dtype=str), group_left=left)


if __name__ == "__main__":
    from agentsd.cli.commands import main

    with recorded(f"{sys.argv[1]}.rank{os.environ['RANK']}.npz"):
        code = main(sys.argv[2:])
    sys.exit(code)
