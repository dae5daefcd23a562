"""load_diffusers: a saved DDPM/DDIM pipeline as a diffmem denoiser, golden against diffusers' own
scheduler loops, and refusal of files diffmem cannot load safely or faithfully."""

import json
import pickle

import pytest
import torch

from diffmem.core import initial_noise, seeded_generators
from diffmem.models.pretrained import load_diffusers

diffusers = pytest.importorskip("diffusers")
STEPS = 10  # inference steps of the golden loops (divides T = 1000, where both step rules agree)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def save_pipeline(unet, folder, kind="ddim", **scheduler_kw):
    pipe, sched = {
        "ddim": (diffusers.DDIMPipeline, diffusers.DDIMScheduler),
        "ddpm": (diffusers.DDPMPipeline, diffusers.DDPMScheduler),
    }[kind]
    pipe(unet=unet, scheduler=sched(**scheduler_kw)).save_pretrained(folder)
    return folder


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def vp_start(n, seed, sigma_start):
    """The VP x_T ~ N(0, I) that PretrainedModel.sample starts sample i from (seed * 1_000_003 + i)."""
    gens = seeded_generators([seed * 1_000_003 + i for i in range(n)], "cpu")
    x = initial_noise((n, 1, 8, 8), sigma_start, generator=gens, like=torch.zeros(0))
    return x / (1 + sigma_start**2) ** 0.5


@pytest.mark.parametrize(
    ("prediction_type", "clip", "spacing", "offset"),
    [(p, c, s, 0) for p in ("epsilon", "sample") for c in (True, False) for s in ("leading", "trailing")]
    + [("v_prediction", True, "leading", 1), ("epsilon", False, "leading", 1)],
)
def test_ddim_sampling_equals_diffusers_ddim_loop(tmp_path, unet, prediction_type, clip, spacing, offset):
    kw = {"prediction_type": prediction_type, "clip_sample": clip, "timestep_spacing": spacing, "steps_offset": offset}
    folder = save_pipeline(unet, tmp_path / "p", **kw)
    model = load_diffusers(folder)
    assert (model.sampler, model.steps, model.scheduler_class) == ("ddim", 50, "DDIMScheduler")
    assert (model.prediction_type, model.spacing, model.steps_offset) == (prediction_type, spacing, offset)
    assert model.data_range == ((-1.0, 1.0) if clip else None)
    assert model.event_shape == (1, 8, 8)
    x = model.sample(3, seed=2, steps=STEPS, batch_size=2, progress=False)  # (3, 64)

    sched = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    sched.set_timesteps(STEPS)
    y = vp_start(3, 2, float(model.schedule.sigmas[sched.timesteps[0]]))
    with torch.no_grad():
        for t in sched.timesteps:
            # diffmem re-derives eps from the clipped x0 (GLIDE's rule); without clipping the flag is moot
            y = sched.step(unet(y, t).sample, t, y, eta=0.0, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(x, y.reshape(3, -1), rtol=1e-5, atol=1e-4)
    if clip:
        assert float(x.abs().max()) <= 1.0 + 1e-6


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddpm_pipeline_settings_and_betas(tmp_path, unet, beta_schedule):
    kw = {"beta_schedule": beta_schedule, "beta_start": 0.00085, "beta_end": 0.012}
    folder = save_pipeline(unet, tmp_path / "p", "ddpm", **kw)
    model = load_diffusers(folder)
    assert (model.sampler, model.steps, model.scheduler_class) == ("ddpm", 1000, "DDPMScheduler")
    assert (model.spacing, model.steps_offset, model.data_range) == ("leading", 0, (-1.0, 1.0))
    assert model.source == str(folder / "unet") and model.scheduler_config["beta_schedule"] == beta_schedule
    betas = diffusers.DDPMScheduler(**kw).betas.to(torch.float64)
    assert model.schedule.betas.dtype == torch.float64
    torch.testing.assert_close(model.schedule.betas, betas, rtol=0, atol=1e-12)


def test_ddpm_ancestral_sampling_equals_diffusers_ddpm_loop(tmp_path, unet):
    # one generator per sample: sample i's initial noise and step noises are one stream, as in diffusers
    folder = save_pipeline(unet, tmp_path / "p", "ddpm")
    model = load_diffusers(folder)
    x = model.sample(2, seed=5, steps=STEPS, progress=False)
    sched = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    sched.set_timesteps(STEPS)
    for i in range(2):
        g = torch.Generator().manual_seed(5 * 1_000_003 + i)
        y = torch.randn(1, 1, 8, 8, generator=g)
        with torch.no_grad():
            for t in sched.timesteps:
                y = sched.step(unet(y, t).sample, t, y, generator=g).prev_sample
        torch.testing.assert_close(x[i], y.reshape(-1), rtol=1e-5, atol=1e-4)
    # a sample depends on its seed only, not on the batch it is drawn in
    torch.testing.assert_close(model.sample(2, seed=5, steps=STEPS, batch_size=1, progress=False), x)


def test_denoiser_is_the_unet_and_bare_folder_takes_a_scheduler(tmp_path, unet):
    folder = save_pipeline(unet, tmp_path / "p", "ddim", prediction_type="epsilon")
    model = load_diffusers(folder, dtype=torch.float64)
    assert not model.unet.training and not any(p.requires_grad for p in model.unet.parameters())
    t = torch.tensor([10, 700])
    s = model.schedule.sigmas[t].float()  # (2,)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = model.denoiser(x, s)
    assert out.dtype == torch.float32  # the float64 network answers in the caller's dtype
    x_t = x / (1 + s**2).sqrt().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        eps = unet(x_t, t).sample
    torch.testing.assert_close(out, x - s.reshape(-1, 1, 1, 1) * eps, rtol=1e-4, atol=1e-4)

    with pytest.raises(ValueError, match=r"bare UNet folder.*pass scheduler="):
        load_diffusers(folder / "unet")
    for scheduler in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler", folder):
        bare = load_diffusers(folder / "unet", scheduler=scheduler)
        assert (bare.sampler, bare.steps, bare.event_shape) == ("ddim", 50, (1, 8, 8))
        torch.testing.assert_close(bare.denoiser(x, s), model.denoiser(x, s), rtol=1e-5, atol=1e-5)


class _WritesMarker:
    """Unpickling this object opens (creates) the marker file: what a malicious pickle could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_are_refused_unopened(tmp_path, unet):
    folder = save_pipeline(unet, tmp_path / "p")
    marker = tmp_path / "unpickled"
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_WritesMarker(marker)))
    pattern = r"pickled weights \(diffusion_pytorch_model\.bin\).*execute arbitrary code.*safe_serialization=True"
    with pytest.raises(ValueError, match=pattern):
        load_diffusers(folder)
    assert not marker.exists()
    # a pickle renamed to .safetensors is recognised by its first bytes
    (folder / "unet" / "diffusion_pytorch_model.bin").rename(folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="pickle-based file"):
        load_diffusers(folder)
    assert not marker.exists()


def test_file_level_refusals_name_the_file(tmp_path, unet):
    folder = save_pipeline(unet, tmp_path / "p")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors is truncated or corrupt"):
        load_diffusers(folder)
    weights.write_bytes(data)

    config = folder / "unet" / "config.json"
    text = config.read_text()
    config.write_text(text[:-20])
    with pytest.raises(ValueError, match=r"unet/config\.json is not valid JSON"):
        load_diffusers(folder)
    config.write_text(text)
    edit_json(config, _class_name="UNet2DConditionModel")
    with pytest.raises(ValueError, match=r"unet/config\.json.*UNet2DConditionModel.*conditional models are not"):
        load_diffusers(folder)
    config.write_text(text)
    edit_json(config, num_class_embeds=10)
    with pytest.raises(ValueError, match="class-conditional"):
        load_diffusers(folder)
    config.write_text(text)

    index = folder / "model_index.json"
    edit_json(index, vqvae=["diffusers", "VQModel"])
    with pytest.raises(ValueError, match=r"components \['vqvae'\].*unconditional pixel-space"):
        load_diffusers(folder)
    index.unlink()
    with pytest.raises(ValueError, match="neither model_index.json"):
        load_diffusers(folder)
    with pytest.raises(ValueError, match="is not a folder"):
        load_diffusers(tmp_path / "missing")

    other = save_pipeline(unet, tmp_path / "q")
    (other / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ValueError, match=r"scheduler config not found: .*scheduler_config\.json"):
        load_diffusers(other)


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"thresholding": True}, r"thresholding=True sets dynamic thresholding.*does not implement"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True sets zero-terminal-SNR"),
        ({"set_alpha_to_one": False}, "set_alpha_to_one=False sets DDIM's last step"),
        ({"trained_betas": [0.01] * 1000}, r"trained_betas=\[0\.01, .*\.\.\. sets explicit betas"),
        ({"_class_name": "PNDMScheduler"}, r"'PNDMScheduler' is not supported; supported: \['DDIMScheduler'"),
        ({"prediction_type": "flow"}, r"prediction_type='flow' is not supported; choose one of"),
        ({"beta_schedule": "sigmoid"}, r"beta_schedule='sigmoid' is not supported"),
        ({"timestep_spacing": "karras"}, r"timestep_spacing='karras' is not supported"),
        ({"steps_offset": -1}, r"steps_offset must be an integer >= 0"),
        ({"beta_end": 2.0}, r"scheduler_config\.json: beta_end"),
    ],
)
def test_scheduler_options_diffmem_does_not_implement_are_refused(tmp_path, unet, changes, pattern):
    folder = save_pipeline(unet, tmp_path / "p")
    edit_json(folder / "scheduler" / "scheduler_config.json", **changes)
    with pytest.raises(ValueError, match=pattern):
        load_diffusers(folder)


def test_ddpm_variance_must_be_fixed_small_and_unknown_keys_are_ignored(tmp_path, unet):
    folder = save_pipeline(unet, tmp_path / "p", "ddpm")
    config = folder / "scheduler" / "scheduler_config.json"
    edit_json(config, variance_type="learned_range")
    with pytest.raises(ValueError, match="variance_type='learned_range' sets the DDPM step's noise"):
        load_diffusers(folder)
    edit_json(config, variance_type="fixed_small", some_future_option=3, clip_sample=False)
    model = load_diffusers(folder)
    assert model.data_range is None and model.scheduler_config["some_future_option"] == 3
