"""LPIPS through the embedding identity: formula, weight files, input checks, k-NN and benchmark."""

import hashlib
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import diffmem.evaluate.lpips as lp
from diffmem.evaluate.lpips import LPIPSEmbedding, load_state_dict, lpips_knn, min_side, tap_shapes
from diffmem.io.checkpoint import save_tensors

SIDE = {"alex": 32, "vgg": 16}  # small inputs that reach every tap (fast on one thread)
CONVS = {  # torchvision features index -> (in, out, kernel), written out independently of diffmem.evaluate.lpips
    "alex": {0: (3, 64, 11), 3: (64, 192, 5), 6: (192, 384, 3), 8: (384, 256, 3), 10: (256, 256, 3)},
    "vgg": dict(
        zip(
            (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
            ((3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256))
            + ((256, 512),)
            + ((512, 512),) * 5,
            strict=True,
        )
    ),
}
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


def images(n, side, seed, c=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, side, side, generator=g, dtype=dtype) * 2 - 1


def model(net, seed=0, **kw):
    return LPIPSEmbedding(net, "random", generator=torch.Generator().manual_seed(seed), **kw)


def torchvision_state(net, seed=1):
    """Random tensors under torchvision's names and shapes, classifier included (as in the real files)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (c_in, c_out, *k) in CONVS[net].items():
        k = k[0] if k else 3
        sd[f"features.{i}.weight"] = torch.randn(c_out, c_in, k, k, generator=g) * math.sqrt(2 / (c_in * k * k))
        sd[f"features.{i}.bias"] = torch.randn(c_out, generator=g) * 0.01
    sd["classifier.1.weight"] = torch.randn(8, 4, generator=g)
    heads = {f"lin{l}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for l, c in enumerate(CHANNELS[net])}
    return sd, heads


def reference_lpips(net, backbone, heads, x, y):
    """LPIPS v0.1 as richzhang/PerceptualSimilarity computes it, in functional torch from the state dicts."""
    # float32 constants, as LPIPS registers them (torch.Tensor([...]))
    shift = torch.tensor([-0.030, -0.088, -0.188]).to(x.dtype).reshape(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).to(x.dtype).reshape(1, 3, 1, 1)

    def conv(z, i, stride=1, padding=1):
        w, b = backbone[f"features.{i}.weight"].to(x.dtype), backbone[f"features.{i}.bias"].to(x.dtype)
        return F.relu(F.conv2d(z, w, b, stride=stride, padding=padding))

    def taps(z):
        z = (z - shift) / scale
        out = []
        if net == "alex":
            z = conv(z, 0, 4, 2)
            out.append(z)
            z = conv(F.max_pool2d(z, 3, 2), 3, 1, 2)
            out.append(z)
            z = conv(F.max_pool2d(z, 3, 2), 6)
            out.append(z)
            z = conv(z, 8)
            out.append(z)
            out.append(conv(z, 10))
        else:
            for block in ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)):
                if out:
                    z = F.max_pool2d(z, 2, 2)
                for i in block:
                    z = conv(z, i)
                out.append(z)
        return out

    total = 0
    for l, (a, b) in enumerate(zip(taps(x), taps(y), strict=True)):
        a = a / (torch.sqrt(torch.sum(a**2, dim=1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt(torch.sum(b**2, dim=1, keepdim=True)) + 1e-10)
        lin = heads[f"lin{l}.model.1.weight"].to(x.dtype)
        total = total + F.conv2d((a - b) ** 2, lin).mean([2, 3])
    return total[:, 0]


# ---------------------------------------------------------------- the formula and the identity


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_embedding_distance_equals_pairwise_lpips(net):
    m = model(net)
    x, y = images(6, SIDE[net], 1), images(6, SIDE[net], 2)
    d = m.distance(x, y)
    ex, ey = m.embed(x, batch_size=4), m.embed(y, batch_size=4)
    assert ex.dtype == torch.float32 and ex.shape == (6, sum(c * h * w for c, h, w in tap_shapes(net, *x.shape[2:])))
    torch.testing.assert_close(((ex - ey) ** 2).sum(1), d, atol=1e-5, rtol=0)
    assert float(d.min()) > 0.05  # a real signal, not zeros


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_all_pairs_from_embeddings_match_formula(net):
    m = model(net, seed=3)
    x, y = images(3, SIDE[net], 4), images(4, SIDE[net], 5)
    d = m.distance(x.repeat_interleave(4, 0), y.repeat(3, 1, 1, 1)).reshape(3, 4)
    torch.testing.assert_close(
        torch.cdist(m.embed(x).double(), m.embed(y).double()) ** 2, d.double(), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_distance_matches_independent_lpips_in_float64(net):
    backbone, heads = torchvision_state(net)
    m = model(net).load_weights(backbone, heads).double()
    x, y = images(2, SIDE[net], 6, dtype=torch.float64), images(2, SIDE[net], 7, dtype=torch.float64)
    ref = reference_lpips(net, {k: v.double() for k, v in backbone.items()}, heads, x, y)
    torch.testing.assert_close(m.distance(x, y), ref, atol=1e-12, rtol=1e-10)
    phi_x, phi_y = m(m.prepare(x)), m(m.prepare(y))
    torch.testing.assert_close(((phi_x - phi_y) ** 2).sum(1), ref, atol=1e-12, rtol=1e-10)


def test_identity_holds_for_gradients():
    m = model("alex")
    x, y = images(2, 32, 8).requires_grad_(True), images(2, 32, 9)
    (g1,) = torch.autograd.grad(m.distance(x, y).sum(), x)
    (g2,) = torch.autograd.grad(((m(m.prepare(x)) - m(m.prepare(y))) ** 2).sum(), x)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-4)
    assert float(g1.abs().max()) > 0


def test_identical_images_have_zero_distance_and_batching_does_not_matter():
    m = model("alex")
    x = images(7, 32, 10)
    assert float(m.distance(x, x).abs().max()) == 0.0
    torch.testing.assert_close(m.embed(x, batch_size=2), m.embed(x, batch_size=7), atol=1e-6, rtol=0)


def test_tap_shapes_follow_the_network_and_minimum_sides():
    for net, side in (("alex", 32), ("alex", 45), ("vgg", 16), ("vgg", 21)):
        m = model(net)
        feats = m.normalized_features(m.prepare(images(1, side, 0)))
        assert [tuple(f.shape[1:]) for f in feats] == tap_shapes(net, side, side)
        assert [f.shape[1] for f in feats] == list(CHANNELS[net])
    assert tap_shapes("alex", 64, 64)[0] == (64, 15, 15)
    assert min_side("alex") == 31 and min_side("vgg") == 16
    assert min(tap_shapes("alex", 30, 30)[-1][1:]) < 1 and min(tap_shapes("alex", 31, 31)[-1][1:]) == 1


def test_gray_images_repeat_to_three_channels_and_flat_images_need_a_shape():
    m = model("alex")
    gray = images(3, 32, 11, c=1)
    torch.testing.assert_close(m.embed(gray), m.embed(gray.repeat(1, 3, 1, 1)), atol=0, rtol=0)
    torch.testing.assert_close(m.embed(gray.reshape(3, -1), image_shape=(1, 32, 32)), m.embed(gray), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"flat \(N, D\) images need image_shape"):
        m.embed(gray.reshape(3, -1))
    with pytest.raises(ValueError, match="do not hold images of shape"):
        m.embed(gray.reshape(3, -1), image_shape=(3, 32, 32))


def test_small_images_need_resize_which_upsamples_bilinearly():
    digits = images(4, 8, 12, c=1)
    with pytest.raises(ValueError, match=r"8x8 pixels are too small .* at least 31x31; pass resize=64"):
        model("alex").embed(digits)
    m = model("alex", resize=64)
    up = F.interpolate(digits.repeat(1, 3, 1, 1), size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(m.embed(digits), model("alex").embed(up), atol=0, rtol=0)
    assert m.embed(digits).shape[1] == sum(c * h * w for c, h, w in tap_shapes("alex", 64, 64))
    with pytest.raises(ValueError, match="too small"):
        model("vgg", resize=12).embed(digits)


# ---------------------------------------------------------------- bad inputs


def test_bad_images_are_refused():
    m = model("alex")
    x = images(2, 32, 13)
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m.embed(bad)
    with pytest.raises(ValueError, match="NaN"):
        m.distance(bad, x)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        m.embed(torch.zeros(2, 2, 32, 32))
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        m.embed(torch.zeros(32, 32))
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\), got \(\)"):
        m.embed(torch.tensor(1.0))
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        m.embed([[0.0]])
    with pytest.raises(ValueError, match="floating point"):
        m.embed(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty"):
        m.embed(torch.zeros(0, 3, 32, 32))
    with pytest.raises(ValueError, match="batch_size"):
        m.embed(x, batch_size=0)
    with pytest.raises(ValueError, match="same number and size"):
        m.distance(x, x[:1])


def test_bad_construction_is_refused():
    with pytest.raises(ValueError, match="unknown LPIPS network 'squeeze'"):
        LPIPSEmbedding("squeeze", "random", generator=torch.Generator())
    with pytest.raises(ValueError, match="unknown weights"):
        LPIPSEmbedding("alex", "imagenet")
    with pytest.raises(ValueError, match="pass generator="):
        LPIPSEmbedding("alex", "random")
    with pytest.raises(ValueError, match="only used with"):
        LPIPSEmbedding("alex", generator=torch.Generator())
    with pytest.raises(ValueError, match="resize must be a positive integer"):
        model("alex", resize=0)


def test_negative_or_misnamed_weights_are_refused():
    backbone, heads = torchvision_state("alex")
    bad = dict(heads)
    bad["lin2.model.1.weight"] = -bad["lin2.model.1.weight"]
    with pytest.raises(ValueError, match="lin2 has 384 negative weights.*>= 0"):
        model("alex").load_weights(backbone, bad)
    with pytest.raises(ValueError, match=r"missing \['features.10.bias'\]"):
        model("alex").load_weights({k: v for k, v in backbone.items() if k != "features.10.bias"}, heads)
    with pytest.raises(ValueError, match=r"features.3.weight has shape \(192, 64, 3, 3\), expected \(192, 64, 5, 5\)"):
        model("alex").load_weights({**backbone, "features.3.weight": torch.zeros(192, 64, 3, 3)}, heads)
    with pytest.raises(ValueError, match="does not fit LPIPS net='vgg'"):
        model("vgg").load_weights(backbone, heads)
    m = model("alex")
    with torch.no_grad():
        m.heads[0][0, 5] = -0.1
    with pytest.raises(ValueError, match="lin0 has 1 negative"):
        m.embed(images(1, 32, 0))


# ---------------------------------------------------------------- weight files


def test_torchvision_state_dict_file_loads_with_identical_outputs(tmp_path):
    backbone, heads = torchvision_state("alex")
    torch.save(backbone, tmp_path / "backbone.pth")
    torch.save(heads, tmp_path / "heads.pth")
    from_file = model("alex", seed=5).load_weights(
        load_state_dict(tmp_path / "backbone.pth"), load_state_dict(tmp_path / "heads.pth")
    )
    in_memory = model("alex", seed=6).load_weights(backbone, heads)
    x, y = images(3, 40, 14), images(3, 40, 15)
    torch.testing.assert_close(from_file.embed(x), in_memory.embed(x), atol=0, rtol=0)
    torch.testing.assert_close(
        from_file.distance(x, y), reference_lpips("alex", backbone, heads, x, y), atol=1e-5, rtol=0
    )
    save_tensors(tmp_path / "heads.safetensors", heads)
    assert all(torch.equal(v, heads[k]) for k, v in load_state_dict(tmp_path / "heads.safetensors").items())


def write_pretrained(folder, net="alex"):
    backbone, heads = torchvision_state(net)
    spec = lp.SPECS[net]
    torch.save(backbone, folder / spec.backbone.name)
    torch.save(heads, folder / spec.heads.name)
    return backbone, heads


def test_pretrained_files_are_hash_checked_and_loaded(tmp_path, monkeypatch):
    backbone, heads = write_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"alexnet-owt-7be5be79.pth has SHA-256 [0-9a-f]{64}, expected 7be5be79"):
        LPIPSEmbedding("alex", weights_dir=tmp_path)
    # with the expected digests set to these files' own, the same path loads them
    spec = lp.SPECS["alex"]
    pinned = {
        "alex": lp.NetSpec(
            spec.layers,
            spec.taps,
            spec.channels,
            lp.WeightFile(spec.backbone.name, lp.sha256_file(tmp_path / spec.backbone.name), ""),
            lp.WeightFile(spec.heads.name, lp.sha256_file(tmp_path / spec.heads.name), ""),
        )
    }
    monkeypatch.setattr(lp, "SPECS", pinned)
    monkeypatch.setenv(lp.WEIGHTS_ENV, str(tmp_path))
    m = LPIPSEmbedding("alex")  # directory from $DIFFMEM_WEIGHTS
    x, y = images(2, 32, 16), images(2, 32, 17)
    torch.testing.assert_close(m.distance(x, y), reference_lpips("alex", backbone, heads, x, y), atol=1e-5, rtol=0)
    (tmp_path / spec.heads.name).write_bytes(b"\x80\x02truncated")
    with pytest.raises(ValueError, match=r"alex.pth has SHA-256 .* replace"):
        LPIPSEmbedding("alex")


def test_missing_files_name_what_to_put_where(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as e:
        LPIPSEmbedding("vgg", weights_dir=tmp_path / "w")
    msg = str(e.value)
    assert str(tmp_path / "w") in msg and "vgg16-397923af.pth" in msg and "vgg.pth" in msg
    assert "Missing: vgg16-397923af.pth, vgg.pth" in msg and "downloads nothing" in msg
    torch.save({}, tmp_path / "alex.pth")
    monkeypatch.setenv(lp.WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Missing: alexnet-owt-7be5be79.pth. diffmem downloads nothing"):
        LPIPSEmbedding("alex")
    monkeypatch.delenv(lp.WEIGHTS_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert lp.weights_directory() == tmp_path / "home" / ".cache" / "diffmem" / "weights"


def test_published_digests_agree_with_torchvision_file_names():
    for spec in lp.SPECS.values():
        for f in (spec.backbone, spec.heads):
            assert len(f.sha256) == 64 and int(f.sha256, 16) >= 0
        assert spec.backbone.name.split("-")[-1].removesuffix(".pth") == spec.backbone.sha256[:8]
    assert lp.sha256_file(__file__) == hashlib.sha256(open(__file__, "rb").read()).hexdigest()


EXECUTED = []


class _Payload:
    def __reduce__(self):
        return (EXECUTED.append, ("unpickled",))


def test_pickles_that_are_not_plain_state_dicts_are_refused(tmp_path):
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"features.0.weight": _Payload()}, protocol=2))
    torch.save({"w": _Payload()}, tmp_path / "evil2.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    for name in ("evil.pth", "evil2.pth", "module.pth"):
        with pytest.raises(ValueError, match="not a plain tensor state dict.*never unpickles"):
            load_state_dict(tmp_path / name)
    assert EXECUTED == []
    torch.save({"w": 3}, tmp_path / "ints.pth")
    with pytest.raises(ValueError, match="not a plain state dict"):
        load_state_dict(tmp_path / "ints.pth")
    (tmp_path / "weights.bin").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ValueError, match="pickle-based file"):
        load_state_dict(tmp_path / "weights.bin")
    (tmp_path / "weights.safetensors").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ValueError, match="pickle-based file"):
        load_state_dict(tmp_path / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_state_dict(tmp_path / "none.pth")


# ---------------------------------------------------------------- nearest neighbours and benchmark


def test_lpips_knn_matches_brute_force_formula():
    m = model("alex")
    q, r = images(5, 32, 18), images(6, 32, 19)
    full = m.distance(q.repeat_interleave(6, 0), r.repeat(5, 1, 1, 1)).reshape(5, 6).double()
    nb = lpips_knn(m.embed(q), m.embed(r), k=2)
    best = full.sort(1)
    torch.testing.assert_close(nb.distances, best.values[:, :2], atol=1e-5, rtol=0)
    assert torch.equal(nb.indices, best.indices[:, :2])
    own = m.embed(r)
    self_nb = lpips_knn(own, own, k=1, exclude_self=True)
    d_rr = m.distance(r.repeat_interleave(6, 0), r.repeat(6, 1, 1, 1)).reshape(6, 6).double()
    d_rr.fill_diagonal_(math.inf)
    torch.testing.assert_close(self_nb.distances[:, 0], d_rr.min(1).values, atol=1e-5, rtol=0)
    assert torch.equal(self_nb.indices[:, 0], d_rr.argmin(1))


@pytest.mark.slow  # about 4 s of CPU: the pairwise reference recomputes features for every batch pair
def test_bench_lpips_knn_quick():
    from diffmem.bench.harness import BenchContext
    from diffmem.bench.lpips import bench_lpips_knn

    speed, diff = bench_lpips_knn(BenchContext("cpu", "quick", repeats=1))
    assert speed.name == "lpips_knn_queries_per_s" and diff.name == "lpips_knn_max_abs_diff"
    for e in (speed, diff):
        assert all(math.isfinite(v) and v >= 0 for v in (e.value, e.reference, e.ratio))
    assert speed.ratio > 1  # features recomputed per batch pair cost more even at 200 x 200
    assert diff.value <= 1e-5 and diff.met and diff.reference > 0.1
