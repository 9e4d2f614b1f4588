"""`agentsd generate` and `agentsd compare` on the diffusion transformers (SD 3, SD 3.5,
PixArt-Sigma): the model family picks the preset and the call arguments, and what does not fit
the model is refused before any work."""

import pytest

from agentsd import loading
from agentsd.generation import GenerationError, GenerationSettings, ImageJob, generate
from agentsd.testing import tiny_pipeline

pytest.importorskip("agentsd.tiny_dit", reason="this diffusers has no SD3 or PixArt-Sigma")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for kind in ("sd15", "sdxl", "sd3", "sd35", "pixart"):
        tiny_pipeline(kind).save_pretrained(root / kind)
    return root


@pytest.mark.parametrize(
    "kind, preset", [("sd15", "paper"), ("sdxl", "sdxl"), ("sd3", "sd3"), ("sd35", "sd3"), ("pixart", "pixart")]
)
def test_the_default_preset_follows_the_model_family(models, kind, preset):
    assert loading.model_default_preset(str(models / kind)) == preset  # from the config files alone
    assert loading.default_preset(tiny_pipeline(kind)) == preset


def test_a_model_whose_configs_cannot_be_read_has_no_default_preset_before_loading(tmp_path):
    assert loading.model_default_preset(str(tmp_path / "missing")) is None
    assert loading.model_family(str(tmp_path)) is None


def test_call_options_are_what_each_pipeline_takes():
    """PixArt runs the size asked (no resolution binning) and the prompt as written (no caption
    cleaning, which needs beautifulsoup4 and ftfy); the T5 prompt length only when given."""
    sd15, sd3, pixart = (tiny_pipeline(kind) for kind in ("sd15", "sd3", "pixart"))
    assert loading.call_options(sd15) == {} and loading.call_options(sd3) == {}
    assert loading.call_options(sd3, 16) == {"max_sequence_length": 16}
    assert loading.call_options(pixart, 16) == dict(
        use_resolution_binning=False, clean_caption=False, max_sequence_length=16
    )
    assert [loading.prompt_length(p) for p in (sd15, sd3, pixart)] == [None, 256, 300]
    assert loading.prompt_length(sd3, 16) == 16


def test_a_size_that_is_not_whole_patches_is_refused_before_any_work(tmp_path):
    pipe = tiny_pipeline("sd3")
    pipe.vae_scale_factor = 8  # as SD 3's own VAE: 16 px per 2x2 patch
    with pytest.raises(GenerationError, match=r"width 1000 is not a multiple of 16, .* use e\.g\. 992"):
        loading.check_size(pipe, 1000, 1024)
    loading.check_size(pipe, 1024, 512)
    with pytest.raises(GenerationError, match="height 520 is not a multiple of 16"):
        generate(pipe, [ImageJob(0, "x", 0)], tmp_path / "out", GenerationSettings("tiny", height=520), None)
    assert not (tmp_path / "out").exists()
    loading.check_size(tiny_pipeline("sd15"), 72, 56)  # a UNet: multiples of the VAE's factor
