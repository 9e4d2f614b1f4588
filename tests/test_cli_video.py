"""`agentsd generate` and `agentsd compare` on a video model (the tiny Wan 2.1 pipeline saved to a
folder): each video an MP4, a contact sheet and a sidecar; `--compare` pairs; compare's scores
frame by frame; and the input refused before any folder is made (a frame count Wan cannot make, the
`video` extra missing, an image- or video-conditioned Wan model, FID on videos)."""

import json
import sys

import imageio
import numpy as np
import pytest
import torch
from cli_run import run_main
from PIL import Image

from agentsd.api.presets import load_preset
from agentsd.testing import tiny_pipeline
from agentsd.testing.tiny_wan import tiny_wan_pipeline

# 128 px and 17 frames: Wan's 5 x 8 x 8 token grid (320 tokens), on which the `wan` preset acts.
SIZE = ["--width", "128", "--height", "128", "--max-sequence-length", "16"]
RUN = ["--prompt", "a cat", "--steps", "2", "--frames", "17", *SIZE]
EXTRA = 'pip install "agentsd[video]"'


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-wan"
    tiny_wan_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "sd15"
    tiny_pipeline("sd15").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def compared(model, tmp_path_factory):
    """The folder of `generate --compare` on one prompt."""
    from agentsd.cli.commands import main

    out = tmp_path_factory.mktemp("generate") / "out"
    assert main([str(a) for a in ["generate", "--model", model, *RUN, "--compare", "--out", out]]) == 0
    return out


def read_video(path):
    """The frames (uint8 arrays) and frame rate of an MP4, as imageio reads it: independent of
    agentsd's own reader."""
    reader = imageio.get_reader(path)
    try:
        return [np.asarray(frame) for frame in reader], reader.get_meta_data()["fps"]
    finally:
        reader.close()


def psnr(a, b):
    """PSNR of two uint8-valued arrays, by hand."""
    error = np.mean((np.asarray(a, np.float64) / 255 - np.asarray(b, np.float64) / 255) ** 2)
    return 10 * np.log10(1 / error)


def files(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("folder, method", [("", "agentsd"), ("baseline", "baseline")])
def test_each_video_is_an_mp4_a_contact_sheet_and_a_sidecar(compared, folder, method):
    out = compared / folder
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["p0000_s0.json", "p0000_s0.mp4", "p0000_s0.png"]
    frames, fps = read_video(out / "p0000_s0.mp4")
    assert len(frames) == 17 and {f.shape for f in frames} == {(128, 128, 3)} and fps == 16
    record = json.loads((out / "p0000_s0.json").read_text())
    assert (record["frames"], record["fps"], record["width"], record["height"]) == (17, 16, 128, 128)
    assert record["method"] == method and record["steps"] == 2 and record["contact_sheet_frames"] == list(range(17))
    config = load_preset("wan").to_dict() if method == "agentsd" else None  # the Wan family's default preset
    assert record["agentsd_config"] == config
    sheet = Image.open(out / "p0000_s0.png")
    assert sheet.size == (5 * 128, 4 * 128)  # 17 frames: 5 columns, 4 rows, full size
    assert json.loads(sheet.text["agentsd"]) == record


def test_the_contact_sheet_holds_the_frames_the_mp4_holds(compared):
    """The sheet is made from the frames the pipeline gave, the MP4 from the same frames through
    H.264 at quality 8 (crf 10): frame k of the one is frame k of the other up to the codec."""
    frames, _ = read_video(compared / "p0000_s0.mp4")
    sheet = np.asarray(Image.open(compared / "p0000_s0.png").convert("RGB")).astype(float)
    for k in (0, 8, 16):
        row, column = divmod(k, 5)
        cell = sheet[row * 128 : (row + 1) * 128, column * 128 : (column + 1) * 128]
        assert psnr(cell, frames[k]) > 25, k
    assert sheet[3 * 128 :, 2 * 128 :].min() == 255  # the cells after the last frame stay white


def test_compare_writes_side_by_side_videos_and_sheets(compared):
    out = compared
    assert sorted(p.name for p in (out / "compare").iterdir()) == ["p0000_s0.mp4", "p0000_s0.png"]
    pairs, fps = read_video(out / "compare" / "p0000_s0.mp4")
    baseline, _ = read_video(out / "baseline" / "p0000_s0.mp4")
    agentsd, _ = read_video(out / "p0000_s0.mp4")
    assert len(pairs) == 17 and pairs[0].shape == (128, 256, 3) and fps == 16
    pairs, baseline, agentsd = (np.stack(frames).astype(float) for frames in (pairs, baseline, agentsd))
    for half, same, other in ((pairs[..., :128, :], baseline, agentsd), (pairs[..., 128:, :], agentsd, baseline)):
        assert psnr(half, same) > 25 and psnr(half, same) > psnr(half, other)  # re-encoded: equal up to the codec
    assert Image.open(out / "compare" / "p0000_s0.png").size == (5 * 256, 4 * 128)  # cells of frame pairs


def test_a_rerun_skips_finished_videos_and_refuses_other_settings(model, compared, capsys):
    out = compared
    argv = ["generate", "--model", model, *RUN, "--compare", "--out", out]
    before = files(out)
    code, printed, errors = run_main(capsys, *argv)
    assert code == 0 and "agentsd: 0 written, 1 skipped" in printed and "speedup" not in printed, errors
    for change, difference in (["--frames", "13"], "frames 17 (now 13)"), (["--fps", "8"], "fps 16 (now 8)"):
        code, _, errors = run_main(capsys, *argv, *change)
        assert code == 2 and len(errors) == 1 and difference in errors[0] and "--overwrite" in errors[0], errors
    assert files(out) == before


def test_fps_and_frames_make_the_mp4_and_the_sheet(model, tmp_path, capsys):
    out = tmp_path / "out"
    code, printed, errors = run_main(
        capsys, "generate", "--model", model, "--prompt", "a cat", "--steps", "1", "--frames", "5", "--fps", "8",
        *SIZE, "--no-agent", "--out", out,
    )  # fmt: skip
    assert code == 0 and "baseline: 1 written, 0 skipped" in printed and "s/video" in printed, errors
    frames, fps = read_video(out / "p0000_s0.mp4")
    assert (len(frames), fps) == (5, 8)
    assert Image.open(out / "p0000_s0.png").size == (3 * 128, 2 * 128)  # 5 frames: 3 columns, 2 rows
    assert json.loads((out / "p0000_s0.json").read_text())["fps"] == 8


def test_an_image_model_over_a_video_folder_is_refused(compared, image_model, capsys):
    """The contact sheet and the sidecar have the names an image and its sidecar would have: an
    image model run into the folder finds them made with other settings, and touches nothing."""
    before = files(compared)
    code, _, errors = run_main(capsys, "generate", "--model", image_model, "--prompt", "a cat", "--steps", "1",
                               "--out", compared)  # fmt: skip
    assert code == 2 and "1 image in" in errors[0] and "was made with other settings" in errors[0], errors
    assert files(compared) == before


def test_contact_sheets_of_long_videos_show_every_kth_frame():
    from agentsd.cli.video import contact_sheet, sheet_frames

    assert sheet_frames(81) == list(range(0, 81, 4))  # Wan's 81 frames: 21, every 4th
    assert sheet_frames(25) == list(range(25)) and sheet_frames(1) == [0]
    for count in range(1, 300):
        shown = sheet_frames(count)
        steps = [b - a for a, b in zip(shown, shown[1:], strict=False)]  # evenly, the last one maybe shorter
        assert shown[0] == 0 and shown[-1] == count - 1 and len(shown) <= 25 and len(set(steps[:-1])) <= 1
        assert steps[-1:] <= steps[:1] and (count > 25 or steps == [1] * (count - 1))
    frames = [Image.new("RGB", (832, 480), (k, 0, 0)) for k in range(81)]
    sheet = contact_sheet(frames)
    assert sheet.size == (5 * 416, 5 * 240)  # 480p frames halved, 21 of them in 5 columns
    assert sheet.getpixel((0, 240 * 4)) == (80, 0, 0)  # the 21st cell (row 5, column 1): the last frame


@pytest.mark.parametrize("frames, message", [("16", "use 13 or 17"), ("80", "use 77 or 81"), ("0", "must be positive")])
def test_a_frame_count_wan_cannot_make_is_refused_before_anything(model, tmp_path, capsys, monkeypatch, frames,
                                                                  message):  # fmt: skip
    from agentsd.cli import loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "new" / "out"
    argv = ["generate", "--model", model, "--prompt", "a cat", "--frames", frames, *SIZE, "--out", out]
    code, _, errors = run_main(capsys, *argv)
    assert code == 2 and len(errors) == 1 and f"frames {frames}" in errors[0] and message in errors[0], errors
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("flag", [["--frames", "17"], ["--fps", "8"]])
def test_video_flags_on_an_image_model_are_refused(image_model, tmp_path, capsys, flag):
    out = tmp_path / "out"
    code, _, errors = run_main(capsys, "generate", "--model", image_model, "--prompt", "a cat", *flag, "--out", out)
    assert code == 2 and f"{flag[0]} is for video models" in errors[0], errors
    assert not out.exists()


@pytest.mark.parametrize("command", [["generate", "--prompt", "a cat"], ["compare", "--num-prompts", "1"]])
@pytest.mark.parametrize("when", ["before loading", "once loaded"])
def test_without_the_video_extra_a_video_model_is_refused_naming_it(model, tmp_path, capsys, monkeypatch, command,
                                                                    when):  # fmt: skip
    """imageio-ffmpeg missing (an import that fails): one line naming the extra, before the model is
    loaded where its model_index.json can be read; otherwise once loaded, its folder removed again."""
    from agentsd.cli import loading, pipeline_checks

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    if when == "once loaded":
        monkeypatch.setattr(pipeline_checks, "model_pipeline_class", lambda model: None)
    else:
        monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "new" / "out"
    code, _, errors = run_main(capsys, *command, "--model", model, "--steps", "1", *SIZE, "--out", out)
    assert code == 2 and len(errors) == 1 and EXTRA in errors[0] and "imageio-ffmpeg" in errors[0], errors
    assert not (tmp_path / "new").exists()


def test_image_models_need_no_video_extra(image_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio", None)
    code, _, errors = run_main(capsys, "generate", "--model", image_model, "--prompt", "a cat", "--steps", "1",
                               "--out", tmp_path / "out")  # fmt: skip
    assert code == 0 and (tmp_path / "out" / "p0000_s0.png").exists(), errors


@pytest.mark.parametrize("kind, pipeline", [("wan-v2v", "WanVideoToVideoPipeline"),
                                            ("wan-i2v", "WanImageToVideoPipeline")])  # fmt: skip
def test_an_image_or_video_conditioned_wan_model_is_refused_naming_it(tmp_path, capsys, kind, pipeline):
    folder = tmp_path / kind
    tiny_wan_pipeline(kind=kind).save_pretrained(folder)
    out = tmp_path / "out"
    code, _, errors = run_main(capsys, "generate", "--model", folder, "--prompt", "a cat", *SIZE, "--out", out)
    assert code == 2 and f"loads as {pipeline}" in errors[0] and "text-to-video model" in errors[0], errors
    assert not out.exists()


def test_flow_euler_keeps_the_flow_shift_of_wans_scheduler():
    """Wan's models come with UniPC shifted by `flow_shift` (3.0 at 480p); `--scheduler flow-euler`
    built from that config took FlowMatch's own `shift`, 1.0, and sampled an unshifted schedule."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from agentsd.cli.schedulers import set_scheduler

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = SimpleNamespace(scheduler=unipc)
    set_scheduler(pipe, "flow-euler")
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    for scheduler in (pipe.scheduler, reference):
        scheduler.set_timesteps(4)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.scheduler.config.shift == 3.0
    assert torch.allclose(pipe.scheduler.sigmas, reference.sigmas)


# ---------------------------------------------------------------- agentsd compare


@pytest.fixture(scope="module")
def scored(model, tmp_path_factory):
    """`compare` of the baseline and the `wan` preset on two prompts, 1 step (in the agent phase):
    its folder and command line."""
    from agentsd.cli.commands import main

    out = tmp_path_factory.mktemp("compare") / "out"
    prompts = out.parent / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    argv = ["compare", "--model", model, "--prompts-file", prompts, "--steps", "1", "--frames", "17", *SIZE,
            "--no-memory", "--out", out]  # fmt: skip
    code = main([str(a) for a in argv])
    assert code == 0
    return out, argv


def test_compare_scores_videos_frame_by_frame(scored):
    """PSNR to the baseline, computed here with numpy on the frames imageio decodes: per frame,
    averaged over the videos frame by frame (`per_frame`) and over every frame of every video."""
    out = scored[0]
    results = json.loads((out / "results.json").read_text())
    baseline, wan = results["rows"]
    assert (baseline["method"], wan["method"]) == ("baseline", "wan") and results["frames"] == 17
    by_hand = []
    for name in ("p0000_s0", "p0001_s1"):
        frames = [read_video(out / "images" / method / f"{name}.mp4")[0] for method in ("baseline", "wan")]
        by_hand.append([psnr(a, b) for a, b in zip(*frames, strict=True)])
    assert wan["psnr"] == pytest.approx(np.mean(by_hand), rel=1e-4)
    assert wan["per_frame"]["psnr"] == pytest.approx(np.mean(by_hand, axis=0).tolist(), rel=1e-4)
    assert len(wan["per_frame"]["ssim"]) == 17 and 0 < wan["ssim"] < 1
    assert "psnr" not in baseline and "fid" not in results["settings"]
    assert results["settings"]["frames"] == 17 and results["settings"]["fps"] == 16
    assert "FVD is not computed" in results["fvd"] and "I3D" in results["fvd"]
    report = (out / "results.md").read_text()
    assert "FVD is not computed" in report and "s/video" in report


def test_the_clip_score_of_a_video_is_that_of_its_frames(scored, tmp_path, monkeypatch):
    """Every decoded frame goes to torchmetrics' CLIPScore with its video's prompt. (CLIPScore itself
    is stood in for: torchmetrics 1.9 runs no CLIP model under transformers 5, whose
    `get_image_features` returns a model output, and loads no local folder without "openai" in its
    path.)"""
    import torchmetrics.multimodal.clip_score

    from agentsd.cli.metrics import clip_score

    seen = []

    class Recorder:
        def __init__(self, model_name_or_path):
            pass

        def update(self, images, texts):
            seen.extend(zip(images, texts, strict=True))

        def compute(self):
            return torch.tensor(21.5)

    monkeypatch.setattr(torchmetrics.multimodal.clip_score, "CLIPScore", Recorder)
    paths = [scored[0] / "images" / "wan" / f"{name}.mp4" for name in ("p0000_s0", "p0001_s1")]
    assert clip_score(paths, ["a cat", "a dog"], tmp_path, batch_size=5) == 21.5  # batches across the videos
    prompts = {"p0000_s0": "a cat", "p0001_s1": "a dog"}
    expected = [(frame, prompts[path.stem]) for path in paths for frame in read_video(path)[0]]
    assert len(seen) == len(expected) == 34
    for (image, text), (frame, prompt) in zip(seen, expected, strict=True):
        assert text == prompt and torch.equal(image, torch.from_numpy(frame).permute(2, 0, 1))


def test_compare_samples_show_the_contact_sheets(scored):
    samples = Image.open(scored[0] / "samples.png")
    assert samples.size == (2 * 320, 2 * 256)  # 2 prompts x 2 methods, 640 x 512 sheets at 256 px high


def test_a_compare_rerun_with_other_frames_is_refused(model, scored, capsys):
    out, argv = scored
    before = files(out)
    at = argv.index("--frames")
    code, _, errors = run_main(capsys, *argv[:at], "--frames", "13", *argv[at + 2 :])
    assert code == 2 and "frames 17 (now 13)" in errors[0], errors
    assert files(out) == before


def test_fid_on_videos_is_refused_before_anything(model, tmp_path, capsys, monkeypatch):
    from agentsd.cli import loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    reference = tmp_path / "reference"
    reference.mkdir()
    out = tmp_path / "out"
    code, _, errors = run_main(capsys, "compare", "--model", model, "--num-prompts", "1", *SIZE,
                               "--reference", reference, "--out", out)  # fmt: skip
    assert code == 2 and "--reference" in errors[0] and "FVD" in errors[0], errors
    assert not out.exists()
