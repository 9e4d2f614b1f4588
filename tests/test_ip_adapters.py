"""IP-Adapters on the diffusion transformers keep agent attention: loaded on a patched Flux or SD 3
pipeline, the adapter's processors are served (agent attention for the attention itself, the
adapter's image-prompt branch exactly as the adapter computes it), so at scale 0 the image is the
patched image without the adapter; the adapter's weights stay in the model under their names.

The adapters are loaded through diffusers' own `load_ip_adapter` with small random weights in the
published layouts: Flux's from a local folder holding the weight file and a tiny CLIP image
encoder (the pipeline then encodes an image prompt), SD 3's from a state dict (its image encoder
is SigLIP's, so the call passes image embeddings instead of an image)."""

import copy
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_compat import IMAGE, tiny_image_encoder

import agentsd
from agentsd.testing import tiny_pipeline

tiny_flux = pytest.importorskip("agentsd.testing.tiny_flux", reason="this diffusers has no Flux")
attention_processor = pytest.importorskip("diffusers.models.attention_processor")
if not hasattr(attention_processor, "SD3IPAdapterJointAttnProcessor2_0"):
    pytest.skip("this diffusers has no SD 3 IP-Adapter", allow_module_level=True)

PATCH = dict(min_tokens=0, agent_steps=0.5)  # both phases on the tiny 16x16 grids
SIZE = 128


def flux_ip_adapter(pipe, seed=3):
    """`load_ip_adapter` from a folder: `image_encoder/` (a tiny CLIPVisionModelWithProjection)
    and `ip-adapter.safetensors` (`image_proj.*`: 4 tokens of the text width from the image
    embedding; `ip_adapter.{i}.to_k_ip/to_v_ip`: the i-th double-stream block's projections)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = pipe.transformer
    text_dim, inner, image_dim = model.config.joint_attention_dim, model.inner_dim, 16
    encoder = tiny_image_encoder(image_dim)
    weights = {
        "image_proj.proj.weight": 0.3 * torch.randn(4 * text_dim, image_dim),
        "image_proj.proj.bias": torch.zeros(4 * text_dim),
        "image_proj.norm.weight": torch.ones(text_dim),
        "image_proj.norm.bias": torch.zeros(text_dim),
    }
    for i in range(len(model.transformer_blocks)):
        for name in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{i}.{name}.weight"] = 0.3 * torch.randn(inner, text_dim)
            weights[f"ip_adapter.{i}.{name}.bias"] = 0.1 * torch.randn(inner)
    with tempfile.TemporaryDirectory() as folder:
        encoder.save_pretrained(Path(folder, "image_encoder"))
        save_file(weights, Path(folder, "ip-adapter.safetensors"))
        pipe.load_ip_adapter(
            folder,
            weight_name="ip-adapter.safetensors",
            image_encoder_pretrained_model_name_or_path=str(Path(folder, "image_encoder")),
            image_encoder_dtype=torch.float32,
        )
    return dict(ip_adapter_image=IMAGE)


def sd3_ip_adapter(pipe, seed=3):
    """`load_ip_adapter` from a state dict in diffusers' names: the image projection
    (`IPAdapterTimeImageProjection`) and every attention layer's `SD3IPAdapterJointAttnProcessor2_0`."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    torch.manual_seed(seed)
    model = pipe.transformer
    width, head_dim = (
        model.config.attention_head_dim * model.config.num_attention_heads,
        model.config.attention_head_dim,
    )
    projection = IPAdapterTimeImageProjection(
        embed_dim=16, output_dim=width, hidden_dim=64, heads=1, num_queries=4, timestep_in_dim=32
    )
    layers = {}
    for i in range(len(model.attn_processors)):
        layer = SD3IPAdapterJointAttnProcessor2_0(width, width, head_dim, timesteps_emb_dim=64)
        for name, value in layer.state_dict().items():  # norms near 1, projections small
            layers[f"{i}.{name}"] = 0.3 * torch.randn_like(value) + (name.endswith("norm_q.weight") or "norm_k" in name)
    pipe.load_ip_adapter({"image_proj": projection.state_dict(), "ip_adapter": layers}, image_encoder_folder=None)
    return dict(ip_adapter_image_embeds=torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed)))


ADAPTERS = {"flux": flux_ip_adapter, "sd3": sd3_ip_adapter}
CALLS = {"flux": tiny_flux.CALL_KWARGS["flux"], "sd3": {}}


def generate(pipe, kind, **extra):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a red cube",
        num_inference_steps=3,
        height=SIZE,
        width=SIZE,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **CALLS[kind],
        **extra,
    ).images


def adapter_processors(pipe_or_model):
    model = getattr(pipe_or_model, "transformer", pipe_or_model)
    return {name: p for name, p in model.attn_processors.items() if hasattr(p, "to_k_ip")}


@pytest.mark.parametrize("kind", ADAPTERS)
def test_an_adapter_loaded_after_patching_keeps_agent_attention_and_at_scale_0_changes_nothing(kind):
    pipe = agentsd.patch(tiny_pipeline(kind), **PATCH)
    patched = generate(pipe, kind)
    extra = ADAPTERS[kind](pipe)
    assert adapter_processors(pipe)
    pipe.set_ip_adapter_scale(0.0)
    assert np.array_equal(generate(pipe, kind, **extra), patched)
    status = agentsd.status(pipe)
    assert {layer.mode for layer in status.layers} == {"tome"} and not any(layer.reason for layer in status.layers)
    served = {layer.name for layer in status.layers if "IPAdapter" in layer.processor}
    assert served == set(adapter_processors(pipe))  # every adapter layer still runs agentsd
    pipe.set_ip_adapter_scale(0.8)  # set on the processors agentsd wraps now: it reaches the adapter
    assert abs(generate(pipe, kind, **extra) - patched).max() > 1e-3


@pytest.mark.parametrize("kind", ADAPTERS)
def test_the_image_prompt_branch_is_the_adapters_own(kind):
    """In every adapter layer of a patched call: Flux's third output is the adapter's own; SD 3's
    output moves from scale 0 to scale 0.8 by what the adapter's own output moves (the branch is
    added before the output projection, an affine map). The adapter runs on the layer's inputs in
    a hook, under the call's plan."""
    pipe = agentsd.patch(tiny_pipeline(kind), **PATCH)
    extra = ADAPTERS[kind](pipe)
    pipe.set_ip_adapter_scale(0.8)
    generate(pipe, kind, **extra)  # agentsd wraps the adapters at the first call
    compared = []

    def check(module, args, kwargs, output):
        adapter = module.processor.original
        theirs = adapter(module, **kwargs)
        if kind == "flux":
            compared.append((output[2], theirs[2]))
            return
        ours_by_scale, theirs_by_scale = {0.8: output[0]}, {0.8: theirs[0]}
        adapter.scale = 0.0
        ours_by_scale[0.0], theirs_by_scale[0.0] = module.processor(module, **kwargs)[0], adapter(module, **kwargs)[0]
        adapter.scale = 0.8
        compared.append((ours_by_scale[0.8] - ours_by_scale[0.0], theirs_by_scale[0.8] - theirs_by_scale[0.0]))

    modules = [pipe.transformer.get_submodule(name.removesuffix(".processor")) for name in adapter_processors(pipe)]
    hooks = [m.register_forward_hook(check, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            generate(pipe, kind, **extra)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(compared) == 3 * len(modules)  # steps x layers (guidance is batched)
    for ours, theirs in compared:
        assert theirs.abs().max() > 1e-3
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ADAPTERS)
def test_the_adapters_weights_stay_in_the_model(kind):
    pipe = tiny_pipeline(kind)
    extra = ADAPTERS[kind](pipe)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    adapters = adapter_processors(pipe)
    agentsd.patch(pipe, **PATCH)
    generate(pipe, kind, **extra)
    wrapped = adapter_processors(pipe)
    assert all(type(p).__module__.startswith("agentsd") for p in wrapped.values())
    after = pipe.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    pipe.transformer.to(torch.float64)  # a move reaches the adapter's weights
    assert all(
        p.to_k_ip.weight.dtype == torch.float64 if kind == "sd3" else p.to_k_ip[0].weight.dtype == torch.float64
        for p in adapters.values()
    )
    twin = copy.deepcopy(pipe.transformer)  # a copy's wrappers share their own adapter copies' weights
    assert twin.state_dict().keys() == after.keys()
    assert all(p._parameters is p.original._parameters for p in adapter_processors(twin).values())
    agentsd.unpatch(pipe)
    assert adapter_processors(pipe) == adapters  # the adapter's own processor objects are back
    assert all(pipe.transformer.get_submodule(n.removesuffix(".processor")).processor is p for n, p in adapters.items())


@pytest.mark.parametrize("kind", ADAPTERS)
def test_unloading_the_adapter_from_a_patched_pipeline_gives_the_patched_image(kind):
    pipe = agentsd.patch(tiny_pipeline(kind), **PATCH)
    patched = generate(pipe, kind)
    extra = ADAPTERS[kind](pipe)
    generate(pipe, kind, **extra)
    pipe.unload_ip_adapter()
    assert not adapter_processors(pipe)
    assert np.array_equal(generate(pipe, kind), patched)
    assert agentsd.is_patched(pipe) and all(layer.mode == "tome" for layer in agentsd.status(pipe).layers)
