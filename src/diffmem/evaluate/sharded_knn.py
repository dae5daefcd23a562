"""Exact k nearest neighbours over the shards of a pattern store, split across Ray workers (SCIENCE.md §5).

    nb = sharded_knn(queries, PatternStore.open("xi"), k=5, workers=8)                  # a local Ray instance
    nb = sharded_knn(queries, "xi", k=5, workers=64, address="auto")                     # an existing cluster
    nb = sharded_knn(queries, store, k=5, workers=0)                                     # no Ray: in this process

The shards are cut into `workers` contiguous groups of about equal rows, one Ray task each. A task opens
its shards memory-mapped (the store must sit on a filesystem every worker sees, as a study's run store
does), runs the exact search of diffmem.core.knn on each shard (shard_knn: float32 products, float64
re-check against the stored values) and merges them; the driver merges the tasks' answers. Every merge
ranks squared float64 distances, ties by index (merge_shards), so the result equals knn(queries, store, k)
bit for bit, whatever the number of workers. Only the queries travel to the workers and only (N, k)
answers come back.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from diffmem.core.knn import Neighbours, ShardNeighbours, merge_shards, shard_knn
from diffmem.io.patterns import PatternShard, PatternStore

RAY_INSTALL_HINT = "pip install 'diffmem[distributed]'"


def _shards(store_or_shards: PatternStore | str | os.PathLike | Sequence[PatternShard]) -> list[PatternShard]:
    """The shards to search: a store's, a store directory's, or a list of shards (disjoint row ranges)."""
    if isinstance(store_or_shards, str | os.PathLike):
        store_or_shards = PatternStore.open(store_or_shards)
    if isinstance(store_or_shards, PatternStore):
        return list(store_or_shards.shards)
    shards = list(store_or_shards) if isinstance(store_or_shards, Sequence) else []
    if not shards or not all(isinstance(s, PatternShard) for s in shards):
        raise ValueError(
            "sharded_knn searches a PatternStore, the path of one, or a non-empty list of its PatternShards; "
            f"got {type(store_or_shards).__name__}"
        )
    if len({(s.dim, s.read_dtype) for s in shards}) != 1:
        raise ValueError("the shards differ in dimension or read dtype; pass shards of one store")
    spans = sorted((s.offset, s.offset + s.num_patterns) for s in shards)
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)):
        raise ValueError("the shards' row ranges overlap; pass each shard once")
    return shards


def _groups(shards: list[PatternShard], n: int) -> list[list[PatternShard]]:
    """Consecutive shards cut into n <= len(shards) non-empty groups of about equal rows."""
    total = sum(s.num_patterns for s in shards)
    groups: list[list[PatternShard]] = []
    current: list[PatternShard] = []
    seen = 0
    for i, shard in enumerate(shards):
        current.append(shard)
        seen += shard.num_patterns
        later, open_groups = len(shards) - i - 1, n - len(groups) - 1
        # close the group at its share of the rows, or when each later shard must start a group of its own
        if later and open_groups and (seen >= total * (len(groups) + 1) / n or later == open_groups):
            groups.append(current)
            current = []
    return [*groups, current]


def search_shards(
    queries: Tensor | np.ndarray, shards: Sequence[PatternShard], k: int, query_chunk: int, ref_chunk: int
) -> ShardNeighbours:
    """The exact k nearest of queries over a group of shards, in this process (what one Ray task runs)."""
    q = torch.from_numpy(np.array(queries)) if isinstance(queries, np.ndarray) else queries
    parts = [shard_knn(q, s, k, offset=s.offset, query_chunk=query_chunk, ref_chunk=ref_chunk) for s in shards]
    return merge_shards(parts, min(k, sum(p.squared.shape[1] for p in parts)))


def _search_task(queries: np.ndarray, shards: list[PatternShard], k: int, query_chunk: int, ref_chunk: int):
    found = search_shards(queries, shards, k, query_chunk, ref_chunk)
    return found.squared.numpy(), found.indices.numpy()  # plain arrays travel back without torch


def sharded_knn(
    queries: Tensor,
    store_or_shards: PatternStore | str | os.PathLike | Sequence[PatternShard],
    k: int = 1,
    *,
    workers: int = 0,
    address: str | None = None,
    query_chunk: int = 4096,
    ref_chunk: int = 16384,
) -> Neighbours:
    """Exact k nearest neighbours of queries (N, D) or (N, *event) among the rows of a pattern store.

    workers: Ray tasks to split the shards over; 0 searches the shards one after another in this process
    (no Ray). address: the Ray cluster ('auto', 'ray://HEAD:10001'); None starts a local instance with
    `workers` CPUs for this call and shuts it down after (an instance already initialised is used as it
    is). Ray workers compute on their CPUs; the answer comes back on the queries' device.
    The result equals diffmem.core.knn(queries, store, k): float64 distances, ties in increasing index.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be a non-negative integer (0: no Ray, in this process), got {workers!r}")
    if address is not None and workers == 0:
        raise ValueError(f"address={address!r} names a Ray cluster, but workers=0 runs without Ray; set workers >= 1")
    shards = _shards(store_or_shards)
    total = sum(s.num_patterns for s in shards)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
        raise ValueError(f"k must be an integer in [1, {total}] (the rows of the shards), got {k!r}")
    if not isinstance(queries, Tensor) or queries.ndim < 2 or math.prod(queries.shape[1:]) != shards[0].dim:
        got = tuple(queries.shape) if isinstance(queries, Tensor) else type(queries).__name__
        raise ValueError(f"queries must be a tensor (N, D) or (N, *event) with D = {shards[0].dim}, got {got}")
    if queries.dtype != shards[0].dtype:
        raise ValueError(
            f"queries are {queries.dtype} but the store hands out {shards[0].dtype}; cast the queries or open the "
            "store with that dtype (no silent casting)"
        )
    q = queries.reshape(queries.shape[0], -1)
    if workers == 0:
        return search_shards(q, shards, k, query_chunk, ref_chunk).neighbours()
    groups = _groups(shards, min(workers, len(shards)))
    parts = _run_ray(q.detach().cpu().numpy(), groups, k, query_chunk, ref_chunk, workers, address)
    found = merge_shards(
        [ShardNeighbours(torch.from_numpy(np.array(d2)), torch.from_numpy(np.array(i))) for d2, i in parts], k
    )
    return Neighbours(found.squared.sqrt().to(q.device), found.indices.to(q.device))


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError(
            f"sharded_knn with workers >= 1 needs Ray, which is not installed: {RAY_INSTALL_HINT}"
        ) from None
    return ray


def ray_connect(ray, address: str | None, num_cpus: int) -> bool:
    """Connect to the Ray cluster at address, or start a local instance with num_cpus CPUs (address None); True
    when this call did ray.init (and so should shut it down). Shared with the study's Ray executor."""
    if ray.is_initialized():
        return False  # the caller set Ray up and keeps it
    if address is None:
        # address="local" starts a new instance even when RAY_ADDRESS points elsewhere
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        return True
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ValueError(
            f"cannot connect to the Ray cluster at {address!r} ({e}); check that it runs and pass its address, "
            "e.g. 'auto' on a cluster node or 'ray://HEAD:10001' from outside"
        ) from None
    return True


def _run_ray(
    queries: np.ndarray,
    groups: list[list[PatternShard]],
    k: int,
    query_chunk: int,
    ref_chunk: int,
    workers: int,
    address: str | None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One Ray task per group of shards; their (squared distances, indices) in the order of the groups."""
    ray = _import_ray()
    started = ray_connect(ray, address, workers)
    refs: list = []
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(_search_task)
        q = ray.put(queries)  # stored once, read by every task
        refs = [task.remote(q, group, k, query_chunk, ref_chunk) for group in groups]
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:  # a task raised (a corrupt shard, say): raise its own exception
            cause = e.cause if isinstance(e.cause, Exception) else None
            if cause is None:
                raise
            raise cause from None
    finally:
        for ref in refs:
            ray.cancel(ref)  # a no-op for finished tasks; stops the rest after a failure
        if started:
            ray.shutdown()
