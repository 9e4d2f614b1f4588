"""agentsd on CUDA: half precision (fp16 and bf16), identical calls, the xformers backend,
inductor and host synchronisation.

Every test here needs a CUDA device and is skipped without one (as on CI); the GPU suite's
`tests` scenario runs them (`pytest -m gpu`, the inductor test in `tests-compile`) and records
each outcome. The patch cycle of SD 1.x in fp16 and `enable_model_cpu_offload` on CUDA are in
test_compat.py.
"""

import warnings

import numpy as np
import pytest
import torch
from test_compat import check_patch_cycle, generate
from test_compile import TIMESTEPS, run

import agentsd
from agentsd.processors.self_attention import AgentSDProcessor
from agentsd.testing import tiny_pipeline, tiny_unet

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def cuda_pipeline(kind):
    return tiny_pipeline(kind).to("cuda", torch.float16)


def patched_layers(pipe):
    """(Attention module, agentsd processor) of every patched layer."""
    return [
        (pipe.unet.get_submodule(name.removesuffix(".processor")), processor)
        for name, processor in pipe.unet.attn_processors.items()
        if isinstance(processor, AgentSDProcessor)
    ]


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_fp16_patch_cycle(kind):
    """fp16 on CUDA with the SD 2.x and SDXL pipelines (SD 1.x: test_compat.test_cuda_fp16)."""
    check_patch_cycle(cuda_pipeline(kind), {}, max_downsample=2 if kind == "sdxl" else 1)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_bf16_patch_cycle(kind):
    """bf16 on CUDA, agentsd's kernels and the baseline's alike: the patched images are finite and
    differ from the baseline, and unpatching gives the baseline back bit for bit."""
    pipe = tiny_pipeline(kind).to("cuda", torch.bfloat16)
    check_patch_cycle(pipe, {}, max_downsample=2 if kind == "sdxl" else 1)


def test_two_identical_calls_give_identical_images():
    """The same seed twice gives the same images bit for bit, patched, in fp16 on CUDA, through
    both phases (agent_steps=0.5 of 4 steps). agentsd reseeds its destination draws from its
    own seed and the timestep at every UNet call; what could still differ on CUDA is the order
    in which the merges' `index_add_` sums (atomic adds)."""
    pipe = cuda_pipeline("sd15")
    baseline = generate(pipe, {})
    with agentsd.patched(pipe, agent_steps=0.5, min_tokens=0):
        first, second = generate(pipe, {}), generate(pipe, {})
    assert np.isfinite(first).all() and not np.array_equal(first, baseline)  # agentsd acted
    assert np.array_equal(first, second)


def test_sd2_softmaxes_run_in_fp32_automatically():
    """The SD 2.x UNet sets `upcast_attention`: with `attn_precision=None` agentsd computes both
    softmaxes in fp32 there, so its fp16 output is the one of an explicit `attn_precision="fp32"`,
    bit for bit. The SD 1.x UNet does not upcast: there the model's dtype is kept."""
    pipe = cuda_pipeline("sd2")
    with agentsd.patched(pipe, agent_steps=1.0, min_tokens=0):
        layers = patched_layers(pipe)
        assert layers and all(processor.precision(attn) == torch.float32 for attn, processor in layers)
        automatic = generate(pipe, {})
    with agentsd.patched(pipe, agent_steps=1.0, min_tokens=0, attn_precision="fp32"):
        explicit = generate(pipe, {})
    assert np.isfinite(automatic).all() and np.array_equal(automatic, explicit)

    sd15 = cuda_pipeline("sd15")
    with agentsd.patched(sd15, agent_steps=1.0, min_tokens=0):
        layers = patched_layers(sd15)
        assert layers and all(processor.precision(attn) is None for attn, processor in layers)


def xformers_or_skip():
    """xformers' module, or a skip saying why it cannot run here (not installed, or built for
    another torch / CUDA)."""
    xformers = pytest.importorskip("xformers.ops")
    q = torch.randn(1, 16, 2, 8, device="cuda", dtype=torch.float16)
    try:
        xformers.memory_efficient_attention(q, q, q)
    except Exception as err:  # a wheel built for another torch or CUDA fails only when called
        pytest.skip(f"xformers does not run here: {type(err).__name__}: {err}")
    return xformers


def test_xformers_backend():
    """`attention_backend="xformers"`: the patch cycle, and the same images as the SDPA
    backend up to fp16 kernel differences (both compute exact attention products)."""
    xformers_or_skip()
    pipe = cuda_pipeline("sd15")
    check_patch_cycle(pipe, {}, attention_backend="xformers")
    with agentsd.patched(pipe, agent_steps=1.0, min_tokens=0, attention_backend="xformers"):
        with_xformers = generate(pipe, {})
    with agentsd.patched(pipe, agent_steps=1.0, min_tokens=0, attention_backend="sdpa"):
        with_sdpa = generate(pipe, {})
    np.testing.assert_allclose(with_xformers, with_sdpa, atol=2e-2)


def test_xformers_chosen_after_enable_xformers_memory_efficient_attention():
    """With diffusers' xformers processors in place, the default backend is xformers: the
    output is the explicit xformers backend's, bit for bit, and unpatching gives the xformers
    processors back (the patch cycle)."""
    xformers_or_skip()
    pipe = cuda_pipeline("sd15")
    pipe.enable_xformers_memory_efficient_attention()
    check_patch_cycle(pipe, {})
    with agentsd.patched(pipe, agent_steps=1.0, min_tokens=0):
        automatic = generate(pipe, {})
    with agentsd.patched(pipe, agent_steps=1.0, min_tokens=0, attention_backend="xformers"):
        explicit = generate(pipe, {})
    assert np.array_equal(automatic, explicit)


def test_inductor_compiled_patched_unet_matches_eager_without_recompiling():
    """torch.compile with inductor (Triton kernels) on CUDA: one compilation per phase, no
    recompile once both phases ran, outputs equal to eager up to fp16 kernel differences
    (test_compile.py checks the same with aot_eager on the CPU)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    unet = tiny_unet("sd15").to("cuda", torch.float16).eval()
    agentsd.patch(unet)
    sample = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
    context = torch.randn(2, 77, 32, device="cuda", dtype=torch.float16)
    eager = run(unet, sample, context)
    compiled = torch.compile(unet, backend="inductor")
    warm = run(compiled, sample, context)
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = run(compiled, sample, context)
    for e, w, a in zip(eager, warm, again, strict=True):
        torch.testing.assert_close(w, e, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(a, w)  # the second pass runs the same graphs
    assert len(eager) == len(TIMESTEPS)


def synchronizations(call) -> int:
    """How many synchronizing CUDA operations `call` runs (torch's sync debug mode warns on each)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_patch_adds_at_most_one_host_sync_per_unet_call():
    """A patched UNet call synchronizes the host at most once more than the unpatched one (the
    pre-hook reading the timestep), in each phase; the timestep is a CUDA tensor, as the
    pipelines pass it. Each count is taken on a second call (the first one warms up)."""
    assert synchronizations(lambda: torch.ones(1, device="cuda").item()) >= 1  # the counter counts
    torch.manual_seed(0)
    unet = tiny_unet("sd15").to("cuda", torch.float16).eval()
    sample = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
    context = torch.randn(2, 77, 32, device="cuda", dtype=torch.float16)

    def count(timestep):
        t = torch.tensor(timestep, device="cuda")
        with torch.no_grad():
            unet(sample, t, encoder_hidden_states=context)
            return synchronizations(lambda: unet(sample, t, encoder_hidden_states=context))

    for timestep in (981, 541):  # agent phase, ToMe phase
        baseline = count(timestep)
        with agentsd.patched(unet):
            patched = count(timestep)
            assert agentsd.current_phase(unet) == ("agent" if timestep == 981 else "tome")
        assert patched - baseline <= 1, f"t={timestep}: {patched} synchronizations, baseline {baseline}"
