"""`agentsd generate` and `compare` with `--context-parallel`, launched as diffusers documents it
(`torchrun --nproc_per_node 2`, gloo over the loopback address on this CPU; cli_cp_run.py holds the
one shim) on the tiny Wan 2.1 pipeline: 13 frames of 64 x 64 px make 4 x 4 x 4 tokens, 2 whole token
frames per rank, so agentsd acts on the shards (with `min_tokens` 0: 32 tokens per rank).

What the two ranks make is what one process makes (the baseline, compared on the decoded frames
before they become 8-bit), written once, by rank 0; agent attention runs on the shards and says
so in its sidecar; `compare` works on every video in both processes and records the layout, so a
rerun with another layout is refused; and what cannot run is refused before any work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_cp_run import recorded
from cli_run import run_main

# Slow (two processes launched through torchrun per test): `python -m pytest -m slow` runs it (README, Set-up).
pytestmark = pytest.mark.slow

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "ContextParallelConfig"):
    pytest.skip("this diffusers has no context parallelism", allow_module_level=True)

TESTS = Path(__file__).parent
RUN = ["--steps", "2", "--frames", "13", "--width", "64", "--height", "64", "--max-sequence-length", "16"]
LAYOUT = {"mode": "ulysses", "degree": 2}
ON_THE_SHARDS = "context parallel: ulysses 2 x ring 1 = 2 ranks, 32 tokens per rank (agentsd acts on the shards)"
AGENT_METHOD = "wan:min_tokens=0"


def launch(record, *args):
    """`agentsd ARGS` in 2 processes; the stdout of both, and what each recorded (cli_cp_run.py)."""
    command = [
        # --standalone: torchrun's own rendezvous on a port it picks free (no race with other processes).
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(TESTS / "cli_cp_run.py"), str(record), *map(str, args),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]), OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, [dict(np.load(f"{record}.rank{rank}.npz")) for rank in range(2)]


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def written(record, folder):
    return sorted(str(Path(p).relative_to(folder)) for p in record["written"])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from agentsd.testing.tiny_wan import tiny_wan_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-wan"
    tiny_wan_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def single(model, tmp_path_factory):
    """`generate --no-agent` in this process: its folder and the frames it decoded."""
    from agentsd.cli.commands import main

    folder = tmp_path_factory.mktemp("single")
    with recorded(folder / "record.npz"):
        assert main([str(a) for a in ["generate", "--model", model, "--prompt", "a cat", *RUN, "--no-agent",
                                      "--out", folder / "out"]]) == 0  # fmt: skip
    return folder / "out", dict(np.load(folder / "record.npz"))


@pytest.fixture(scope="module")
def split(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("split")
    argv = ["generate", "--model", model, "--prompt", "a cat", *RUN, "--no-agent", "--context-parallel", "ulysses"]
    printed, records = launch(folder / "record", *argv, "--out", folder / "out")
    return folder / "out", printed, records


@pytest.fixture(scope="module")
def compared(model, tmp_path_factory):
    """`compare --context-parallel ulysses` over 2 prompts: the baseline and the wan preset."""
    folder = tmp_path_factory.mktemp("compare")
    (folder / "prompts.txt").write_text("a cat\na dog\n")
    argv = ["compare", "--model", model, "--prompts-file", folder / "prompts.txt", "--method", "baseline",
            "--method", AGENT_METHOD, *RUN, "--no-memory", "--context-parallel", "ulysses"]  # fmt: skip
    printed, records = launch(folder / "record", *argv, "--out", folder / "out")
    return folder / "out", argv, printed, records


def test_two_ranks_write_the_files_one_process_writes_once_from_rank_0(single, split):
    (one, _), (out, printed, records) = single, split
    assert files(out) == files(one) == ["p0000_s0.json", "p0000_s0.mp4", "p0000_s0.png"]
    assert written(records[0], out) == files(out) and written(records[1], out) == []
    assert printed.count("baseline: 1 written") == 1  # rank 0 reports
    assert not any(record["group_left"] for record in records)  # generate made the process group, and destroyed it
    sidecar, alone = (json.loads((folder / "p0000_s0.json").read_text()) for folder in (out, one))
    assert sidecar["context_parallel"] == LAYOUT and alone["context_parallel"] is None
    ignored = ("context_parallel", "seconds")
    assert {k: v for k, v in sidecar.items() if k not in ignored} == {k: alone[k] for k in alone if k not in ignored}


def test_two_ranks_make_the_video_one_process_makes(single, split):
    """Every rank decodes the whole video (diffusers gathers the transformer's output); Ulysses
    attends exactly, so the frames are one process's up to rounding."""
    frames, records = single[1]["frames"], split[2]
    assert frames.shape == records[0]["frames"].shape == (1, 1, 3, 13, 64, 64)
    assert np.abs(records[0]["frames"] - frames).max() < 1e-4
    assert np.array_equal(records[1]["frames"], records[0]["frames"])


def test_compare_runs_every_video_on_both_ranks_and_agentsd_on_the_shards(single, compared):
    out, _, printed, records = compared
    videos = [f"images/{method}/p000{i}_s{i}.{suffix}" for method in ("baseline", "wan_min_tokens=0")
              for i in (0, 1) for suffix in ("json", "mp4", "png")]  # fmt: skip
    assert [f for f in files(out) if f.startswith("images/")] == written(records[0], out) == sorted(videos)
    assert written(records[1], out) == [] and {"results.json", "results.md", "samples.png"} <= set(files(out))
    assert all(record["group_left"] for record in records)  # accelerate's, made before agentsd's turn: left to it
    # No data-parallel split of the prompts: each rank decoded all 4 videos, in the same order.
    frames = records[0]["frames"]
    assert frames.shape[0] == 4 and np.array_equal(records[1]["frames"], frames)
    baseline, agent = frames[[0, 2]], frames[[1, 3]]  # per prompt: the baseline, then agentsd
    assert np.abs(baseline[0] - single[1]["frames"][0]).max() < 1e-4  # "a cat", seed 0, as generate made it
    assert np.isfinite(agent).all() and np.abs(agent - baseline).max() > 1e-2
    sidecar = json.loads((out / "images" / "wan_min_tokens=0" / "p0001_s1.json").read_text())
    assert sidecar["context_parallel"] == LAYOUT and sidecar["agentsd_context_parallel"] == ON_THE_SHARDS
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["context_parallel"] == LAYOUT
    assert results["context_parallel"] == {AGENT_METHOD: ON_THE_SHARDS}
    assert printed.count("| baseline |") == 1


def test_a_compare_rerun_in_another_layout_is_refused(compared, capsys):
    out, argv, _, _ = compared
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, _, errors = run_main(capsys, *argv[:-2], "--out", out)  # one process, without --context-parallel
    assert code == 2 and len(errors) == 1, errors
    assert "context_parallel {'mode': 'ulysses', 'degree': 2} (now None)" in errors[0]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.parametrize("command", ["generate", "compare"])
@pytest.mark.parametrize("world_size", [None, "1"])
def test_without_a_distributed_launch_it_says_to_launch_with_torchrun(model, tmp_path, capsys, monkeypatch, command,
                                                                      world_size):  # fmt: skip
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    code, _, errors = run_main(capsys, command, "--model", model, "--prompt" if command == "generate" else
                               "--num-prompts", "a cat" if command == "generate" else "1", *RUN,
                               "--context-parallel", "ring", "--out", tmp_path / "out")  # fmt: skip
    assert code == 2 and len(errors) == 1 and "torchrun --nproc_per_node P" in errors[0], errors
    assert not (tmp_path / "out").exists()


def refused(capsys, monkeypatch, tmp_path, model, *args, world_size="2", run=RUN):
    """The one error line of `generate ARGS --context-parallel` as rank 0 of a launch of
    `world_size` processes; the checks come before the process group is made, and no folder is left."""
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", "0")
    code, _, errors = run_main(capsys, "generate", "--model", model, "--prompt", "a cat", *run, *args,
                               "--out", tmp_path / "out")  # fmt: skip
    assert code == 2 and len(errors) == 1, errors
    assert not (tmp_path / "out").exists()
    return errors[0]


def test_a_diffusers_without_context_parallelism_is_refused(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(diffusers, "ContextParallelConfig", None)
    error = refused(capsys, monkeypatch, tmp_path, model, "--context-parallel", "ulysses")
    assert "ContextParallelConfig" in error and "pip install -U diffusers" in error


def test_a_model_without_a_context_parallel_plan_is_refused_naming_it(tmp_path, capsys, monkeypatch):
    from agentsd.testing import tiny_pipeline

    sd = tmp_path / "sd15"
    tiny_pipeline("sd15").save_pretrained(sd)
    error = refused(capsys, monkeypatch, tmp_path, sd, "--context-parallel", "ulysses", run=["--steps", "2"])
    assert "UNet2DConditionModel has no context-parallel plan" in error
    assert "Flux.1 transformers" in error and "Wan 2.1 / 2.2 video transformers" in error


@pytest.mark.parametrize(
    "args, world_size, message",
    [
        (["--context-parallel", "ulysses"], "4", "the 2 attention heads of WanTransformer3DModel, and 2 do not split"),
        (["--context-parallel", "ulysses", "--width", "80", "--height", "80", "--frames", "17"], "2",
         "the 125 video tokens (5 x 5 x 5) of a call at this size do not split into 2 equal parts"),
        (["--context-parallel", "ring"], "2", "the attention backend 'native' does not return"),
    ],
    ids=["heads", "tokens", "ring-without-lse"],
)  # fmt: skip
def test_what_diffusers_cannot_split_is_refused_before_any_work(model, tmp_path, capsys, monkeypatch, args, world_size,
                                                                message):  # fmt: skip
    assert message in refused(capsys, monkeypatch, tmp_path, model, *args, world_size=world_size)
