"""`agentsd bench --context-parallel P`: what it refuses before any process starts, the traffic
formulas against counts worked out by hand here, and one 2-process run on this CPU (started
through torchrun by the command itself) whose counted elements are those counts and the formulas'."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import run_main

from agentsd.api.presets import load_preset
from agentsd.bench.traffic import shard_layout

# Slow (the bench's runs launched through torchrun): `python -m pytest -m slow` runs it (README, Set-up).
pytestmark = pytest.mark.slow

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "ContextParallelConfig"):
    pytest.skip("this diffusers has no context parallelism", allow_module_level=True)

ROOT = Path(__file__).parents[1]
TINY = ["--arch", "tiny-wan", "--sizes", "256", "--frames", "5"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--context-parallel", "1", *TINY], "--context-parallel 1: context parallelism splits a call over 2 or more"),
        (["--context-parallel", "3", *TINY], "--context-parallel 3: 3 processes here, one per core, and this machine "
                                             "has 2 CPU cores: use --context-parallel 2 or less"),
        (["--context-parallel-mode", "ring", *TINY], "--context-parallel-mode applies with --context-parallel P"),
        (["--context-parallel", "2", "--arch", "sd15", "--sizes", "512"], "sd15 has no context-parallel plan"),
        (["--context-parallel", "2", "--arch", "tiny-sd35", "--sizes", "256"], "tiny-sd35 has no context-parallel"),
        (["--context-parallel", "2", *TINY, "--methods", "ceiling"], "with --context-parallel the methods are "
                                                                     "baseline, agentsd-agent, agentsd-tome"),
        (["--context-parallel", "2", *TINY, "--compile"], "--compile and --context-parallel"),
        # 17 x 17 = 289 image tokens cannot be split into two equal shards.
        (["--context-parallel", "2", "--arch", "tiny-flux", "--sizes", "272"], "289 tokens do not split over 2"),
        # Ulysses splits the heads over the ranks: Wan 1.3B's 12 do not split over 8 (ring would take them).
        (["--context-parallel", "8", "--arch", "wan2.1-1.3b", "--context-parallel-mode", "ulysses"],
         "--context-parallel 8 (ulysses): wan2.1-1.3b's 12 attention heads do not split over 8 ranks"),
    ],
    ids=["one-rank", "more-ranks-than-cores", "mode-alone", "unet", "sd3", "other-method", "compile", "odd-tokens",
         "ulysses-heads"],
)  # fmt: skip
def test_bad_context_parallel_input_is_refused_before_anything_starts(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16 if "wan2.1-1.3b" in args else 2)  # a 2-core machine, or 16
    out = tmp_path / "out"
    code, _, errors = run_main(capsys, "bench", *args, "--out", out)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_a_world_of_another_size_is_refused(tmp_path, capsys, monkeypatch):
    """Under torchrun the command uses the world it is in, which must be P processes."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    code, _, errors = run_main(capsys, "bench", "--context-parallel", "2", *TINY, "--out", tmp_path / "out")
    assert code == 2 and "under torchrun with 4 processes: make them equal" in errors[0]


def test_the_flag_takes_a_number(tmp_path, capsys):
    code, _, errors = run_main(capsys, "bench", "--context-parallel", "ulysses", *TINY, "--out", tmp_path / "out")
    assert code == 2 and "--context-parallel: invalid int value: 'ulysses'" in errors[0]


def test_formulas_give_the_counts_worked_out_by_hand():
    """Flux.1-dev at 1024 px over 2 ranks: 64 x 64 image tokens, 2,048 and 256 of the 512 text tokens
    per rank, 24 heads of 128; the `flux` preset's 4x4 cells on a 32 x 64 shard make 8 x 16 = 128
    agents, its ToMe phase keeps 2,048 - floor(0.4 x 2,048) = 1,229 tokens. Wan 2.1 1.3B at 480x832
    px, 93 frames over 4 ranks: 24 x 30 x 52 tokens, 6 token frames per rank; 12 heads of 128;
    the `wan` preset's 2x4x4 boxes leave 9,360 - floor(0.97 x 9,360) = 281 agents (273 whole
    boxes, partial ones at the bottom and right). At the pipelines' 81 frames (21 token frames)
    over 2 ranks each run of 16,380 tokens (10.5 frames) plans its 10 whole frames, 5 x 7 x 13 =
    455 boxes, and 16,380 - floor(0.97 x 16,380) = 492 agents; 2 frames over 8 ranks leave a run
    of 390 tokens, no whole frame: agentsd hands over."""
    flux = shard_layout("flux-dev", 1024, None, 2, load_preset("flux"))
    agent, tome = flux.plan("agentsd-agent"), flux.plan("agentsd-tome")
    assert (flux.tokens, flux.text, agent.agents, tome.merged, flux.layers) == (2048, 256, 128, 1229, 19 + 38)
    assert flux.layer_elements("ulysses") == 4 * 24 * 128 * (2048 + 256) == 28_311_552
    assert flux.layer_elements("ring") == 2 * 24 * 128 * (2048 + 256)
    assert flux.layer_elements("ulysses", agent) == 24 * ((128 + 256) * 128 + 2 * 128 * 129 + 2 * 256 * 129)
    assert flux.layer_elements("ring", agent) == flux.layer_elements("ulysses", agent) == 3_557_376
    assert flux.layer_elements("ulysses", tome) == 4 * 24 * 128 * (1229 + 256)
    assert flux.forward_elements("ulysses") == 57 * 28_311_552 + 2048 * 64  # and the output gather
    wan = shard_layout("wan2.1-1.3b", (480, 832), 93, 4, load_preset("wan"))
    agent = wan.plan("agentsd-agent")
    assert (wan.grid, wan.tokens, wan.text, agent.agents, wan.layers) == ((6, 30, 52), 9360, 0, 281, 30)
    assert wan.layer_elements("ulysses") == 4 * 12 * 128 * 9360
    assert wan.layer_elements("ulysses", agent) == 12 * (281 * 128 + 4 * 281 * 129) == 2_171_568
    assert wan.forward_elements("ring", agent) == 30 * 2_171_568 + 9360 * 64
    cut = shard_layout("wan2.1-1.3b", (480, 832), 81, 2, load_preset("wan"))
    agent = cut.plan("agentsd-agent")
    assert (cut.grid, cut.tokens, agent.agents) == ((10, 30, 52), 16380, 492)
    assert cut.layer_elements("ulysses", agent) == 12 * (492 * 128 + 2 * 492 * 129) == 2_278_944
    handed = shard_layout("wan2.1-1.3b", (480, 832), 5, 8, load_preset("wan"))
    assert handed.grid is None and handed.plan("agentsd-agent").action == "exact"
    assert handed.layer_elements("ulysses", handed.plan("agentsd-agent")) == 4 * 12 * 128 * 2 * 30 * 52 // 8


# Hand counts of the 2-process run below, per rank, batch 1. tiny-wan, 1 block (2 heads of 12), at
# 256 x 256 px and 5 frames: 2 token frames of 16 x 16, one per rank (256 tokens); the agent phase
# (boxes 1 frame deep: the shard's depth) has 16 agents, the ToMe phase keeps 256 - floor(0.4 x 256)
# = 154 tokens; its output gather sends 256 tokens x 64 channels. tiny-flux, 1 + 2 blocks (2 heads of
# 16), at 256 px: 16 x 16 image tokens, 128 and 256 of the 512 text tokens per rank; a 128-token
# shard is under the preset's min_tokens, so every agentsd layer goes to diffusers' exact path.
WAN_AGENT_LAYER = 2 * (16 * 12 + 2 * 16 * (12 + 1))
EXPECTED = {  # (arch, mode, method): (layer elements, forward elements)
    ("tiny-wan", "ulysses", "baseline"): (4 * 2 * 12 * 256, 4 * 2 * 12 * 256 + 256 * 64),
    ("tiny-wan", "ulysses", "agentsd-agent"): (WAN_AGENT_LAYER, WAN_AGENT_LAYER + 256 * 64),
    ("tiny-wan", "ulysses", "agentsd-tome"): (4 * 2 * 12 * 154, 4 * 2 * 12 * 154 + 256 * 64),
    ("tiny-wan", "ring", "baseline"): (2 * 2 * 12 * 256, 2 * 2 * 12 * 256 + 256 * 64),
    ("tiny-wan", "ring", "agentsd-agent"): (WAN_AGENT_LAYER, WAN_AGENT_LAYER + 256 * 64),
    ("tiny-wan", "ring", "agentsd-tome"): (2 * 2 * 12 * 154, 2 * 2 * 12 * 154 + 256 * 64),
    **{("tiny-flux", mode, method): (k * 2 * 16 * (128 + 256), 3 * k * 2 * 16 * (128 + 256) + 128 * 64)
       for mode, k in (("ulysses", 4), ("ring", 2)) for method in ("baseline", "agentsd-agent", "agentsd-tome")},
}  # fmt: skip


def test_two_processes_count_what_the_formulas_say(tmp_path):
    """`agentsd bench --context-parallel 2` outside torchrun starts torchrun itself; both modes, both
    families: per layer and per forward the counted elements are the hand counts above and the
    formulas' (`formula_*`), the ratios follow, agentsd says what it did, and rank 0 writes the files."""
    out = tmp_path / "cp"
    command = [sys.executable, "-m", "agentsd", "bench", "--context-parallel", "2", "--arch", "tiny-wan", "tiny-flux",
               "--blocks", "1", "--sizes", "256", "--frames", "5", "--repeats", "1", "--warmup", "0", "--out",
               str(out)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads((out / "results.json").read_text())
    rows = {(r["arch"], r["mode"], r["method"]): r for r in data["rows"]}
    assert set(rows) == set(EXPECTED)
    for key, (layer, forward) in EXPECTED.items():
        row = rows[key]
        assert (row["layer_elements"], row["forward_elements"]) == (layer, forward), key
        assert (row["formula_layer_elements"], row["formula_forward_elements"]) == (layer, forward), key
        assert row["forward_bytes"] == 4 * forward  # fp32 throughout
        base = EXPECTED[(key[0], key[1], "baseline")]
        assert row["layer_ratio"] == round(base[0] / layer, 3) and row["forward_ratio"] == round(base[1] / forward, 3)
        assert row["ranks"] == 2 and row["median_ms"] > 0 and math.isfinite(row["speedup"])
    assert rows[("tiny-wan", "ring", "agentsd-agent")]["agentsd"] == "agent x1"
    assert rows[("tiny-wan", "ulysses", "agentsd-tome")]["agentsd"] == "tome x1"
    assert all(rows[("tiny-flux", m, a)]["agentsd"].startswith("exact x3") for m in ("ulysses", "ring")
               for a in ("agentsd-agent", "agentsd-tome"))  # fmt: skip
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("Command: `agentsd bench --context-parallel 2 --arch tiny-wan tiny-flux")
    assert "CPU ring timing uses a log-sum-exp shim" in markdown and "| tiny-wan, 1 block |" in markdown
    assert "| tiny-wan, 1 block | 256x256, 5 frames (2 latent) | ulysses | agentsd-agent | agent x1 | 1 | 1,216 |" in (
        done.stdout)  # rank 0 prints the table once  # fmt: skip
    assert done.stdout.count("| tiny-wan, 1 block |") == 6


def test_the_count_table_script_writes_its_files(tmp_path):
    """scripts/traffic_table.py: a row per case, frame count and P; Ulysses left out where the heads
    do not split; the files record the command."""
    out = tmp_path / "traffic"
    script = ROOT / "scripts" / "traffic_table.py"
    done = subprocess.run([sys.executable, str(script), "--case", "wan2.1-1.3b", "480x832", "--frames", "93",
                           "--ranks", "4", "8", "--out", str(out)], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads((out / "results.json").read_text())
    expected = f"python scripts/traffic_table.py --case wan2.1-1.3b 480x832 --frames 93 --ranks 4 8 --out {out}"
    assert data["command"] == expected
    by_ranks = {r["ranks"]: r for r in data["rows"]}
    assert by_ranks[4]["layer_agent"] == 2_171_568 and by_ranks[4]["layer_ulysses"] == 4 * 12 * 128 * 9360
    assert by_ranks[8]["layer_ulysses"] is None and by_ranks[8]["layer_ring"] == 2 * 12 * 128 * 4680
    assert "| wan2.1-1.3b | 480x832, 93 frames (24 latent) | 4 |" in (out / "results.md").read_text()
