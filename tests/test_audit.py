"""`diffmem audit`: a model trained elsewhere, or a folder of generated images, against its training images."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from diffmem.cli import app
from diffmem.evaluate.audit import AuditConfig, audit
from diffmem.evaluate.metrics import PixelL2, neighbours, streamed_neighbours
from diffmem.report.audit import write_audit

runner = CliRunner()


def _digits_uint8() -> np.ndarray:
    """The 1,797 scikit-learn digits as uint8 images (N, 8, 8)."""
    return np.round(load_digits().images * (255 / 16)).astype(np.uint8)


def _write_folder(path, images: np.ndarray, prefix: str = "img") -> None:
    path.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im, mode="L").save(path / f"{prefix}-{i:04d}.png")


def _to_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32)[:, None] / 127.5 - 1


# ------------------------------------------------------------------------------------------------
# The streamed exact search
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_streamed_neighbours_equal_one_exact_search(k):
    g = torch.Generator().manual_seed(0)
    refs = torch.randn(50, 6, generator=g)
    refs[10] = refs[3]  # an exact duplicate: ties resolve to the lower index, as in one search
    queries = torch.cat([torch.randn(20, 6, generator=g), refs[3:4]])
    metric = PixelL2()
    want = neighbours(metric, queries, refs, k, embedded=True)
    got = streamed_neighbours(metric, queries, refs.numpy(), k, chunk=7)
    assert torch.equal(got.indices, want.indices)
    assert torch.allclose(got.distances, want.distances, rtol=0, atol=1e-12)


def test_streamed_leave_one_out_excludes_only_the_query_itself():
    g = torch.Generator().manual_seed(1)
    refs = torch.randn(40, 5, generator=g)
    refs[7] = refs[21]  # a duplicate pair: each is the other's neighbour at distance 0
    metric = PixelL2()
    want = neighbours(metric, refs, refs, 2, exclude_self=True, embedded=True)
    got = streamed_neighbours(metric, refs, refs.numpy(), 2, query_offset=0, chunk=6)
    assert torch.equal(got.indices, want.indices)
    assert got.indices[7, 0] == 21 and got.indices[21, 0] == 7 and got.distances[7, 0] == 0
    part = streamed_neighbours(metric, refs[20:30], refs.numpy(), 1, query_offset=20, chunk=6)
    assert torch.equal(part.indices, want.indices[20:30, :1])


def test_streamed_neighbours_refuse_impossible_k():
    with pytest.raises(ValueError, match=r"k must lie in \[1, 3\]"):
        streamed_neighbours(PixelL2(), torch.zeros(2, 3), np.zeros((4, 3), np.float32), 4, query_offset=0)


# ------------------------------------------------------------------------------------------------
# Generated folders: each kind of image in its class
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory):
    """Training, held-out and generated folders of 8x8 digits; generated = 40 exact training copies,
    40 lightly perturbed copies, 40 unseen digits and 40 noise images."""
    root = tmp_path_factory.mktemp("audit")
    d = _digits_uint8()
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(d))
    train, held, unseen = d[perm[:600]], d[perm[600:1000]], d[perm[1000:1040]]
    _write_folder(root / "train", train)
    _write_folder(root / "heldout", held)
    copies = train[:40]
    perturbed = np.clip(train[40:80] + rng.normal(0, 5, train[40:80].shape), 0, 255).round().astype(np.uint8)
    noise = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
    groups = {"copy": copies, "perturbed": perturbed, "unseen": unseen, "noise": noise}
    for name, images in groups.items():
        _write_folder(root / "generated", images, prefix=name)
    return root


EXPECTED = {"copy": "memorized", "perturbed": "memorized", "unseen": "generalized", "noise": "off_manifold"}


def test_generated_folder_puts_each_group_in_its_class(digit_folders, tmp_path):
    r = audit(
        digit_folders / "train",
        generated=digit_folders / "generated",
        held_out=digit_folders / "heldout",
        cache=tmp_path / "cache",
        progress=False,
    )
    assert r.calibration == "held_out"
    for group, cls in EXPECTED.items():
        labels = [c for c, n in zip(r.classification.labels, r.samples.names, strict=True) if n.startswith(group)]
        assert len(labels) == 40
        assert labels.count(cls) / 40 >= 0.9, (group, {c: labels.count(c) for c in set(labels)})
    # every copied training image is one of the 80 the copies came from, and none is copied twice
    copied = {c["name"] for c in r.copies}
    assert copied <= {f"img-{i:04d}.png" for i in range(80)} and len(copied) >= 72
    assert r.fractions["memorized"].low < r.fractions["memorized"].value < r.fractions["memorized"].high
    assert r.quality is not None and 0 <= r.quality["precision"].value <= 1


def test_leave_one_out_calibration_is_labelled_weaker(digit_folders, tmp_path):
    r = audit(digit_folders / "train", generated=digit_folders / "generated", cache=tmp_path, progress=False)
    assert r.calibration == "leave_one_out" and r.quality is None
    assert "leave-one-out" in r.verdict()
    labels = [c for c, n in zip(r.classification.labels, r.samples.names, strict=True) if n.startswith("copy")]
    assert labels.count("memorized") == 40
    out = write_audit(r, tmp_path / "out")
    assert "weaker than held-out calibration" in (out / "report.html").read_text()


def test_duplicates_in_the_training_data_are_flagged(tmp_path):
    d = _digits_uint8()[:60]
    d[59] = d[5]  # an exact duplicate in the training data
    _write_folder(tmp_path / "train", d)
    _write_folder(tmp_path / "gen", d[[5, 5, 6, 7]])
    r = audit(tmp_path / "train", generated=tmp_path / "gen", cache=tmp_path / "c", progress=False)
    assert [(p["name_a"], p["name_b"], p["distance"]) for p in r.duplicates] == [("img-0005.png", "img-0059.png", 0.0)]
    top = r.copies[0]
    assert top["n_copies"] == 2 and top["duplicate_of"] == "img-0059.png"


# ------------------------------------------------------------------------------------------------
# The cache, the files, the command line
# ------------------------------------------------------------------------------------------------


def test_second_audit_reads_the_embedding_cache(digit_folders, tmp_path):
    kw = dict(generated=digit_folders / "generated", held_out=digit_folders / "heldout", cache=tmp_path, progress=False)
    first = audit(digit_folders / "train", **kw)
    second = audit(digit_folders / "train", **kw)
    assert not first.train.cached and second.train.cached and second.held_out.cached
    assert second.classification.labels == first.classification.labels
    assert second.thresholds["delta_m"] == first.thresholds["delta_m"]
    nearest = tmp_path / "embeddings" / f"{first.train.key}.nearest.npz"  # the K^2 search, kept too
    assert nearest.is_file() and np.array_equal(second.train_nearest, first.train_nearest)
    nearest.write_bytes(b"PK\x03\x04 truncated")  # a damaged entry is recomputed, not trusted
    third = audit(digit_folders / "train", **kw)
    assert np.array_equal(third.train_nearest, first.train_nearest)
    assert np.load(nearest, allow_pickle=False)["indices"].shape == (600, 1)


def test_audit_files_and_report(digit_folders, tmp_path):
    r = audit(
        digit_folders / "train",
        generated=digit_folders / "generated",
        held_out=digit_folders / "heldout",
        config=AuditConfig(n_pairs=8),
        cache=tmp_path / "cache",
        progress=False,
    )
    out = write_audit(r, tmp_path / "out")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fractions"]["memorized"]["value"] == pytest.approx(r.fractions["memorized"].value)
    assert summary["thresholds"]["delta_m"] == pytest.approx(r.thresholds["delta_m"])
    rows = (out / "samples.csv").read_text().splitlines()
    assert len(rows) == 161 and rows[0].startswith("index,name,class,m,")
    assert (out / "copies.csv").read_text().count("\n") == len(r.copies) + 1
    for png in ("extraction.png", "distances.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert r.verdict() in page.replace("&#x27;", "'")
    assert not re.search(r'src="(?!data:)', page), "the page must be self-contained"
    with pytest.raises(ValueError, match="already holds an audit"):
        write_audit(r, out)


def test_cli_audit_generated(digit_folders, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["audit", "--generated", str(digit_folders / "generated"), "--train", str(digit_folders / "train")]
    res = runner.invoke(app, [*base, "--heldout", str(digit_folders / "heldout"), "--cache-dir", "cache"])
    assert res.exit_code == 0, res.output
    assert re.search(r"memorized \(copies\): 0\.5\d\d", res.output)
    out = next(tmp_path.glob("diffmem-audit-*"))  # the relative default: a new numbered directory here
    assert f"results written to {out.name}" in res.output or str(out) in res.output
    assert (out / "summary.json").is_file()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("empty", "is empty"),
        ("mixed", "differ in size"),
        ("corrupt", "cannot read image|corrupt"),
        ("both", "not both"),
        ("neither", "model folder"),
    ],
)
def test_cli_audit_bad_input_is_one_line(tmp_path, setup, message):
    d = _digits_uint8()[:12]
    _write_folder(tmp_path / "train", d)
    gen = tmp_path / "gen"
    gen.mkdir()
    args = ["audit", "--train", str(tmp_path / "train"), "--generated", str(gen), "--cache-dir", str(tmp_path / "c")]
    if setup == "mixed":
        _write_folder(gen, d[:3])
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(gen / "big.png")
        args[2] = str(gen)  # mixed sizes in the training folder
    elif setup == "corrupt":
        _write_folder(gen, d[:3])
        (gen / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    elif setup == "both":
        args.insert(1, str(tmp_path))
    elif setup == "neither":
        args = args[:3]
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    err = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and re.search(message, err[0]), res.output


class _Marker:
    """Unpickling this creates a file: proof that the pickle was (or was not) executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_cli_audit_refuses_pickled_weights_without_loading(tmp_path):
    import pickle

    from diffusers import DDPMPipeline, DDPMScheduler

    model, marker = tmp_path / "pipe", tmp_path / "executed"
    DDPMPipeline(unet=_tiny_unet(0), scheduler=DDPMScheduler()).save_pretrained(model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Marker(marker)))
    _write_folder(tmp_path / "train", _digits_uint8()[:12])
    res = runner.invoke(app, ["audit", str(model), "--train", str(tmp_path / "train"), "--cache-dir", str(tmp_path)])
    assert res.exit_code == 2 and not marker.exists()
    err = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "pickle" in err[0].lower() and "safe_serialization=True" in err[0]


# ------------------------------------------------------------------------------------------------
# A real diffusers pipeline, trained here without diffmem's training code
# ------------------------------------------------------------------------------------------------


def _tiny_unet(seed: int):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """A DDIM pipeline whose UNet memorized 8 digits (x0 prediction, 100 timesteps, trained in a plain
    loop), and the same pipeline freshly initialised."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler

    root = tmp_path_factory.mktemp("pipes")
    d = _digits_uint8()
    x0 = torch.from_numpy(_to_float(d[:8]))
    _write_folder(root / "train", d[:8])
    _write_folder(root / "heldout", d[1000:1100])
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_end=0.2, prediction_type="sample", clip_sample=True)
    unet = _tiny_unet(0)
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        x = x0[torch.randint(0, 8, (16,), generator=g)]
        t = torch.randint(0, 100, (16,), generator=g)
        noisy = scheduler.add_noise(x, torch.randn(x.shape, generator=g), t)
        loss = ((unet(noisy, t).sample - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ddim = DDIMScheduler.from_config(scheduler.config)
    DDIMPipeline(unet=unet.eval(), scheduler=ddim).save_pretrained(root / "trained")
    DDIMPipeline(unet=_tiny_unet(1).eval(), scheduler=ddim).save_pretrained(root / "fresh")
    return root


def test_audit_of_a_memorizing_pipeline_reports_copies(pipelines, tmp_path):
    kw = dict(held_out=pipelines / "heldout", config=AuditConfig(n_samples=48, steps=20), cache=tmp_path)
    trained = audit(pipelines / "train", model=pipelines / "trained", progress=False, **kw)
    assert trained.model["sampler"] == "ddim" and trained.model["prediction_type"] == "sample"
    assert trained.fractions["memorized"].value >= 0.9
    assert len(trained.copies) >= 6  # most of the 8 digits are reproduced
    fresh = audit(pipelines / "train", model=pipelines / "fresh", progress=False, **kw)
    assert fresh.fractions["memorized"].value == 0 and not fresh.copies
    assert fresh.fractions["memorized"].high > 0  # 0 of 48 still has an interval


def test_cli_audit_of_a_pipeline_folder(pipelines, tmp_path):
    out = tmp_path / "audit"
    res = runner.invoke(
        app,
        [
            "audit",
            str(pipelines / "trained"),
            "--train",
            str(pipelines / "train"),
            "--heldout",
            str(pipelines / "heldout"),
            "--samples",
            "32",
            "--steps",
            "20",
            "--basins",
            "2",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["model"]["steps"] == 20 and summary["fractions"]["memorized"]["value"] >= 0.9
    npz = np.load(out / "samples.npz", allow_pickle=False)
    assert npz["samples"].shape == (32, 1, 8, 8) and npz["seeds"][1] == 1
    assert "Basins of the copied images" in (out / "report.html").read_text()


# ------------------------------------------------------------------------------------------------
# diffmem's own U-Net runs, exported as diffusers pipelines
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    from diffmem.models.nets import NetworkConfig
    from diffmem.models.train import TrainConfig, train

    unet = {
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "norm_num_groups": 4,
    }
    config = TrainConfig(data="digits", k=8, n_held_out=20, steps=5, network=NetworkConfig("unet", unet=unet))
    out = tmp_path_factory.mktemp("unet") / "run"
    train(config, out, progress=False)
    return out


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_exported_pipeline_is_the_same_denoiser(unet_run, tmp_path, scheduler):
    from diffmem.models.pretrained import load_diffusers
    from diffmem.models.train import export_pipeline, load_denoiser

    pipe = export_pipeline(unet_run, tmp_path / "pipe", scheduler=scheduler)
    loaded, run = load_diffusers(pipe), load_denoiser(unet_run, timestep="nearest")
    assert loaded.sampler == scheduler and loaded.prediction_type == run.config.prediction_type
    assert torch.equal(loaded.schedule.alpha_bar, run.schedule.alpha_bar)
    assert loaded.data_range == (-1.0, 1.0)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for sigma in run.schedule.sampling_sigmas(5)[:-1]:
        want = run.denoiser(x, float(sigma))
        assert torch.allclose(loaded.denoiser(x, float(sigma)), want, atol=1e-5)
    with pytest.raises(ValueError, match="already holds a pipeline"):
        export_pipeline(unet_run, tmp_path / "pipe")


def test_exported_images_are_the_run_s_training_and_held_out_sets(unet_run, tmp_path):
    from diffmem.io.images import read_images
    from diffmem.models.train import export_images, load_denoiser

    assert export_images(unet_run, tmp_path) == {"train": 8, "heldout": 20}
    run = load_denoiser(unet_run)
    train = read_images(tmp_path / "train")
    assert np.abs(train.x.reshape(8, -1) - run.train_x.numpy()).max() <= 1 / 127.5  # uint8 rounding
    with pytest.raises(ValueError, match="not empty"):
        export_images(unet_run, tmp_path)


def test_export_refuses_an_mlp_run(tmp_path):
    from diffmem.models.train import TrainConfig, export_pipeline, train

    train(TrainConfig(data="digits", k=4, steps=2), tmp_path / "mlp", progress=False)
    with pytest.raises(ValueError, match="only U-Net runs"):
        export_pipeline(tmp_path / "mlp", tmp_path / "pipe")


def test_streamed_neighbours_with_chunks_smaller_than_k():
    g = torch.Generator().manual_seed(2)
    refs = torch.randn(23, 4, generator=g, dtype=torch.float64)
    metric = PixelL2()
    want = neighbours(metric, refs, refs, 3, exclude_self=True, embedded=True)
    got = streamed_neighbours(metric, refs, refs.numpy(), 3, query_offset=0, chunk=2)
    assert torch.equal(got.indices, want.indices) and torch.allclose(got.distances, want.distances, atol=1e-12)
