"""Exact k-nearest-neighbour search (SCIENCE.md §5): equal to a float64 brute force, ties by index."""

import importlib
import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffmem.core.knn import MARGIN, Neighbours, knn

knn_module = importlib.import_module("diffmem.core.knn")  # the package re-exports the function under the same name


def brute_force(queries, refs, k, exclude_self=False):
    """float64 distances from differences for every pair, sorted by (distance, index)."""
    q = queries.reshape(len(queries), -1).double()
    r = refs.reshape(len(refs), -1).double()
    d = torch.cdist(q, r, compute_mode="donot_use_mm_for_euclid_dist")  # (N, M)
    if exclude_self:
        d.fill_diagonal_(math.inf)
    dist, idx = d.sort(dim=1, stable=True)  # stable: equal distances stay in index order
    return dist[:, :k], idx[:, :k]


def assert_exact(result, queries, refs, k, exclude_self=False):
    dist, idx = brute_force(queries, refs, k, exclude_self)
    assert result.indices.dtype == torch.int64 and result.distances.dtype == torch.float64
    assert torch.equal(result.indices, idx)
    assert torch.allclose(result.distances, dist, rtol=1e-13, atol=1e-13), (result.distances - dist).abs().max()


def float32_ranking(queries, refs):
    """What a float32-only search returns: the argmin of ||q||^2 + ||r||^2 - 2 q.r in float32."""
    q, r = queries.float(), refs.float()
    d2 = (q * q).sum(1, keepdim=True) + (r * r).sum(1) - 2 * q @ r.T
    return d2.argmin(dim=1)


@pytest.fixture
def rescans(monkeypatch):
    """Counts the query rows whose float32 margin was too thin and were scanned again."""
    rows = []
    original = knn_module._rescan

    def spy(q, r, qs, rs, cr, failed, *args):
        rows.extend(failed.tolist())
        return original(q, r, qs, rs, cr, failed, *args)

    monkeypatch.setattr(knn_module, "_rescan", spy)
    return rows


@pytest.mark.parametrize(
    "n, m, d, k, query_chunk, ref_chunk, dtype",
    [
        (60, 500, 16, 1, 16, 64, torch.float32),
        (60, 500, 16, 7, 7, 33, torch.float32),
        (9, 57, 5, 3, 1, 1, torch.float32),  # one row and one ref per block
        (50, 400, 32, 20, 64, 100, torch.float64),
        (70, 300, 3, 1, 4096, 16384, torch.float64),
        (20, 1000, 200, 5, 8, 128, torch.float32),
    ],
)
def test_equals_float64_brute_force(n, m, d, k, query_chunk, ref_chunk, dtype, rescans):
    g = torch.Generator().manual_seed(n + m + d + k)
    refs = torch.randn(m, d, generator=g, dtype=dtype)
    queries = torch.randn(n, d, generator=g, dtype=dtype)
    res = knn(queries, refs, k, query_chunk=query_chunk, ref_chunk=ref_chunk)
    assert isinstance(res, Neighbours) and res.distances.shape == res.indices.shape == (n, k)
    assert_exact(res, queries, refs, k)
    # distances are Euclidean, not squared, not normalized: one recomputed by hand
    i, j = 3, int(res.indices[3, -1])
    assert float(res.distances[i, -1]) == pytest.approx(math.dist(queries[i].tolist(), refs[j].tolist()), rel=1e-14)


def test_equals_cdist_with_its_default_mode():
    """The reference named in the contract: torch.cdist in float64 (matrix-product mode) + topk."""
    g = torch.Generator().manual_seed(1)
    refs, queries = torch.randn(3000, 40, generator=g), torch.randn(200, 40, generator=g)
    res = knn(queries, refs, 4, query_chunk=64, ref_chunk=512)
    dist, idx = torch.cdist(queries.double(), refs.double()).topk(4, dim=1, largest=False)
    assert torch.equal(res.indices, idx)
    assert torch.allclose(res.distances, dist, rtol=1e-10, atol=1e-10)


def test_accepts_images_and_flattens():
    g = torch.Generator().manual_seed(2)
    refs = torch.randn(90, 3, 4, 5, generator=g)
    queries = torch.randn(11, 60, generator=g)  # already flat: the same D = 60
    res = knn(queries, refs, 2, ref_chunk=16)
    assert_exact(res, queries, refs, 2)


def test_large_norms_small_differences_beat_float32(rescans):
    """All points sit within 1e-3 of one point of norm ~ 8e3: float32 cancellation in ||q||^2 + ||r||^2 - 2 q.r
    (error ~ 6e-8 * 6e7 = 4) swamps squared distances of ~ 1e-4, so a float32-only ranking is noise; the
    certificate sends every row to the re-scan and the answer is still exact."""
    g = torch.Generator().manual_seed(3)
    base = 1000 * torch.randn(1, 64, generator=g)
    refs = base + 1e-3 * torch.randn(400, 64, generator=g)
    queries = base + 1e-3 * torch.randn(30, 64, generator=g)
    exact_idx = brute_force(queries, refs, 1)[1][:, 0]
    assert (float32_ranking(queries, refs) != exact_idx).float().mean() > 0.5
    res = knn(queries, refs, 3, query_chunk=8, ref_chunk=64)
    assert_exact(res, queries, refs, 3)
    assert sorted(set(rescans)) == list(range(30))


def test_float64_inputs_closer_than_float32_resolution(rescans):
    """Squared distances that differ by a relative 1e-10: identical once cast to float32, distinct in float64.
    The float64 inputs are re-checked from their own values, so the ranking follows the index shuffle."""
    g = torch.Generator().manual_seed(4)
    m, d = 200, 24
    u = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    order = torch.randperm(m, generator=g)  # order[t] is the t-th nearest ref
    radius = torch.empty(m, dtype=torch.float64)
    radius[order] = 1 + 1e-10 * torch.arange(m, dtype=torch.float64)
    refs = u * radius[:, None]
    queries = torch.zeros(3, d, dtype=torch.float64)
    res = knn(queries, refs, 10, ref_chunk=50)
    assert_exact(res, queries, refs, 10)
    assert torch.equal(res.indices[0], order[:10])
    assert len(rescans) == 3  # the float32 pass alone could not separate them


def test_near_ties_within_margin_need_no_rescan(rescans):
    """Random data: the gap to the (k + margin)-th candidate dwarfs the float32 bound, no row is re-scanned."""
    g = torch.Generator().manual_seed(5)
    refs, queries = torch.randn(2000, 128, generator=g), torch.randn(100, 128, generator=g)
    res = knn(queries, refs, 2, query_chunk=32, ref_chunk=256)
    assert_exact(res, queries, refs, 2)
    assert rescans == []


def test_duplicates_are_neighbours_excluded_self_is_not(rescans):
    """Row i never returns i, but copies of row i at other indices are at distance 0, listed by index.
    More copies than k + margin candidates force the re-scan of those rows."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(30, 8, generator=g)
    k = 4
    copies = k + MARGIN + 2
    data = torch.cat([x[:1].expand(copies, -1), x, x[:5]])  # row 0 of x appears copies + 2 times
    res = knn(data, data, k, exclude_self=True, query_chunk=7, ref_chunk=9)
    assert_exact(res, data, data, k, exclude_self=True)
    rows = torch.arange(len(data))
    assert not bool((res.indices == rows[:, None]).any())
    group = [*range(copies), copies, copies + 30]  # every index holding x[0]
    assert res.indices[0].tolist() == group[1 : k + 1]
    assert float(res.distances[0].max()) == 0.0
    assert set(rescans) >= set(range(copies))


def test_equal_pairs_give_bit_equal_distances_on_many_threads():
    """Ties must stay ties: a distance computed alone equals the same distance computed among others, even
    where torch would split one long sum across threads (D above its 32,768-element grain)."""
    g = torch.Generator().manual_seed(15)
    q, r = torch.randn(5, 40_000, generator=g), torch.randn(5, 40_000, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batch = knn_module._sq_dist_pairs(q, r, torch.arange(5), torch.arange(5))
        alone = [knn_module._sq_dist_pairs(q, r, torch.tensor([i]), torch.tensor([i])) for i in range(5)]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.cat(alone), batch)


def test_exclude_self_with_k_equal_to_m_minus_one():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, 3, generator=g)
    res = knn(x, x, 11, exclude_self=True)
    assert_exact(res, x, x, 11, exclude_self=True)
    assert torch.equal(res.indices.sort(dim=1).values[0], torch.arange(1, 12))


def test_all_refs_are_candidates_when_there_are_few():
    g = torch.Generator().manual_seed(8)
    refs, queries = torch.randn(5, 4, generator=g), torch.randn(9, 4, generator=g)
    assert_exact(knn(queries, refs, 5), queries, refs, 5)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    m=st.integers(2, 40),
    d=st.integers(1, 4),
    k=st.integers(1, 40),
    chunk=st.integers(1, 16),
    exclude_self=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_integer_grid_ties_resolve_by_index(n, m, d, k, chunk, exclude_self, seed):
    """Points on a small integer grid: exact float64 distances with many exact ties and duplicates."""
    g = torch.Generator().manual_seed(seed)
    refs = torch.randint(-2, 3, (m, d), generator=g).float()
    queries = refs if exclude_self else torch.randint(-2, 3, (n, d), generator=g).float()
    k = min(k, m - exclude_self)
    res = knn(queries, refs, k, exclude_self=exclude_self, query_chunk=chunk, ref_chunk=chunk)
    assert_exact(res, queries, refs, k, exclude_self)


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_scores_stay_within_the_error_bound(scale, dtype):
    """The bound behind the certificate: |s - ((1 - a) n_r - 2 q.r)| <= a (n_q + n_r) + b, with the exact
    right-hand side computed in float64 from the original inputs."""
    g = torch.Generator().manual_seed(9)
    q = (torch.randn(40, 300, generator=g, dtype=torch.float64) * scale).to(dtype)
    r = (torch.randn(500, 300, generator=g, dtype=torch.float64) * scale).to(dtype)
    nq, nr = (q.double() ** 2).sum(1), (r.double() ** 2).sum(1)
    bound = knn_module._ErrorBound.for_search(q, r, nq, nr)
    assert bound.dtype == torch.float32 and 0 < bound.a < 1e-4
    cr = ((1 - bound.a) * nr).float()
    s = knn_module._scores(q.float(), r.float(), cr, torch.empty(40 * 500))
    exact = (1 - bound.a) * nr - 2 * q.double() @ r.double().T
    err = (s.double() - exact).abs()
    assert bool((err <= bound.a * (nq[:, None] + nr) + bound.b).all())
    assert float(err.max()) > 0  # the test would be empty if nothing were rounded


def test_reduced_precision_matmuls_widen_the_bound():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 on GPUs that have it
        assert knn_module._input_roundoff(torch.float32, torch.float32) == 2.0**-11
        g = torch.Generator().manual_seed(10)
        refs, queries = torch.randn(300, 20, generator=g), torch.randn(30, 20, generator=g)
        assert_exact(knn(queries, refs, 3, ref_chunk=64), queries, refs, 3)
        torch.set_float32_matmul_precision("medium")
        assert knn_module._input_roundoff(torch.float32, torch.float32) == 2.0**-8
    finally:
        torch.set_float32_matmul_precision(before)
    assert knn_module._input_roundoff(torch.float32, torch.float32) == 0.0
    assert knn_module._input_roundoff(torch.float64, torch.float32) == 2.0**-24


def test_huge_values_search_in_float64():
    """Squared norms beyond float32's range: the search pass switches to float64 and stays exact."""
    g = torch.Generator().manual_seed(11)
    refs = torch.randn(100, 6, generator=g, dtype=torch.float64) * 1e30
    queries = torch.randn(7, 6, generator=g, dtype=torch.float64) * 1e30
    nq, nr = (queries**2).sum(1), (refs**2).sum(1)
    assert knn_module._ErrorBound.for_search(queries, refs, nq, nr).dtype == torch.float64
    assert_exact(knn(queries, refs, 2), queries, refs, 2)


def test_inputs_that_require_grad_are_searched_without_a_graph():
    refs = torch.randn(50, 4, generator=torch.Generator().manual_seed(14), requires_grad=True)
    res = knn(refs, refs, 2, exclude_self=True, ref_chunk=16)
    assert not res.distances.requires_grad
    assert_exact(res, refs.detach(), refs.detach(), 2, exclude_self=True)


def test_no_queries_gives_empty_result():
    res = knn(torch.zeros(0, 5), torch.randn(4, 5), 2)
    assert res.distances.shape == res.indices.shape == (0, 2)


def test_result_is_frozen():
    res = knn(torch.zeros(1, 2), torch.ones(3, 2))
    with pytest.raises(AttributeError):
        res.indices = None


@pytest.mark.parametrize(
    "queries, refs, kwargs, match",
    [
        (torch.zeros(3, 4), torch.zeros(5, 6), {}, r"\(3, 4\).*\(5, 6\)"),
        (torch.zeros(3, 2, 2), torch.zeros(5, 5), {}, r"same dimension D"),
        (torch.zeros(4), torch.zeros(5, 4), {}, r"queries must have shape \(N, D\)"),
        (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(5, 4), {}, "float32 or float64"),
        (torch.zeros(3, 4), torch.zeros(5, 4, dtype=torch.float64), {}, "cast one of them"),
        (torch.zeros(3, 4), torch.zeros(0, 4), {}, "refs is empty"),
        (torch.zeros(3, 0), torch.zeros(5, 0), {}, "dimension D is 0"),
        (torch.tensor([[0.0, math.nan]]), torch.zeros(5, 2), {}, "queries contain NaN or Inf"),
        (torch.zeros(3, 2), torch.tensor([[0.0, math.inf]]), {}, "refs contain NaN or Inf"),
        (torch.zeros(3, 2), torch.zeros(5, 2), {"k": 0}, r"k must be an integer in \[1, 5\]"),
        (torch.zeros(3, 2), torch.zeros(5, 2), {"k": 6}, r"k must be an integer in \[1, 5\]"),
        (torch.zeros(3, 2), torch.zeros(5, 2), {"k": 2.0}, "k must be an integer"),
        (torch.zeros(5, 2), torch.zeros(5, 2), {"k": 5, "exclude_self": True}, r"\[1, 4\].*minus the query"),
        (torch.zeros(3, 2), torch.zeros(5, 2), {"exclude_self": True}, "3 queries and 5 refs"),
        (torch.zeros(3, 2), torch.zeros(5, 2), {"exclude_self": "yes"}, "True or False"),
        (torch.zeros(3, 2), torch.zeros(5, 2), {"query_chunk": 0}, "query_chunk must be a positive integer"),
        (torch.zeros(3, 2), torch.zeros(5, 2), {"ref_chunk": -1}, "ref_chunk must be a positive integer"),
        (torch.full((3, 2), 5e153, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.float64), {}, "rescale"),
    ],
)
def test_bad_inputs_raise(queries, refs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        knn(queries, refs, **kwargs)


def test_not_a_tensor():
    with pytest.raises(ValueError, match="refs must be a torch.Tensor"):
        knn(torch.zeros(2, 2), [[0.0, 0.0]])


# ---------------------------------------------------------------------------------------------
# faiss backend
# ---------------------------------------------------------------------------------------------


def test_faiss_missing_says_how_to_install(monkeypatch):
    from diffmem.evaluate.knn_faiss import knn_faiss

    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'diffmem\[faiss\]'"):
        knn_faiss(torch.zeros(2, 2), torch.zeros(3, 2))


@pytest.fixture(params=["direct", "blas"])
def faiss_path(request):
    """faiss computes small searches from differences and large ones (>= 128,000 queries by default) by a
    float32 matrix product; lowering the threshold runs the large-search path on test-sized data."""
    faiss = pytest.importorskip("faiss")
    before = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 1 if request.param == "blas" else 10**9
    yield request.param
    faiss.cvar.distance_compute_blas_threshold = before


@pytest.mark.parametrize("k, exclude_self", [(1, False), (4, False), (3, True)])
def test_faiss_backend_equals_exact_search(k, exclude_self, faiss_path, monkeypatch):
    import diffmem.evaluate.knn_faiss as backend
    from diffmem.evaluate.knn_faiss import knn_faiss

    fallback = []
    monkeypatch.setattr(backend, "_exact_rows", lambda q, r, rows, *a: fallback.append(rows))

    g = torch.Generator().manual_seed(12)
    refs = torch.randn(800, 48, generator=g)
    refs[100:110] = refs[5]  # duplicates: ties broken by index
    queries = refs if exclude_self else torch.randn(64, 48, generator=g)
    res = knn_faiss(queries, refs, k, exclude_self=exclude_self)
    exact = knn(queries, refs, k, exclude_self=exclude_self)
    assert torch.equal(res.indices, exact.indices) and torch.equal(res.distances, exact.distances)
    assert_exact(res, queries, refs, k, exclude_self)
    assert fallback == []  # on well-separated data faiss's candidates are certified as they are


def test_faiss_backend_is_exact_where_faiss_alone_is_not(faiss_path):
    import faiss

    from diffmem.evaluate.knn_faiss import knn_faiss

    g = torch.Generator().manual_seed(13)
    base = 1000 * torch.randn(1, 32, generator=g)
    refs = base + 1e-3 * torch.randn(300, 32, generator=g)
    queries = base + 1e-3 * torch.randn(25, 32, generator=g)
    index = faiss.IndexFlatL2(32)
    index.add(refs.numpy())
    raw = torch.from_numpy(index.search(queries.numpy(), 1)[1][:, 0])
    exact_idx = brute_force(queries, refs, 1)[1][:, 0]
    if faiss_path == "blas":
        assert (raw != exact_idx).float().mean() > 0.5
    for exclude_self, q in ((False, queries), (True, refs)):
        res = knn_faiss(q, refs, 2, exclude_self=exclude_self)
        assert_exact(res, q, refs, 2, exclude_self)


def test_faiss_backend_rejects_bad_inputs_like_the_core():
    pytest.importorskip("faiss")
    from diffmem.evaluate.knn_faiss import knn_faiss

    with pytest.raises(ValueError, match=r"\(3, 4\).*\(5, 6\)"):
        knn_faiss(torch.zeros(3, 4), torch.zeros(5, 6))
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 4\]"):
        knn_faiss(torch.zeros(5, 2), torch.zeros(5, 2), 5, exclude_self=True)


# ---------------------------------------------------------------------------------------------
# benchmark entries
# ---------------------------------------------------------------------------------------------


def test_bench_knn_quick():
    from diffmem.bench.harness import BenchContext
    from diffmem.bench.knn import bench_knn

    entries = {e.name: e for e in bench_knn(BenchContext("cpu", "quick", repeats=1))}
    assert {"knn_gflops", "knn_exact_mismatches"} <= set(entries)
    for e in entries.values():
        assert math.isfinite(e.value) and math.isfinite(e.reference) and math.isfinite(e.ratio)
    assert entries["knn_gflops"].value > 0
    assert entries["knn_exact_mismatches"].value == 0 and entries["knn_exact_mismatches"].met
    if "faiss" in sys.modules or _has_faiss():
        assert entries["knn_faiss_seconds"].value > 0
        assert entries["knn_faiss_seconds"].ratio == pytest.approx(
            entries["knn_faiss_seconds"].value / entries["knn_faiss_seconds"].reference
        )


def _has_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True
