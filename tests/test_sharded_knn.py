"""The exact k-NN over a PatternSource (diffmem.core.knn), its shard merge, and sharded_knn over a pattern
store's shards in this process and on Ray workers: every path returns what the in-memory knn returns, bit
for bit, ties in increasing index."""

import sys

import pytest
import torch

import diffmem.core.knn  # noqa: F401  (the module itself, for counting its re-scans)
from diffmem.core.knn import Neighbours, ShardNeighbours, knn, merge_shards, shard_knn
from diffmem.core.memory import TensorSource
from diffmem.evaluate.sharded_knn import _groups, ray_connect, search_shards, sharded_knn
from diffmem.io.patterns import PatternStore

KNN = sys.modules["diffmem.core.knn"]  # diffmem.core.knn the attribute is the function


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def same(a: Neighbours, b: Neighbours) -> bool:
    return torch.equal(a.distances, b.distances) and torch.equal(a.indices, b.indices)


def refs_with_ties(m, d, dtype=torch.float32, shift=0.0):
    r = torch.randn(m, d, generator=gen(1), dtype=dtype) + shift
    r[9] = r[5]  # duplicates: equal distances, listed in increasing index
    r[m - 1] = r[3]
    return r


@pytest.fixture
def rescans(monkeypatch):
    """Counts the rows the streamed search had to re-scan (its certificate failed)."""
    calls = []
    original = KNN._stream_rescan
    monkeypatch.setattr(KNN, "_stream_rescan", lambda *a: calls.append(len(a[3])) or original(*a))
    return calls


# -- knn over a PatternSource ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("k", "query_chunk", "ref_chunk"), [(1, 7, 11), (3, 4096, 64), (12, 16, 5), (199, 8, 50)])
def test_streamed_knn_equals_in_memory(dtype, k, query_chunk, ref_chunk):
    r = refs_with_ties(200, 7, dtype)
    q = torch.cat([torch.randn(40, 7, generator=gen(2), dtype=dtype), r[:5]])  # some queries sit on refs
    chunks = {"query_chunk": query_chunk, "ref_chunk": ref_chunk}
    assert same(knn(q, TensorSource(r), k, **chunks), knn(q, r, k, **chunks))
    assert same(knn(r, TensorSource(r), k, exclude_self=True, **chunks), knn(r, r, k, exclude_self=True, **chunks))


def test_thin_margins_are_rescanned_and_stay_exact(rescans):
    r = refs_with_ties(300, 7, shift=1e3)  # large norms, small differences: the float32 certificate fails
    q = torch.randn(50, 7, generator=gen(3)) + 1e3
    assert same(knn(q, TensorSource(r), 3, ref_chunk=16), knn(q, r, 3))
    assert rescans == [50]
    brute = torch.cdist(q.double(), r.double())
    assert torch.allclose(knn(q, TensorSource(r), 3).distances, brute.sort(dim=1).values[:, :3], rtol=0, atol=1e-9)


def test_streamed_knn_over_a_store(tmp_path):
    r = refs_with_ties(2000, 12)
    q = torch.randn(30, 3, 4, generator=gen(4))
    store = PatternStore.create(tmp_path / "xi", r.reshape(2000, 3, 4), shard_rows=300)
    assert same(knn(q, store, 5, ref_chunk=256), knn(q, r, 5))
    half = PatternStore.create(tmp_path / "half", r, storage="float16", shard_rows=300)
    assert same(knn(q.reshape(30, 12), half, 5), knn(q.reshape(30, 12), r.half().float(), 5))
    wide = PatternStore.open(store.path, dtype=torch.float64)
    assert same(knn(q.double(), wide, 5), knn(q.double(), r.double(), 5))
    with pytest.raises(ValueError, match="queries are torch.float64 but the refs' source hands out torch.float32"):
        knn(q.double(), store, 5)
    with pytest.raises(ValueError, match=r"\(D = 10\) and refs of dimension D = 12"):
        knn(torch.zeros(2, 10), store, 1)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 2000\]"):
        knn(q, store, 2001)
    empty = knn(torch.zeros(0, 12), store, 4)
    assert empty.distances.shape == (0, 4) and empty.indices.dtype == torch.int64


# -- shards and their merge -----------------------------------------------------------------------------------------


def test_shard_merge_equals_one_search():
    r = refs_with_ties(500, 6, torch.float64)
    q = torch.randn(25, 6, generator=gen(5), dtype=torch.float64)
    parts = [shard_knn(q, r[o : o + 77], 10, offset=o) for o in range(0, 500, 77)]  # the last shard holds 38 rows
    assert all(p.squared.shape == (25, 10) for p in parts)
    assert same(merge_shards(parts, 10).neighbours(), knn(q, r, 10))
    halves = [merge_shards(parts[:3], 10), merge_shards(parts[3:], 10)]  # merges nest
    assert same(merge_shards(halves, 10).neighbours(), knn(q, r, 10))
    tiny = shard_knn(q, r[:4], 10, offset=0)  # a shard smaller than k gives all its rows
    assert tiny.indices.shape == (25, 4)


def test_merge_ranks_on_squared_distances():
    # two squared distances that round to the same float64 square root: the smaller one first, whatever its index
    a = 1.0 + 2**-52
    assert torch.tensor(a, dtype=torch.float64).sqrt() == 1.0
    parts = [
        ShardNeighbours(torch.tensor([[a]], dtype=torch.float64), torch.tensor([[0]])),
        ShardNeighbours(torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[1]])),
    ]
    assert merge_shards(parts, 2).indices.tolist() == [[1, 0]]


def test_merge_refuses_what_cannot_be_merged():
    part = ShardNeighbours(torch.zeros(3, 2, dtype=torch.float64), torch.tensor([[0, 1]] * 3))
    with pytest.raises(ValueError, match="the shards overlap"):
        merge_shards([part, part], 2)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 2\]"):
        merge_shards([part], 3)
    with pytest.raises(ValueError, match="different numbers of queries"):
        merge_shards([part, ShardNeighbours(torch.zeros(2, 1, dtype=torch.float64), torch.tensor([[5]] * 2))], 1)
    with pytest.raises(ValueError, match="a non-empty list of ShardNeighbours"):
        merge_shards([], 1)
    with pytest.raises(ValueError, match="offset must be a non-negative integer"):
        shard_knn(torch.zeros(1, 2), torch.zeros(3, 2), 1, offset=-1)


# -- sharded_knn ----------------------------------------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path):
    r = refs_with_ties(3000, 8)
    store = PatternStore.create(tmp_path / "xi", r, shard_rows=600)  # five shards
    q = torch.randn(60, 2, 4, generator=gen(6))
    return store, r, q


def test_in_process_shards_equal_one_search(sharded):
    store, r, q = sharded
    assert len(store.shards) == 5
    expected = knn(q, r, 7)
    assert same(sharded_knn(q, store, 7, workers=0), expected)
    assert same(sharded_knn(q, str(store.path), 7), expected)  # a store's path opens it
    middle = store.shards[1:3]  # any disjoint shards: indices stay the store's own
    got = sharded_knn(q, middle, 7)
    assert same(got, Neighbours(knn(q, r[600:1800], 7).distances, knn(q, r[600:1800], 7).indices + 600))


def test_sharded_knn_refuses_bad_requests(sharded):
    store, _, q = sharded
    with pytest.raises(ValueError, match="workers must be a non-negative integer"):
        sharded_knn(q, store, 1, workers=-1)
    with pytest.raises(ValueError, match="workers=0 runs without Ray"):
        sharded_knn(q, store, 1, address="auto")
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 3000\]"):
        sharded_knn(q, store, 3001)
    with pytest.raises(ValueError, match="queries are torch.float64 but the store hands out torch.float32"):
        sharded_knn(q.double(), store, 1)
    with pytest.raises(ValueError, match=r"with D = 8, got \(60, 4\)"):
        sharded_knn(q[:, 0], store, 1)
    with pytest.raises(ValueError, match="the shards' row ranges overlap"):
        sharded_knn(q, [store.shards[0], store.shards[0]], 1)
    with pytest.raises(ValueError, match="searches a PatternStore, the path of one"):
        sharded_knn(q, torch.zeros(5, 8), 1)


def test_groups_are_contiguous_and_balanced(sharded):
    store = sharded[0]
    groups = _groups(list(store.shards), 2)
    assert [[s.offset for s in g] for g in groups] == [[0, 600, 1200], [1800, 2400]]
    assert [len(g) for g in _groups(list(store.shards), 5)] == [1] * 5
    found = search_shards(sharded[2].reshape(60, 8), groups[1], 4, 4096, 16384)
    assert bool((found.indices >= 1800).all())


class FakeRay:
    def __init__(self, initialized=False, fail=False):
        self.initialized, self.fail, self.calls = initialized, fail, []

    def is_initialized(self):
        return self.initialized

    def init(self, **kwargs):
        self.calls.append(kwargs)
        if self.fail:
            raise ConnectionError("no cluster there")


def test_ray_connection_starts_joins_or_reuses():
    ray = FakeRay()
    assert ray_connect(ray, None, 3)
    assert ray.calls == [{"address": "local", "num_cpus": 3, "include_dashboard": False, "log_to_driver": False}]
    ray = FakeRay()
    assert ray_connect(ray, "ray://head:10001", 3)
    assert ray.calls == [{"address": "ray://head:10001", "log_to_driver": False}]
    ray = FakeRay(initialized=True)
    assert not ray_connect(ray, "auto", 3) and ray.calls == []
    with pytest.raises(ValueError, match="cannot connect to the Ray cluster at 'auto'"):
        ray_connect(FakeRay(fail=True), "auto", 1)


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_workers_equal_one_search(sharded, ray_instance):
    store, r, q = sharded
    expected = knn(q, r, 7)
    for workers in (2, 3):
        assert same(sharded_knn(q, store, 7, workers=workers), expected)
    assert ray_instance.is_initialized()  # an instance the caller started is left running
    with open(store.shards[2].path, "r+b") as f:
        f.truncate(1000)  # damaged after the store was opened: the worker that maps it says so
    with pytest.raises(ValueError, match="shard-00002.npy is truncated"):
        sharded_knn(q, store, 7, workers=2)
