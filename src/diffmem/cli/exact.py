"""Commands on the exact memory (no training): exact-demo, census, census-sweep, landscape, hopfield."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from diffmem.cli.common import Circle, DeviceOpt, check_device, circle_lines, echo_lines, fail, join_ints, progress
from diffmem.experiments.attractors import (
    check_sigma,
    circle_landscape_panels,
    continuum_panel,
    exact_census,
    landscape_panel,
    merging_scaling,
    phase_diagram,
    trained_landscape_panel,
)
from diffmem.experiments.demo import DemoConfig, run_exact_demo
from diffmem.experiments.hopfield import capacity_curve, mixture_check
from diffmem.io.data import load_dataset, load_patterns_npz, nested_order
from diffmem.io.files import prepare_out_dir, write_csv_atomic, write_json_atomic
from diffmem.viz.figures import (
    attractor_gallery,
    hopfield_capacity_plot,
    landscape_figure,
    merging_plot,
    phase_heatmap,
)

DataOpt = Annotated[
    str | None,
    typer.Option("--data", help="Built-in dataset, e.g. digits or circle; give exactly one of --data and --patterns."),
]
PatternsOpt = Annotated[
    Path | None,
    typer.Option(
        "--patterns",
        help="An .npz holding one float array (K, D), pickle refused; give exactly one of --data and --patterns.",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the subsets and the random starts.")]

# per built-in dataset: the K values and the sigma range of `census-sweep` without --k / --sigma-*
DEFAULT_SWEEP = {
    "circle": ((2, 4, 9, 16, 32, 64, 128), (0.005, 1.0)),
    "digits": ((2, 8, 32, 128, 512), (0.3, 3.0)),
}
OTHER_SWEEP = ((2, 8, 32, 128), (0.1, 2.0))
MERGE_KS = (4, 6, 8, 12, 16, 24, 32, 48, 64)  # the K values of landscape's merging study without --merge-k
KIND_NAMES = {"memory": "memories", "spurious": "spurious", "saddle": "saddles", "maximum": "maxima"}  # as printed


def _sweep_defaults(i: int) -> str:
    """census-sweep's default K values (i = 0), smallest (1) or largest (2) sigma, per built-in dataset."""

    def value(ks, sigmas):
        return join_ints(ks) if i == 0 else f"{sigmas[i - 1]:g}"

    per = [f"{value(*v)} for {name}" for name, v in DEFAULT_SWEEP.items()]
    return "; ".join(per) + f"; {value(*OTHER_SWEEP)} otherwise"


def _load_patterns(data: str | None, patterns: Path | None, device: str):
    """(dataset, ordered patterns in float64): built-ins in their seeded nested order, npz as stored."""
    if (data is None) == (patterns is None):
        fail("give exactly one of --data NAME or --patterns FILE.npz")
    if patterns is not None:
        ds = load_patterns_npz(patterns, dtype=torch.float64, device=device)
        return ds, ds.x
    ds = load_dataset(data, dtype=torch.float64, device=device)
    return ds, ds.x[nested_order(len(ds), 0).to(ds.x.device)]


def exact_demo(
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: a new ./diffmem-exact-NNNNN).")
    ] = None,
    k: Annotated[
        list[int] | None,
        typer.Option("--k", help=f"Training-set size; repeat for several (default {join_ints(DemoConfig.ks)})."),
    ] = None,
    samples: Annotated[int, typer.Option("--samples", help="Samples per K.")] = 256,
    steps: Annotated[int, typer.Option("--steps", help="DDIM steps.")] = 50,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the subsets and of the samples.")] = 0,
    circle: Annotated[
        Circle, typer.Option("--circle", help="'census' runs the circle census panels, 'skip' does not.")
    ] = "census",
    device: DeviceOpt = "cpu",
) -> None:
    """Sample the digits with the exact empirical denoiser at several K: every sample is a training image.

    Writes OUT/samples.png (each sample above its nearest training digit), OUT/landscape.png (the
    attractors of the exact memory of 2, 9 and 1000 circle points and of the continuum) and
    OUT/summary.json.

    Examples:
      diffmem exact-demo
      diffmem exact-demo --k 16 --k 128 --samples 64 --out exact-small
    """
    config = DemoConfig(
        circle_ks=DemoConfig.circle_ks if circle == "census" else (),
        ks=tuple(k) if k else DemoConfig.ks,
        n_samples=samples,
        steps=steps,
        seed=seed,
        device=check_device(device),
    )
    result = run_exact_demo(config, out)
    rows, circle_summary, out_dir = result.rows, result.circle, result.out
    typer.echo(f"{'K':>6} {'samples':>8} {'memorized':>10} {'max dist':>10} {'distinct':>9} {'seconds':>8}")
    for r in rows:
        typer.echo(
            f"{r.k:>6} {r.n_samples:>8} {r.frac_memorized:>10.3f} {r.max_distance:>10.2e} "
            f"{r.distinct_patterns:>9} {r.seconds:>8.2f}"
        )
    if circle_summary:
        echo_lines(circle_lines(circle_summary, "circle census"))
    files = "samples.png, landscape.png, summary.json" if circle_summary else "samples.png, summary.json"
    typer.echo(f"results written to {out_dir} ({files})")


def census(
    k: Annotated[int, typer.Option("--k", help="Use the first K patterns (nested order for built-in data).")],
    sigma: Annotated[float, typer.Option("--sigma", help="Noise level; beta = 1 / sigma^2.")],
    data: DataOpt = None,
    patterns: PatternsOpt = None,
    starts: Annotated[
        int, typer.Option("--starts", help="Number of starts (1/2 noise, 1/4 perturbed, 1/8 midpoints, rest mixtures).")
    ] = 2000,
    seed: SeedOpt = 0,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: ./diffmem-census-NNNNN).")
    ] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Fixed-point census of the exact memory: memories, spurious minima and saddles, with basin shares.

    Writes OUT/census.json and OUT/census.png (2D data: the landscape; otherwise a gallery).

    Examples:
      diffmem census --data circle --k 9 --sigma 0.3
      diffmem census --data digits --k 500 --sigma 1.0 --starts 5000
      diffmem census --patterns my_patterns.npz --k 100 --sigma 0.5
    """
    ds, ordered = _load_patterns(data, patterns, check_device(device))
    if not 1 <= k <= ordered.shape[0]:
        raise ValueError(f"--k must lie in [1, {ordered.shape[0]}] for {ds.name}, got {k}")
    check_sigma(sigma, "--sigma")
    if starts < 1:
        raise ValueError(f"--starts must be >= 1, got {starts}")
    out_dir = prepare_out_dir(out, "diffmem-census")
    pats = ordered[:k]
    typer.echo(f"census: {ds.name}, K={k}, sigma={sigma:g}, {starts} starts ...", err=True)
    result = exact_census(pats, sigma, starts, seed=seed)
    record = {"data": ds.name, "seed": seed, **result.to_dict()}
    write_json_atomic(out_dir / "census.json", record)
    _census_figure(ds, pats, sigma, result, record, out_dir / "census.png")
    c = result.counts
    typer.echo(
        ", ".join(f"{name} {c[kind]}" for kind, name in KIND_NAMES.items())
        + "; "
        + ", ".join(f"share {kind} {v:.3f}" for kind, v in result.shares.items())
    )
    typer.echo(
        f"starts {result.n_starts}, converged {result.n_converged}, unconverged by strategy {result.unconverged}"
    )
    typer.echo(f"results written to {out_dir} (census.json, census.png)")


def _census_figure(ds, pats, sigma: float, result, record: dict, path: Path) -> None:
    """2D patterns: the landscape (with the continuum beside the circle); otherwise a gallery."""
    if pats.shape[1] != 2:
        attractor_gallery(record, pats.cpu().numpy(), ds.image_shape, path)
        return
    lim = 1.2 * float(pats.abs().max()) + 3 * sigma
    panels = [landscape_panel(pats, sigma, title=f"{ds.name}, K = {pats.shape[0]}", result=result, lim=lim)]
    if ds.name == "circle":
        panels.append(continuum_panel(sigma, lim=lim))
    landscape_figure(panels, path, sigma=sigma)


def census_sweep(
    data: DataOpt = None,
    patterns: PatternsOpt = None,
    k: Annotated[
        list[int] | None,
        typer.Option("--k", help=f"Training-set size; repeat for several (default {_sweep_defaults(0)})."),
    ] = None,
    sigma_min: Annotated[
        float | None, typer.Option("--sigma-min", help=f"Smallest sigma of the grid (default {_sweep_defaults(1)}).")
    ] = None,
    sigma_max: Annotated[
        float | None, typer.Option("--sigma-max", help=f"Largest sigma of the grid (default {_sweep_defaults(2)}).")
    ] = None,
    n_sigma: Annotated[int, typer.Option("--n-sigma", help="Grid points, log-spaced.")] = 10,
    starts: Annotated[int, typer.Option("--starts", help="Starts per census.")] = 300,
    seed: SeedOpt = 0,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: ./diffmem-phase-NNNNN).")
    ] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Phase diagram of the exact memory over (K, sigma): counts and basin shares of each kind.

    Writes OUT/phase.csv (one row per K and sigma), OUT/thresholds.csv (per K: the largest sigma at
    which every pattern is a memory, the smallest grid sigma with a spurious minimum), OUT/phase.json
    and OUT/phase.png (heatmap of the spurious basin share and the counts).

    Examples:
      diffmem census-sweep --data circle
      diffmem census-sweep --data digits --k 8 --k 64 --k 512 --sigma-min 0.3 --sigma-max 3 --n-sigma 12
    """
    ds, ordered = _load_patterns(data, patterns, check_device(device))
    default_k, (lo, hi) = DEFAULT_SWEEP.get(ds.name, OTHER_SWEEP)
    ks = sorted(set(k or [kk for kk in default_k if kk <= ordered.shape[0]]))
    lo = sigma_min if sigma_min is not None else lo
    hi = sigma_max if sigma_max is not None else hi
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < --sigma-min < --sigma-max, got {lo} and {hi}")
    check_sigma(lo, "--sigma-min"), check_sigma(hi, "--sigma-max")
    if n_sigma < 2:
        raise ValueError(f"--n-sigma must be >= 2, got {n_sigma}")
    if starts < 1:
        raise ValueError(f"--starts must be >= 1, got {starts}")
    sigmas = [float(s) for s in np.geomspace(lo, hi, n_sigma)]
    out_dir = prepare_out_dir(out, "diffmem-phase")
    diagram = phase_diagram(ordered, ks, sigmas, n_starts=starts, seed=seed)
    write_csv_atomic(out_dir / "phase.csv", diagram.rows)
    write_csv_atomic(out_dir / "thresholds.csv", diagram.thresholds)
    record = {"data": ds.name, "seed": seed, "starts": starts}
    write_json_atomic(out_dir / "phase.json", {**record, "rows": diagram.rows, "thresholds": diagram.thresholds})
    phase_heatmap(diagram, out_dir / "phase.png", title=f"Exact dense memory of {ds.name}: phase diagram")
    echo_lines(_threshold_lines(diagram.thresholds))
    typer.echo(f"results written to {out_dir} (phase.csv, thresholds.csv, phase.json, phase.png)")


def _threshold_lines(thresholds: list[dict]) -> list[str]:
    lines = [f"{'K':>6} {'sigma all memories':>20} {'first spurious sigma':>22}"]
    for t in thresholds:
        a = "below grid" if t["sigma_all_memories"] is None else f"{t['sigma_all_memories']:.4g}"
        a = f">= {a}" if t["beyond_grid"] else a
        b = "-" if t["sigma_first_spurious"] is None else f"{t['sigma_first_spurious']:.4g}"
        lines.append(f"{t['K']:>6} {a:>20} {b:>22}")
    return lines


def landscape(
    sigma: Annotated[float, typer.Option("--sigma", help="Noise level of the panels.")] = 0.15,
    k: Annotated[list[int] | None, typer.Option("--k", help="Circle subset sizes (default 2, 9, 1000).")] = None,
    starts: Annotated[int, typer.Option("--starts", help="Starts per census.")] = 300,
    merge_k: Annotated[
        list[int] | None,
        typer.Option("--merge-k", help=f"K values of the merging study (default {join_ints(MERGE_KS)})."),
    ] = None,
    trained: Annotated[
        list[Path] | None,
        typer.Option("--trained", help="A trained 2D run to add as a panel; repeatable (default: none)."),
    ] = None,
    seed: SeedOpt = 0,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: ./diffmem-landscape-NNNNN).")
    ] = None,
) -> None:
    """The 2D circle toy: energy-landscape panels with every attractor, and neighbour merging vs K.

    Writes OUT/landscape.png, OUT/landscape.json, OUT/merging.json and OUT/merging.png.

    Examples:
      diffmem landscape
      diffmem landscape --sigma 0.25 --k 2 --k 9 --k 50
      diffmem landscape --trained runs/circle-k9
    """
    check_sigma(sigma, "--sigma")
    ks = k or [2, 9, 1000]
    if any(kk < 1 or kk > 2000 for kk in ks):
        raise ValueError(f"--k values must lie in [1, 2000], got {ks}")
    mk = merge_k or list(MERGE_KS)
    if any(kk < 3 for kk in mk):
        raise ValueError(f"--merge-k values must be >= 3, got {mk}")
    merging = merging_scaling(mk)  # before any file is written: it refuses a single K
    out_dir = prepare_out_dir(out, "diffmem-landscape")
    extra = []
    for run in trained or []:
        progress(f"landscape: trained run {run}")
        extra.append(trained_landscape_panel(run, sigma, n_starts=starts, seed=seed))
    panels = circle_landscape_panels(sigma, ks, seed=seed, n_starts=starts, extra=extra, progress=progress)
    landscape_figure(panels, out_dir / "landscape.png", sigma=sigma)
    shown = [{"title": p.title, "attractors": p.attractors, "ring_radius": p.ring_radius} for p in panels]
    write_json_atomic(out_dir / "landscape.json", {"sigma": sigma, "panels": shown})
    write_json_atomic(out_dir / "merging.json", merging)
    merging_plot(merging, out_dir / "merging.png")
    for p in panels:
        kinds = [a["kind"] for a in p.attractors]
        ring = f", ring r*={p.ring_radius:.4f}" if p.ring_radius else ""
        counts = ", ".join(f"{name} {kinds.count(kind)}" for kind, name in KIND_NAMES.items())
        typer.echo(f"{p.title:>22}: {counts}{ring}")
    typer.echo(
        f"neighbour merging (barrier {merging['threshold_nats']:g} nat): sigma_merge = "
        f"{merging['constant']:.3f} * K^-{merging['exponent']:.3f}"
    )
    typer.echo(f"results written to {out_dir} (landscape.png, landscape.json, merging.json, merging.png)")


def hopfield(
    n: Annotated[list[int] | None, typer.Option("--n", help="Network sizes N (default 200, 500, 1000).")] = None,
    spins: Annotated[int, typer.Option("--spins", help="Spins per point: networks = spins // N.")] = 40_000,
    seed: SeedOpt = 0,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: ./diffmem-hopfield-NNNNN).")
    ] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """The classical binary Hopfield network: retrieval capacity and three-pattern mixture states.

    Writes OUT/hopfield.json and OUT/hopfield_capacity.png.

    Examples:
      diffmem hopfield
      diffmem hopfield --n 1000 --spins 200000 --device cuda
    """
    ns = n or [200, 500, 1000]
    if any(v < 10 for v in ns):
        raise ValueError(f"--n values must be >= 10, got {ns}")
    if spins < 1:
        raise ValueError(f"--spins must be >= 1, got {spins}")
    dev = check_device(device)
    out_dir = prepare_out_dir(out, "diffmem-hopfield")
    cap = capacity_curve(ns, spins_per_point=spins, seed=seed, device=dev)
    mix = mixture_check(max(ns), seed=seed, device=dev)
    write_json_atomic(out_dir / "hopfield.json", {"capacity": cap, "mixtures": mix})
    hopfield_capacity_plot(cap, out_dir / "hopfield_capacity.png")
    for size, a in cap["alpha_drop_0.9"].items():
        typer.echo(f"N={size}: mean overlap drops below 0.9 at alpha = {'-' if a is None else f'{a:.3f}'}")
    typer.echo(
        f"3-mixtures at N={mix['N']}, P={mix['P']}: fixed points {mix['fixed_point_fraction']:.2f}, "
        f"energy/spin {mix['energy_per_spin_mixture']:.4f} (theory -0.375), stored pattern "
        f"{mix['energy_per_spin_pattern']:.4f} (theory -0.5)"
    )
    typer.echo(f"results written to {out_dir} (hopfield.json, hopfield_capacity.png)")
