"""The out-of-core pattern store (diffmem.io.patterns) and the core's PatternSource paths of DenseAM and
EmpiricalDenoiser: round trips, content hashes, refusals of damaged stores, equality with the in-memory
path, and memory that stays O(chunk) however large the store."""

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.bench import outofcore
from diffmem.bench.harness import run_suite
from diffmem.core.denoisers import EmpiricalDenoiser
from diffmem.core.knn import knn
from diffmem.core.memory import DenseAM, TensorSource
from diffmem.io.data import load_dataset
from diffmem.io.images import read_images
from diffmem.io.patterns import MANIFEST, PatternStore


def patterns(k=1000, shape=(2, 3), seed=0, dtype=torch.float32):
    return torch.randn(k, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture
def store(tmp_path):
    return PatternStore.create(tmp_path / "xi", patterns(), shard_rows=170)


# -- writing and reading back ---------------------------------------------------------------------------------------


def test_round_trip_with_blocks_spanning_shards(store):
    x = patterns().reshape(1000, 6)
    assert (store.num_patterns, store.dim, store.event_shape, store.storage) == (1000, 6, (2, 3), "float32")
    assert [s.num_patterns for s in store.shards] == [170] * 5 + [150]
    assert [s.offset for s in store.shards] == [0, 170, 340, 510, 680, 850]
    blocks = list(store.chunks(300))
    assert [(o, b.shape) for o, b in blocks] == [(o, (min(300, 1000 - o), 6)) for o in (0, 300, 600, 900)]
    assert torch.equal(torch.cat([b for _, b in blocks]), x)
    assert torch.equal(store.read(165, 345), x[165:345])
    assert np.array_equal(np.load(store.shards[1].path, allow_pickle=False), x[170:340].numpy())  # plain .npy shards
    assert [o for o, _ in store.shards[2].chunks(100)] == [0, 100]  # a shard is a source with local offsets
    assert torch.equal(torch.cat([b for _, b in store.shards[2].chunks(100)]), x[340:510])


def test_reopen_float64_and_full_verify(store):
    again = PatternStore.open(store.path, dtype=torch.float64, verify="full")
    assert again.content_hash == store.content_hash and again.dtype == torch.float64
    assert torch.equal(again.read(), patterns().reshape(1000, 6).double())
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64"):
        PatternStore.open(store.path, dtype=torch.float16)
    with pytest.raises(ValueError, match="unknown verify mode 'deep'"):
        PatternStore.open(store.path, verify="deep")


def test_content_hash_ignores_sharding_and_sees_every_value(tmp_path, store):
    x = patterns()
    batches = (x[a : a + 64].numpy() for a in range(0, 1000, 64))  # an iterable of arrays, read batch by batch
    other = PatternStore.create(tmp_path / "other", batches, shard_rows=333)
    assert other.content_hash == store.content_hash and len(other.shards) == 4
    y = x.clone()
    y[500, 1, 2] = torch.nextafter(y[500, 1, 2], torch.tensor(10.0))  # one value, one ulp
    assert PatternStore.create(tmp_path / "changed", y).content_hash != store.content_hash


def test_float16_storage_reads_as_float32(tmp_path):
    x = patterns()
    half = PatternStore.create(tmp_path / "half", x, storage="float16", shard_rows=256)
    assert half.storage == "float16" and half.nbytes == 1000 * 6 * 2
    assert all(b.dtype == torch.float32 for _, b in half.chunks(300))
    assert torch.equal(half.read(), x.reshape(1000, 6).half().float())
    with pytest.raises(ValueError, match=r"pattern 3 has values beyond the float16 range"):
        big = x.reshape(1000, 6).index_fill(0, torch.tensor([3]), 7e4)
        PatternStore.create(tmp_path / "big", big, storage="float16")
    with pytest.raises(ValueError, match="unknown storage 'bfloat16'"):
        PatternStore.create(tmp_path / "bf", x, storage="bfloat16")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (torch.zeros(0, 4), "no patterns to store"),
        ([np.zeros((3, 4)), np.zeros((3, 5))], r"batch 1 of the patterns has event shape \(5,\), the first had \(4,\)"),
        (np.array([[1.0, None]], dtype=object), "object array"),
        (torch.ones(3, 2, dtype=torch.bool), "patterns must be real numbers"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), "pattern 1 contains NaN or Inf"),
        (torch.ones(4), r"expected \(b, \*event_shape\)"),
        (["not", "arrays"], "pass tensors or numpy arrays"),
    ],
)
def test_bad_patterns_are_refused_and_nothing_is_left(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        PatternStore.create(tmp_path / "xi", data)
    assert os.listdir(tmp_path) == []  # no store, no temporary directory


def test_written_once(tmp_path, store):
    before = (store.path / MANIFEST).read_bytes()
    with pytest.raises(ValueError, match="already exists; a pattern store is written once"):
        PatternStore.create(store.path, patterns(seed=1))
    assert (store.path / MANIFEST).read_bytes() == before
    (tmp_path / "empty").mkdir()
    assert PatternStore.create(tmp_path / "empty", patterns(k=5)).num_patterns == 5  # an empty directory is fine


def test_a_failure_midway_leaves_no_store(tmp_path):
    def batches():
        yield torch.ones(10, 3)
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="the source broke"):
        PatternStore.create(tmp_path / "xi", batches(), shard_rows=4)
    assert os.listdir(tmp_path) == []


def test_from_dataset(tmp_path):
    ds = load_dataset("gaussian_mixture", n=300, dim=5, seed=3)
    store = PatternStore.from_dataset(tmp_path / "gm", "gaussian_mixture", n=300, dim=5, seed=3, shard_rows=128)
    assert torch.equal(store.read(), ds.x) and store.event_shape == ds.image_shape
    options = {"n": 300, "dim": 5, "seed": 3}
    assert store.source_info == {"dataset": "gaussian_mixture", "root": None, "options": options}
    assert json.loads((store.path / MANIFEST).read_text())["source"]["dataset"] == "gaussian_mixture"


def test_from_image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    store = PatternStore.from_image_folder(tmp_path / "xi", folder, batch=3, shard_rows=4)
    expected = torch.from_numpy(read_images(folder).x)  # (7, 3, 6, 6) in [-1, 1]
    assert store.event_shape == (3, 6, 6) and len(store.shards) == 2
    assert torch.equal(store.read(), expected.reshape(7, -1))


# -- damaged stores -------------------------------------------------------------------------------------------------


def test_missing_and_truncated_shards(store):
    shard = store.shards[3].path
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[:-8])
    with pytest.raises(ValueError, match=r"shard-00003.npy is truncated .* rebuild it"):
        PatternStore.open(store.path)
    with pytest.raises(ValueError, match="is truncated"):
        list(store.chunks(100))  # an open store checks each shard again as it maps it
    os.remove(shard)
    with pytest.raises(ValueError, match=r"shard-00003.npy is missing; the pattern store is incomplete"):
        PatternStore.open(store.path)


def test_a_changed_value_fails_the_hash_check(store):
    shard = store.shards[4].path
    data = bytearray(open(shard, "rb").read())
    data[-1] ^= 1
    with open(shard, "wb") as f:
        f.write(data)
    PatternStore.open(store.path)  # quick: headers and sizes are intact
    with pytest.raises(ValueError, match=r"shard-00004.npy does not match the hash in the manifest"):
        PatternStore.open(store.path, verify="full")


def test_an_edited_manifest_fails_the_content_hash(store):
    manifest = json.loads((store.path / MANIFEST).read_text())
    manifest["content_sha256"] = "0" * 64
    (store.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not match its content hash"):
        PatternStore.open(store.path, verify="full")
    manifest["shards"][0]["rows"] = 171
    (store.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="its shards hold 1001 rows, not num_patterns = 1000"):
        PatternStore.open(store.path)
    (store.path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="the store is corrupt: rebuild it"):
        PatternStore.open(store.path)


def test_pickled_and_foreign_shards_are_refused(store):
    shard = store.shards[0].path
    np.save(shard, np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="holds pickled data .* refuses to load"):
        PatternStore.open(store.path)
    with open(shard, "wb") as f:
        f.write(b"\x80\x04\x95" + b"\0" * 200)  # a pickle stream
    with pytest.raises(ValueError, match="holds pickled data"):
        PatternStore.open(store.path)
    np.save(shard, np.zeros((170, 6), dtype=np.float64))
    with pytest.raises(ValueError, match=r"holds a float64 array of shape \(170, 6\), but the manifest says float32"):
        PatternStore.open(store.path)


def test_not_a_store(tmp_path):
    with pytest.raises(ValueError, match="no pattern store at .*: not a directory"):
        PatternStore.open(tmp_path / "nothing")
    with pytest.raises(ValueError, match="manifest.json is missing"):
        PatternStore.open(tmp_path)


# -- the core over a PatternSource ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [64, 4096])
def test_dense_am_over_a_store_equals_in_memory(store, chunk):
    x = patterns().reshape(1000, 6)
    mem, disk = DenseAM(x, chunk_size=chunk), DenseAM(store, chunk_size=chunk)
    s = patterns(k=8, shape=(6,), seed=1) * 1.5
    beta = torch.linspace(0.5, 4.0, 8)
    # same blocks, same arithmetic: bit for bit
    assert torch.equal(mem.retrieve(s, beta), disk.retrieve(s, beta))
    assert torch.equal(mem.energy(s, beta), disk.energy(s, beta))
    assert torch.equal(mem.weights(s, beta), disk.weights(s, beta))
    assert torch.equal(mem.hvp(s, s, beta), disk.hvp(s, s, beta))
    assert all(torch.equal(a, b) for a, b in zip(mem.nearest(s), disk.nearest(s), strict=True))
    assert torch.equal(mem.run(s, beta, max_iter=20).x, disk.run(s, beta, max_iter=20).x)
    assert (disk.num_patterns, disk.dim) == (1000, 6)
    with pytest.raises(ValueError, match="holds no \\(K, D\\) tensor"):
        _ = disk.patterns


def test_streamed_covariance_matches_float64_brute_force():
    xi = patterns(k=700, shape=(5,), seed=2, dtype=torch.float64)
    x = patterns(k=6, shape=(5,), seed=3, dtype=torch.float64)
    am = DenseAM(TensorSource(xi), chunk_size=97)
    for beta in (0.3, 3.0, 30.0):  # spread weights to weights on a few patterns
        w = torch.softmax(-0.5 * beta * torch.cdist(x, xi) ** 2, dim=1)  # (B, K)
        m = w @ xi
        centred = xi[None] - m[:, None]
        brute = torch.einsum("bk,bkd,bke->bde", w, centred, centred)
        assert torch.allclose(am.covariance(x, beta), brute, rtol=1e-9, atol=1e-12)
        v = patterns(k=6, shape=(5,), seed=4, dtype=torch.float64)
        hv = torch.einsum("bde,be->bd", am.hessian(x, beta), v)
        assert torch.allclose(am.hvp(x, v, beta), hv, rtol=1e-9, atol=1e-10)  # H v from one pass equals H @ v
        lo, hi = am.covariance_eigenvalue_range(x, beta)
        eig = torch.linalg.eigvalsh(brute)
        assert torch.allclose(hi, eig[:, -1], rtol=1e-9, atol=1e-12) and torch.allclose(lo, eig[:, 0], atol=1e-9)


def test_empirical_denoiser_over_a_store(tmp_path, store):
    x = patterns()
    mem, disk = EmpiricalDenoiser(x), EmpiricalDenoiser(store, chunk_size=128)
    assert disk.event_shape == (2, 3)
    s = patterns(k=5, seed=5)
    sigma = torch.tensor([0.0, 0.2, 1.0, 0.0, 3.0])
    out = disk(s, sigma)
    assert torch.allclose(out, mem(s, sigma), rtol=1e-5, atol=1e-6)  # other block boundaries: rounding only
    nearest = mem.nearest(s)[0]
    assert torch.equal(out[sigma == 0], x[nearest[sigma == 0]])  # sigma = 0: the nearest pattern itself
    assert torch.allclose(disk.neg_log_prob(s, 0.7), mem.neg_log_prob(s, 0.7), rtol=1e-5)
    half = PatternStore.create(tmp_path / "half", x, storage="float16")
    assert torch.equal(EmpiricalDenoiser(half)(s, 0.5), EmpiricalDenoiser(x.half().float())(s, 0.5))
    with pytest.raises(ValueError, match="x has dtype torch.float64 but the pattern source hands out torch.float32"):
        disk(s.double(), 0.5)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2, 3\)"):
        disk(s.reshape(5, 6), 0.5)


class _BadSource(TensorSource):
    """Hands out blocks that break the protocol in one way, from its second block on."""

    def __init__(self, patterns, fault):
        super().__init__(patterns)
        self.fault = fault

    def chunks(self, chunk_size):
        for i, (start, block) in enumerate(super().chunks(chunk_size)):
            if i == 1 and self.fault == "skip":
                continue
            if i and self.fault == "dtype":
                block = block.double()
            if i and self.fault == "nan":
                block = block.clone().fill_(float("nan"))
            yield start, block
        if self.fault == "extra":
            yield self.num_patterns, block


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("skip", "blocks must cover rows 0..K-1 in order"),
        ("dtype", "declares torch.float32 but yielded a torch.float64 block"),
        ("nan", r"patterns 400..799 of the source contain NaN or Inf"),  # reads of 8 chunks of 50 rows
        ("extra", "blocks must cover rows 0..K-1 in order"),
    ],
)
def test_a_source_that_breaks_the_protocol_is_caught(fault, message):
    am = DenseAM(_BadSource(patterns(k=1000, shape=(4,)), fault), chunk_size=50)
    with pytest.raises(ValueError, match=message):
        am.retrieve(torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="refs 400..799 contain NaN or Inf" if fault == "nan" else message):
        knn(torch.zeros(2, 4), am.source, 1, ref_chunk=50)


# -- memory ---------------------------------------------------------------------------------------------------------


def test_reading_allocates_one_block_whatever_k(tmp_path):
    k, d, chunk = 200_000, 16, 2_000
    x = np.random.default_rng(0).standard_normal((k, d), dtype=np.float32)
    half = PatternStore.create(tmp_path / "half", x, storage="float16")  # 6.4 MB on disk, 12.8 MB as float32
    tracemalloc.start()
    try:
        total = 0.0
        for _, block in half.chunks(chunk):
            total += float(block[:, 0].sum())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.isclose(total, x[:, 0].astype(np.float16).astype(np.float64).sum(), rtol=1e-4)
    assert peak < 4 * chunk * d * 4  # a few float32 blocks (128 kB each), not the 12.8 MB of all K rows


_RSS_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from diffmem.core.memory import DenseAM
    from diffmem.io.patterns import PatternStore

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    store = PatternStore.open(sys.argv[1])
    am = DenseAM(store, chunk_size=4096)
    x = torch.randn(16, store.dim, generator=torch.Generator().manual_seed(0))
    am.retrieve(x, 0.1)  # warm-up: allocator pools, BLAS buffers
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = status("VmRSS")
    am.retrieve(x, 0.1)
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak-RSS reset needs Linux procfs")
def test_a_pass_over_a_large_store_keeps_rss_flat(tmp_path):
    k, d = 196_608, 64  # 48 MiB of float32 in one shard: pages are released as blocks are consumed
    rng = np.random.default_rng(1)
    batches = (rng.standard_normal((16_384, d), dtype=np.float32) for _ in range(k // 16_384))
    store = PatternStore.create(tmp_path / "big", batches)
    assert len(store.shards) == 1 and store.nbytes == 48 * 2**20
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(store.path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["peak"] - m["base"] < 16 * 2**20  # O(chunk): reads of 8 chunks (8 MiB), not the 48 MiB store


def test_the_outofcore_benchmark_reports_ratios_against_memory(monkeypatch):
    monkeypatch.setitem(outofcore.OUTOFCORE_PROBLEM, "quick", outofcore._Problem(3000, 8, 4, 4))
    entries = {
        e.name: e for e in run_suite({"outofcore": outofcore.bench_outofcore}, size="quick", repeats=1, rounds=1)
    }
    timed = [f"outofcore_{w}_{s}" for s in ("float32", "float16") for w in ("step", "knn")]
    assert set(timed) <= set(entries) <= {*timed, "outofcore_step_rss_mb"}
    for name in timed:
        e = entries[name]
        assert e.unit == "1/s" and e.ratio == pytest.approx(e.value / e.reference) and e.goal == ">= 0.7"
        assert "K=3000 D=8" in e.notes
