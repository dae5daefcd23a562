"""Training: determinism, resume equals an uninterrupted run, safe checkpoints, DDP on gloo, U-Net layout."""

import json
import pickle

import pytest
import torch
import torch.multiprocessing as mp

import diffmem.models.train as train_module
from diffmem.core import VPSchedule
from diffmem.io.checkpoint import load_tensors, load_tensors_and_metadata, save_tensors
from diffmem.models import nets
from diffmem.models.train import (
    TrainConfig,
    export_diffusers,
    held_out_split,
    import_diffusers,
    load_denoiser,
    split_indices,
    step_generator,
    train,
)

SMALL = {"kind": "mlp", "mlp": {"hidden": 32, "depth": 2, "emb_dim": 16}}


def small_config(**kw):
    base = {"k": 8, "steps": 30, "batch_size": 16, "log_every": 10, "warmup_steps": 5, "network": SMALL}
    return TrainConfig(**{**base, **kw})


def test_resume_reaches_the_same_weights(tmp_path):
    cfg = small_config()
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "split", stop_at=13, progress=False)
    mid = load_tensors(tmp_path / "split" / "checkpoint.safetensors")
    train(cfg, tmp_path / "split", progress=False)
    a = load_tensors(tmp_path / "full" / "checkpoint.safetensors")
    b = load_tensors(tmp_path / "split" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], mid[k]) for k in a if k.startswith("model."))
    meta = json.loads((tmp_path / "split" / "checkpoint.json").read_text())
    assert meta["step"] == 30 and len(meta["train_indices"]) == 8
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20, 30]
    assert len(json.loads(lines[0])["loss_by_bucket"]) == 10


def test_training_reduces_the_loss(tmp_path):
    cfg = small_config(steps=300, log_every=50, lr=3e-3)
    train(cfg, tmp_path / "r", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0]


def test_nested_and_held_out_indices_do_not_overlap():
    n = 100
    small = split_indices(TrainConfig(k=10, n_held_out=20), n)
    large = split_indices(TrainConfig(k=80, n_held_out=20), n)
    held = held_out_split(TrainConfig(k=80, n_held_out=20), n)
    assert set(small.tolist()) <= set(large.tolist())
    assert not set(held.tolist()) & set(large.tolist()) and len(held) == 20
    a = split_indices(TrainConfig(k=30, subset="pair_a", n_held_out=20), n)
    b = split_indices(TrainConfig(k=30, subset="pair_b", n_held_out=20), n)
    assert not set(a.tolist()) & set(b.tolist())
    with pytest.raises(ValueError, match="need 80 examples"):
        split_indices(TrainConfig(k=40, subset="pair_b", n_held_out=30), n)


def test_checkpoint_refusals(tmp_path):
    cfg = small_config(steps=5)
    run = tmp_path / "r"
    train(cfg, run, progress=False)
    # a different configuration is refused, and the run is left as it was
    before = (run / "checkpoint.safetensors").read_bytes()
    with pytest.raises(ValueError, match="different configuration.*lr"):
        train(small_config(steps=10, lr=5e-4), run, progress=False)
    assert (run / "checkpoint.safetensors").read_bytes() == before
    # pickles are refused before anything is read from them
    pkl = tmp_path / "weights.safetensors"
    pkl.write_bytes(pickle.dumps({"w": [1.0]}))
    with pytest.raises(ValueError, match="refuses to load it because unpickling"):
        load_tensors(pkl)
    tsave = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, tsave)
    with pytest.raises(ValueError, match="pickle-based"):
        load_tensors(tsave)
    # truncation and corruption
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(before[: len(before) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_tensors(trunc)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a valid safetensors|truncated or corrupt"):
        load_tensors(garbage)
    (run / "checkpoint.json").write_text("{ truncated")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_denoiser(run)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    run = tmp_path / "r"
    train(small_config(steps=3), run, progress=False)
    t, meta = load_tensors_and_metadata(run / "checkpoint.safetensors")
    t = {k: v for k, v in t.items() if not k.startswith("ema.inp")}
    save_tensors(run / "checkpoint.safetensors", t, metadata=meta)  # the same save, with weights missing
    with pytest.raises(ValueError, match="do not fit"):
        load_denoiser(run)


def test_trained_denoiser_is_a_sigma_denoiser(tmp_path):
    run = tmp_path / "r"
    train(small_config(steps=5), run, progress=False)
    loaded = load_denoiser(run)
    den, train_x, event = loaded.denoiser, loaded.train_x, loaded.event_shape
    assert event == (8, 8) and train_x.shape == (8, 64) and loaded.config.k == 8
    x = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    sig = VPSchedule().sampling_sigmas(10)[:4].float()
    assert den(x, sig).shape == (4, 8, 8)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"k": 0}, "k: must be >= 1, got 0"),
        ({"subset": "pair_c"}, "subset: unknown value 'pair_c'"),
        ({"prediction_type": "v"}, "prediction_type: unknown value 'v'"),
        ({"lr": -1.0}, r"lr: must lie in \(0, 10\]"),
        ({"ema_decay": 1.0}, r"ema_decay: must lie in \[0, 1\)"),
        ({"network": {"kind": "transformer"}}, "network.kind: unknown value 'transformer'"),
        ({"schedule": {"type": "ve"}}, "schedule.type: training uses a VP"),
        ({"steps": True}, "steps: expected an integer"),
    ],
)
def test_bad_training_config(kw, match):
    with pytest.raises(ValueError, match=match):
        small_config(**kw)


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="learning_rate: unknown key"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def _ddp_worker(rank, world, init_file, out_dir, result_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = train(small_config(steps=12), out_dir, progress=False)
        save_tensors(f"{result_dir}/rank{rank}.safetensors", result.model.state_dict())
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_on_gloo(tmp_path):
    """Two DDP replicas on gloo: gradients are averaged, so both end with identical weights, which
    are the weights rank 0 checkpoints; the run differs from a single-process one (twice the data)."""
    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (load_tensors(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    ckpt = load_tensors(out / "checkpoint.safetensors")
    assert all(torch.equal(ckpt[f"model.{k}"], r0[k]) for k in r0)
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 12
    single = train(small_config(steps=12), tmp_path / "single", progress=False).model.state_dict()
    assert not all(torch.equal(single[k], r0[k]) for k in r0)


def test_unet_trains_and_round_trips_through_the_diffusers_layout(tmp_path):
    net = {
        "kind": "unet",
        "unet": {
            "block_out_channels": [8, 16],
            "norm_num_groups": 4,
            "down_block_types": ["DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D"],
        },
    }
    cfg = small_config(steps=3, batch_size=4, network=net)
    run = tmp_path / "unet"
    train(cfg, run, progress=False)
    loaded = load_denoiser(run)
    event, model = loaded.event_shape, loaded.model
    assert event == (1, 8, 8)
    folder = export_diffusers(run, tmp_path / "hf")
    assert (folder / "config.json").exists() and (folder / "diffusion_pytorch_model.safetensors").exists()
    unet = import_diffusers(folder)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, model(x, t))
    with pytest.raises(ValueError, match="only U-Net runs"):
        train(small_config(steps=2), tmp_path / "mlp", progress=False)
        export_diffusers(tmp_path / "mlp", tmp_path / "x")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match="pickled weights are refused"):
        import_diffusers(folder)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "r"
    cfg = small_config(steps=20, checkpoint_every=5)
    calls = {"n": 0}
    forward = nets.MLPNet.forward

    def poisoned(self, x_t, t):
        calls["n"] += 1
        out = forward(self, x_t, t)
        return out * float("nan") if calls["n"] > 12 else out

    monkeypatch.setattr(nets.MLPNet, "forward", poisoned)
    with pytest.raises(ValueError, match=r"loss became nan at step 13.*last good checkpoint \(step 10\)"):
        train(cfg, run, progress=False)
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["step"] == 10
    assert all(
        torch.isfinite(v).all()
        for v in load_tensors(run / "checkpoint.safetensors").values()
        if v.dtype.is_floating_point
    )


def test_unwritable_run_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    with pytest.raises(ValueError, match="cannot create the run directory"):
        train(small_config(steps=2), blocker / "run", progress=False)
    assert blocker.read_text() == "keep"


def test_step_generators_differ_across_ranks_and_steps():
    draws = {
        (r, s): torch.randint(10**9, (4,), generator=step_generator(0, r, s)).tolist()
        for r in range(3)
        for s in range(3)
    }
    assert len({tuple(v) for v in draws.values()}) == 9
    assert torch.randint(10**9, (4,), generator=step_generator(0, 1, 2)).tolist() == draws[(1, 2)]


def test_mismatched_checkpoint_pair_is_refused(tmp_path):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    cfg = small_config(steps=10)
    train(cfg, run_a, stop_at=4, progress=False)
    train(cfg, run_b, stop_at=6, progress=False)
    (run_a / "checkpoint.safetensors").write_bytes((run_b / "checkpoint.safetensors").read_bytes())
    with pytest.raises(ValueError, match="belong to different saves"):
        train(cfg, run_a, progress=False)


def test_resume_rewrites_the_metrics_log_without_duplicates(tmp_path):
    run = tmp_path / "r"
    cfg = small_config(steps=30, log_every=5, checkpoint_every=10)
    train(cfg, run, stop_at=27, progress=False)  # logged up to 25, checkpoint at 27 (stop) -> resume from 27
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["step"] == 27
    # simulate a crash after step 27's checkpoint was superseded: roll the log forward past it
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 29, "loss": 0.0}) + "\n")
    train(cfg, run, progress=False)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 27, 30]


def test_network_keys_are_checked():
    with pytest.raises(ValueError, match="network.width: unknown key"):
        small_config(network={"kind": "mlp", "width": 3})
    with pytest.raises(ValueError, match="network.mlp.width: unknown key"):
        small_config(network={"kind": "mlp", "mlp": {"width": 3}})


def test_a_save_interrupted_after_moving_the_old_tensors_resumes_from_the_old_pair(tmp_path, monkeypatch):
    cfg = small_config(checkpoint_every=10)
    train(cfg, tmp_path / "full", progress=False)
    run = tmp_path / "crash"
    train(cfg, run, stop_at=10, progress=False)
    real = train_module.save_tensors

    def crash_after_the_move(path, *args, **kwargs):
        raise KeyboardInterrupt("killed while writing the new tensors")

    monkeypatch.setattr(train_module, "save_tensors", crash_after_the_move)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, stop_at=20, progress=False)
    assert not (run / "checkpoint.safetensors").exists() and (run / "checkpoint.prev.safetensors").exists()
    assert load_denoiser(run).config.k == 8  # the pair of step 10 is still complete
    monkeypatch.setattr(train_module, "save_tensors", real)
    train(cfg, run, progress=False)  # resumes from step 10 through the previous tensors
    a = load_tensors(tmp_path / "full" / "checkpoint.safetensors")
    b = load_tensors(run / "checkpoint.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (run / "checkpoint.prev.safetensors").exists()
