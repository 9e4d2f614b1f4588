"""Run the compatibility tests and write their outcome into the README's matrix.

    python scripts/compat_matrix.py            # runs the tests (about a minute on 2 CPU cores), rewrites README.md
    python scripts/compat_matrix.py --dry-run  # prints the section instead

Only the part of README.md between the `compat-matrix` markers is replaced. Every row names the
tests behind it; the script refuses to write when one of them fails or no longer exists, so the
README shows only outcomes that really happened (skips included, with pytest's reason).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- compat-matrix:start -->", "<!-- compat-matrix:end -->"
CYCLE = "patch cycle"
SCHEDULERS = ("ddim", "pndm", "euler", "euler-a", "dpm++2m", "dpm++2m-karras", "unipc", "lcm")
KINDS = ("sd15", "sd2", "sdxl")
VERSIONS = ("torch", "diffusers", "transformers", "accelerate", "peft", "DeepCache", "cache-dit")


@dataclass(frozen=True)
class Row:
    cell: str
    setting: str
    checks: str
    tests: tuple[str, ...]


def compat_test(name: str) -> str:
    return f"tests/test_compat.py::{name}"


def rows() -> list[Row]:
    """The matrix: txt2img, test_compat.py's cells in their order, then the related tests elsewhere."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_compat import CELLS

    cycle = "tests/test_patch.py::test_patch_changes_output_and_unpatch_restores_it_bit_for_bit"
    matrix = [
        Row("txt2img-sd15", "StableDiffusionPipeline, SD 1.x UNet", CYCLE, (f"{cycle}[sd15]",)),
        Row(
            "txt2img-sd2", "SD 2.x UNet: linear projections, upcast attention, v-prediction", CYCLE, (f"{cycle}[sd2]",)
        ),
        Row("txt2img-sdxl", "StableDiffusionXLPipeline, `max_downsample=2`", CYCLE, (f"{cycle}[sdxl]",)),
    ]
    for cell, build in CELLS.items():
        matrix.append(Row(cell, build.__doc__.strip().splitlines()[0], CYCLE, (compat_test(f"test_cell[{cell}]"),)))
    matrix += [
        Row(
            "from-pretrained",
            "a pipeline saved and loaded with `from_pretrained`, patched with `agentsd.patched`",
            CYCLE,
            ("tests/test_patch.py::test_pipeline_loaded_with_from_pretrained",),
        ),
        Row(
            "deepcache",
            "DeepCache's `DeepCacheSDHelper` (cache_interval 2, cache_branch_id 0) enabled first",
            f"{CYCLE}; agent attention on cached steps; disabling DeepCache gives the plain baseline",
            (compat_test("test_deepcache"),),
        ),
    ]

    switch = "tests/test_schedule.py::test_every_scheduler_switches_at_the_same_point_of_the_trajectory"
    published = "tests/test_schedule.py::test_published_schedule_agent_for_steps_0_to_19_then_tome"
    for name in SCHEDULERS:
        checks = "one agent-to-ToMe switch at progress 0.4, all patched layers on every call"
        tests = (f"{switch}[{name}]",)
        if name in ("ddim", "pndm"):
            checks += "; SD's 50-step schedule: agent for exactly steps 0-19"
            tests += (f"{published}[{name}]",)
        matrix.append(Row(f"scheduler-{name}", f"`agentsd generate --scheduler {name}`, 12 steps", checks, tests))

    trajectory = "tests/test_schedule.py::test_the_phase_follows_the_trajectory_under_every_scheduler"
    noise_level = "one agent-to-ToMe switch at 40 % of the scheduler's own schedule (its timesteps are noise levels)"
    matrix += [
        Row("scheduler-edm-euler", "`EDMEulerScheduler`, 12 steps", noise_level, (f"{trajectory}[EDMEulerScheduler]",)),
        Row(
            "scheduler-edm-dpm",
            "`EDMDPMSolverMultistepScheduler` (Playground v2.5's), SD 1.x 12 steps and SDXL 7 steps",
            noise_level,
            (
                f"{trajectory}[EDMDPMSolverMultistepScheduler]",
                "tests/test_schedule.py::test_playground_style_sdxl_with_the_edm_scheduler_runs_both_phases",
            ),
        ),
        Row(
            "scheduler-euler-continuous",
            "`EulerDiscreteScheduler(timestep_type='continuous', prediction_type='v_prediction')`, 12 steps",
            noise_level,
            (f"{trajectory}[EulerDiscreteScheduler-continuous]",),
        ),
    ]
    sharing = "tests/test_sharing.py::"
    pickled = f"{sharing}test_a_patched_unet_pickles_and_loads_back_patched"
    matrix += [
        Row(
            "threads",
            "4 requests at once, each its own pipeline (`type(pipe)(**components)`, own scheduler and tokenizer) "
            "sharing one patched UNet: sizes, steps and `num_images_per_prompt` differ",
            "each image bit for bit as made alone, with and without `share_matching`; every call counted once",
            tuple(
                f"{sharing}test_concurrent_requests_on_one_unet_get_what_they_get_alone[{o}]"
                for o in ("default", "share_matching")
            ),  # fmt: skip
        ),
        Row(
            "deepcopy",
            "`copy.deepcopy` of a patched UNet, and of a patched pipeline",
            "an independent patched model; the copied pipeline's UNet follows the copied scheduler",
            (
                f"{sharing}test_a_deep_copy_is_an_independent_patched_unet",
                f"{sharing}test_a_copied_pipeline_follows_its_own_scheduler",
            ),  # fmt: skip
        ),
        Row(
            "derived-pipelines",
            "`Pipeline.from_pipe(pipe, scheduler=...)` and `Pipeline(**pipe.components)` with the other kind of "
            "scheduler (DDIM / EDM) than the patched pipeline; both kinds in two threads stepping in turn",
            "each call's phase follows the scheduler of the pipeline making it",
            tuple(
                f"tests/test_derived_pipelines.py::test_a_derived_pipeline_follows_its_own_scheduler[{o}]"
                for o in ("ddim-edm-from_pipe", "ddim-edm-components", "edm-ddim-from_pipe", "edm-ddim-components")
            )
            + ("tests/test_derived_pipelines.py::test_pipelines_with_different_schedulers_at_the_same_time",),
        ),
        Row(
            "batches",
            "a batch of prompts, and `num_images_per_prompt=2`, each image with its own generator, `use_rand` on: "
            "SD 1.x (with and without guidance), SDXL, SD 3, PixArt, Flux",
            "each image as made alone (to 1e-5)",
            tuple(
                f"tests/test_batch.py::test_each_image_of_a_batch_is_the_image_made_alone[{case}]"
                for case in ("sd15", "sd15-no-guidance", "sdxl", "sd3", "pixart", "flux")
            )
            + tuple(
                f"tests/test_batch.py::test_num_images_per_prompt_makes_the_images_made_one_by_one[{kind}]"
                for kind in ("sd15", "flux")
            ),
        ),
        Row(
            "ip-adapter-dit",
            "IP-Adapter on Flux (`load_ip_adapter` from a local folder, image prompt) and SD 3 (from a state dict, "
            "image embeddings), loaded after patching",
            "agent attention on every layer; at scale 0 the patched image; the image-prompt branch the adapter's own; "
            "weights kept in the model; unload gives the patched image",
            tuple(
                f"tests/test_ip_adapters.py::{test}[{kind}]"
                for test in (
                    "test_an_adapter_loaded_after_patching_keeps_agent_attention_and_at_scale_0_changes_nothing",
                    "test_the_image_prompt_branch_is_the_adapters_own",
                    "test_the_adapters_weights_stay_in_the_model",
                    "test_unloading_the_adapter_from_a_patched_pipeline_gives_the_patched_image",
                )
                for kind in ("flux", "sd3")
            ),
        ),
        Row(
            "pickle",
            "`pickle` and `torch.save` / `torch.load` of a patched UNet (as multiprocessing's spawn does)",
            "loads back patched, same outputs in both phases, unpatches to the baseline",
            (f"{pickled}[pickle]", f"{pickled}[torch.save]"),
        ),
        Row(
            "inference-then-training",
            "a call under `torch.inference_mode()`, then a training step (top-left and random destinations)",
            "the backward pass runs, finite gradients",
            tuple(f"{sharing}test_validation_in_inference_mode_then_training[{c}]" for c in ("fixed", "random")),
        ),
        Row(
            "custom-processor-kwargs",
            "a custom processor with an argument of its own, passed in `cross_attention_kwargs`",
            "the argument still reaches it under agentsd; no 'not expected' warning",
            (f"{sharing}test_a_custom_processor_still_gets_its_own_arguments",),
        ),
    ]

    sizes = "tests/test_patch.py::test_sizes_that_strides_do_not_divide"
    for param, (h, w) in (("size0", (72, 40)), ("size1", (56, 104))):
        setting = f"{h}x{w} px (latent {h // 4}x{w // 4}): non-square, not a multiple of 64 px or of the cells"
        setting += ", `num_images_per_prompt=3`"
        matrix.append(Row(f"size-{h}x{w}", setting, "finite output of the right shape", (f"{sizes}[{param}]",)))

    half = "tests/test_patch.py::test_half_precision_stays_finite"
    offload = f"{CYCLE}; the offload is still on after unpatch"
    matrix += [
        Row("cpu-fp32", "fp32 on the CPU (and every cell above)", CYCLE, tuple(f"{cycle}[{k}]" for k in KINDS)),
        Row("cpu-bf16", "bf16 on the CPU, SD 2.x UNet", "finite bf16 latents", (f"{half}[dtype0]",)),
        Row("cpu-fp16", "fp16 on the CPU, SD 2.x UNet", "finite fp16 latents", (f"{half}[dtype1]",)),
        Row(
            "cpu-offload-hooks",
            "`enable_model_cpu_offload(device='cpu')`: accelerate's offload hooks, moves are no-ops",
            offload,
            (compat_test("test_model_cpu_offload[cpu]"),),
        ),
        Row("cuda-fp16", "fp16 on CUDA", CYCLE, (compat_test("test_cuda_fp16"),)),
        Row(
            "cuda-offload",
            "fp16, `enable_model_cpu_offload()` on CUDA",
            offload,
            (compat_test("test_model_cpu_offload[cuda]"),),
        ),
    ]
    return matrix


def run_tests(node_ids: list[str]) -> dict[str, str]:
    """Run the tests in one pytest process; the outcome of each: "passed", "failed" or
    "skipped (reason)"."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder, "report.xml")
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q"]
        subprocess.run([*command, f"--junitxml={report}", *node_ids], cwd=ROOT, check=False)
        if not report.exists():
            sys.exit("pytest wrote no report: see its output above.")
        cases = ET.parse(report).getroot().iter("testcase")
    outcomes = {}
    for case in cases:
        node_id = case.get("classname").replace(".", "/") + ".py::" + case.get("name")
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[node_id] = "failed"
        elif (skipped := case.find("skipped")) is not None:
            outcomes[node_id] = f"skipped ({skipped.get('message', '').strip()})"
        else:
            outcomes[node_id] = "passed"
    return outcomes


def row_status(row: Row, outcomes: dict[str, str]) -> str:
    found = {outcomes.get(test, "missing") for test in row.tests}
    return found.pop() if len(found) == 1 else "; ".join(f"{t.split('::')[1]}: {outcomes.get(t)}" for t in row.tests)


def environment() -> str:
    versions = []
    for package in VERSIONS:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return f"{device}; {', '.join(versions)}"


def render(matrix: list[Row], outcomes: dict[str, str]) -> str:
    lines = [
        f"Generated by `python scripts/compat_matrix.py` on: {environment()}.",
        "",
        f"`{CYCLE}`: the patched output is finite and differs from the baseline, and after",
        "`agentsd.unpatch` the baseline comes back bit for bit; the cells of `tests/test_compat.py`",
        "also check that agentsd replaced only self-attention (`attn1`) processors and that every",
        "other processor stayed the same object. Tiny random-weight pipelines, 64x64 px, 4-5 steps",
        "unless said.",
        "",
        "| cell | setting | checks | status | test |",
        "|---|---|---|---|---|",
    ]
    for row in matrix:
        tests = "<br>".join(f"`{t.removeprefix('tests/')}`" for t in row.tests)
        lines.append(f"| `{row.cell}` | {row.setting} | {row.checks} | {row_status(row, outcomes)} | {tests} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the section instead of writing README.md")
    args = parser.parse_args()

    readme = README.read_text()
    if readme.count(START) != 1 or readme.count(END) != 1:
        sys.exit(f"README.md needs exactly one {START} and one {END} line (in its Compatibility section).")
    matrix = rows()
    node_ids = list(dict.fromkeys(test for row in matrix for test in row.tests))
    outcomes = run_tests(node_ids)
    bad = [f"{test}: failed" for test in node_ids if outcomes.get(test) == "failed"]
    bad += [f"{test}: not run (renamed or removed?)" for test in node_ids if test not in outcomes]
    if bad:
        print("Not writing the matrix; these tests did not pass or skip:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    section = render(matrix, outcomes)
    if args.dry_run:
        print(section)
        return 0
    head, rest = readme.split(START)
    README.write_text(f"{head}{START}\n{section}\n{END}{rest.split(END)[1]}")
    print(f"README.md: matrix of {len(matrix)} cells written.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
