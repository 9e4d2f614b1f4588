"""Preset files load and validate; the community pipelines load through custom_pipeline."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import agentsd
from agentsd import AgentSDConfig
from agentsd.api.presets import describe_presets, load_preset, preset_names
from agentsd.testing import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_preset_loads_validates_and_is_described():
    assert set(preset_names()) >= {"paper", "sd21", "sdxl", "highres"}
    for name in preset_names():
        assert isinstance(load_preset(name), AgentSDConfig)
        assert describe_presets()[name]
        assert (ROOT / "configs" / f"{name}.yaml").read_text().startswith("#"), "each file says what it is for"


def test_preset_contents():
    assert load_preset("paper") == AgentSDConfig()
    assert load_preset("sd21").attn_precision == "fp32"
    assert load_preset("sdxl").max_downsample == 2
    assert load_preset("highres").max_downsample >= 2


def test_preset_from_a_path_and_its_errors(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("config:\n  ratio: 0.25\n")
    assert load_preset(good).ratio == 0.25
    cases = {
        "bad.yaml": ("config:\n  ratio: 3\n", "AgentSDConfig.ratio=3"),
        "typo.yaml": ("config:\n  raito: 0.3\n", "no field raito"),
        "flat.yaml": ("ratio: 0.3\n", "`config:` mapping"),
        "broken.yaml": ("config: [\n", "not valid YAML"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            load_preset(tmp_path / name)
    with pytest.raises(ValueError, match="does not exist"):
        load_preset(tmp_path / "absent.yaml")


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    """`--out sdxl` leaves a folder `sdxl`: the name still means the shipped preset, everywhere a
    preset name is taken (the flag, compare's methods, the community pipelines' default). A file
    is read as a file, with or without a suffix."""
    from agentsd.api.community import resolve_config
    from agentsd.cli.commands import agent_config, build_parser
    from agentsd.cli.comparison import parse_method

    monkeypatch.chdir(tmp_path)
    for name in ("paper", "sdxl", "highres"):
        (tmp_path / name).mkdir()
    assert load_preset("paper") == AgentSDConfig() and load_preset("sdxl").max_downsample == 2
    args = build_parser().parse_args(["generate", "--prompt", "p", "--preset", "sdxl"])
    assert agent_config(args) == load_preset(ROOT / "configs" / "sdxl.yaml")
    assert (
        parse_method("highres:ratio=0.2").config.max_downsample
        == load_preset(ROOT / "configs" / "highres.yaml").max_downsample
    )
    assert resolve_config(None, "sdxl").max_downsample == 2
    (tmp_path / "mine").write_text("config:\n  ratio: 0.25\n")
    assert load_preset("mine").ratio == 0.25
    with pytest.raises(ValueError, match="'sdxl/' is a folder"):
        load_preset("sdxl/")


def test_community_pipeline_paths_are_the_repository_files_and_unknown_names_are_refused():
    # In a checkout the package hands out the top-level files themselves (no copies to drift).
    assert Path(agentsd.community_pipeline()) == ROOT / "pipelines" / "agentsd_sd.py"
    assert Path(agentsd.community_pipeline("sdxl")) == ROOT / "pipelines" / "agentsd_sdxl.py"
    assert Path(agentsd.community_pipeline("sd3")) == ROOT / "pipelines" / "agentsd_sd3.py"
    with pytest.raises(ValueError, match="unknown community pipeline 'xl': use one of 'sd', 'sdxl', 'sd3'"):
        agentsd.community_pipeline("xl")


@pytest.mark.parametrize("kind, name, default", [("sd15", "sd", "paper"), ("sdxl", "sdxl", "sdxl")])
def test_community_pipeline_loads_through_custom_pipeline(kind, name, default, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_pipeline(kind).save_pretrained(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(
        tmp_path, custom_pipeline=agentsd.community_pipeline(name), trust_remote_code=True
    )
    assert type(pipe).__name__.startswith("AgentSD")
    pipe.set_progress_bar_config(disable=True)
    run = dict(prompt="x", num_inference_steps=3, output_type="np")
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(agentsd.patched_config(m)))

    def image(**kwargs):
        return pipe(generator=torch.Generator().manual_seed(0), **run, **kwargs).images

    image()
    assert seen[-1] == load_preset(default)
    baseline = image(agentsd_config=False)
    assert seen[-1] is None
    # The tiny SDXL's grids are under the preset's min_tokens floor: lower it to see agentsd act.
    patched = image(agentsd_config=load_preset(default).replace(min_tokens=0))
    assert np.isfinite(patched).all() and not np.array_equal(patched, baseline)
    assert not agentsd.is_patched(pipe)
    image(agentsd_config={"ratio": 0.2, "max_downsample": 2})
    assert seen[-1].ratio == 0.2
    with pytest.raises(TypeError, match="agentsd_config=3"):
        image(agentsd_config=3)


def test_sd3_community_pipeline_loads_through_custom_pipeline(tmp_path, monkeypatch):
    """The SD 3 pipeline file: its `sd3` preset by default (patched for the call only), the
    baseline with `agentsd_config=False`, a dict of fields."""
    tiny_dit = pytest.importorskip("agentsd.testing.tiny_dit", reason="this diffusers has no SD3")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_pipeline("sd3").save_pretrained(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(
        tmp_path, custom_pipeline=agentsd.community_pipeline("sd3"), trust_remote_code=True
    )
    assert type(pipe).__name__ == "AgentSDStableDiffusion3Pipeline"
    pipe.set_progress_bar_config(disable=True)
    run = dict(prompt="x", num_inference_steps=3, output_type="np", **tiny_dit.CALL_KWARGS["sd3"])
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: seen.append(agentsd.patched_config(m)))

    def image(**kwargs):
        return pipe(generator=torch.Generator().manual_seed(0), **run, **kwargs).images

    patched = image()  # 128 px: a 16x16 grid, at the preset's min_tokens: agentsd acts
    assert seen[-1] == load_preset("sd3") and not agentsd.is_patched(pipe)
    baseline = image(agentsd_config=False)
    assert seen[-1] is None
    assert np.isfinite(patched).all() and not np.array_equal(patched, baseline)
    image(agentsd_config={"ratio": 0.2})
    assert seen[-1].ratio == 0.2
