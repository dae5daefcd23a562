"""The `diffmem` command line: each command is a short function over library calls."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="diffmem",
    help="Diffusion models as dense associative memories.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DeviceOpt = Annotated[str, typer.Option("--device", help="Torch device for the heavy work, e.g. cpu, cuda, cuda:1.")]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


def _check_device(device: str) -> str:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        _fail(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        _fail(f"device {device!r} requested but CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        _fail(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        _fail(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@app.command()
def demo(
    out: Annotated[
        Path | None, typer.Option("--out", help="Study directory (default: a new ./diffmem-demo-NNNNN).")
    ] = None,
    k: Annotated[
        list[int] | None, typer.Option("--k", help="Training-set size; repeat (default 4 16 48 128 384 1500).")
    ] = None,
    samples: Annotated[int, typer.Option("--samples", help="Samples per K.")] = 256,
    train_steps: Annotated[int, typer.Option("--train-steps", help="Optimizer steps for every K.")] = 4000,
    executor: Annotated[str, typer.Option("--executor", help="local, pool or ray.")] = "pool",
    workers: Annotated[int, typer.Option("--workers", help="Jobs at once (pool, ray).")] = 2,
    circle: Annotated[str, typer.Option("--circle", help="'census' runs the circle toy, 'skip' does not.")] = "census",
    device: DeviceOpt = "cpu",
) -> None:
    """The study at CPU scale: digits at six K and the circle toy, trained, sampled, classified as
    memorized / spurious / generalized, with basins, energies, curvature and census; then the report.

    About 10 minutes on two cores. Prints the phase table and the report's path. Rerunning with
    the same --out resumes.

    Examples:
      diffmem demo
      diffmem demo --k 8 --k 1500 --train-steps 1000 --samples 64 --circle skip --out demo-small
    """
    from diffmem.experiments.demo import DEMO_KS, demo_study_config, run_demo
    from diffmem.study.executors import JobsFailedError
    from diffmem.io.files import prepare_out_dir
    from diffmem.study.runner import format_phase_table

    try:
        if circle not in ("census", "skip"):
            raise ValueError(f"--circle must be 'census' or 'skip', got {circle!r}")
        config = demo_study_config(
            tuple(k) if k else DEMO_KS,
            n_samples=samples,
            train_steps=train_steps,
            executor=executor,
            workers=workers,
            device=_check_device(device),
        )
        out_dir = prepare_out_dir(out, "diffmem-demo")
        result, toy, page = run_demo(config, out_dir, circle=circle == "census")
    except (ValueError, ImportError, JobsFailedError) as e:
        _fail(str(e))
    typer.echo(format_phase_table(result.rows))
    t = result.transitions
    typer.echo(
        f"last memorizing K: {t['last_memorizing_K']}, first generalizing K: {t['first_generalizing_K']}, "
        f"spurious peak at K = {t['spurious_peak_K']} ({t['spurious_peak_fraction']:.3f})"
    )
    if toy:
        typer.echo(f"circle toy at sigma = {toy['sigma']:g}:")
        for p in toy["panels"]:
            ring = f", ring r*={p['ring_radius']:.4f}" if p["ring_radius"] else ""
            typer.echo(f"  {p['title']:>20}: " + ", ".join(f"{k} {v}" for k, v in p["counts"].items()) + ring)
    typer.echo(f"results written to {page}")


@app.command("exact-demo")
def exact_demo(
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: a new ./diffmem-exact-NNNNN).")
    ] = None,
    k: Annotated[list[int] | None, typer.Option("--k", help="Training-set size; repeat for several.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Samples per K.")] = 256,
    steps: Annotated[int, typer.Option("--steps", help="DDIM steps.")] = 50,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the subsets and of the samples.")] = 0,
    circle: Annotated[
        str, typer.Option("--circle", help="'census' runs the circle census panels, 'skip' does not.")
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
    from diffmem.experiments.demo import DemoConfig, run_exact_demo
    from diffmem.io.files import prepare_out_dir

    try:
        if circle not in ("census", "skip"):
            raise ValueError(f"--circle must be 'census' or 'skip', got {circle!r}")
        config = DemoConfig(
            circle_ks=DemoConfig.circle_ks if circle == "census" else (),
            ks=tuple(k) if k else DemoConfig.ks,
            n_samples=samples,
            steps=steps,
            seed=seed,
            device=_check_device(device),
        )
        out_dir = prepare_out_dir(out, "diffmem-exact")
        rows, circle_summary = run_exact_demo(config, out_dir)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"{'K':>6} {'samples':>8} {'memorized':>10} {'max dist':>10} {'distinct':>9} {'seconds':>8}")
    for r in rows:
        typer.echo(
            f"{r.k:>6} {r.n_samples:>8} {r.frac_memorized:>10.3f} {r.max_distance:>10.2e} "
            f"{r.distinct_patterns:>9} {r.seconds:>8.2f}"
        )
    if circle_summary:
        typer.echo(f"circle census at sigma={circle_summary['sigma']:g}:")
        for p in circle_summary["panels"]:
            ring = f", ring r*={p['ring_radius']:.4f}" if p["ring_radius"] else ""
            typer.echo(f"  {p['title']:>20}: " + ", ".join(f"{k} {v}" for k, v in p["counts"].items()) + ring)
    files = "samples.png, landscape.png, summary.json" if circle_summary else "samples.png, summary.json"
    typer.echo(f"results written to {out_dir} ({files})")


@app.command()
def bench(
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Run only this benchmark; repeat for several.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the entries as JSON to this file.")] = None,
    size: Annotated[
        str, typer.Option("--size", help="'full' (the stated problem sizes) or 'quick' (a smoke run).")
    ] = "full",
    repeats: Annotated[int, typer.Option("--repeats", help="Timed repetitions; the best is kept.")] = 3,
    device: DeviceOpt = "cpu",
) -> None:
    """Run the benchmark harness: each figure with a reference measured in the same run and their ratio.

    Examples:
      diffmem bench
      diffmem bench --only exact_step --out bench.json
      diffmem bench --size quick --device cuda
    """
    from diffmem.bench.harness import entries_to_json, format_table, run_benchmarks
    from diffmem.io.files import write_json_atomic

    if repeats < 1:
        _fail(f"--repeats must be >= 1, got {repeats}")
    if out is not None and not out.parent.exists():
        _fail(f"the directory of --out ({out.parent}) does not exist")
    try:
        entries = run_benchmarks(
            only, device=_check_device(device), size=size, repeats=repeats, progress=lambda m: typer.echo(m, err=True)
        )
    except ValueError as e:
        _fail(str(e))
    typer.echo(format_table(entries))
    if out is not None:
        try:
            write_json_atomic(out, entries_to_json(entries))
        except OSError as e:
            _fail(f"cannot write {out}: {e.strerror}")
        typer.echo(f"results written to {out}")
    else:
        typer.echo("results printed above (pass --out FILE.json to save them)")


def main() -> None:  # pragma: no cover - console entry point
    app()


# ---------------------------------------------------------------------------------------------
# Attractors
# ---------------------------------------------------------------------------------------------

DataOpt = Annotated[str | None, typer.Option("--data", help="Built-in dataset: digits or circle.")]
PatternsOpt = Annotated[
    Path | None, typer.Option("--patterns", help="An .npz holding one float array (K, D); pickle is refused.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the subsets and the random starts.")]


def _load_patterns(data: str | None, patterns: Path | None, device: str):
    """(dataset, ordered patterns in float64): built-ins in their seeded nested order, npz as stored."""
    import torch

    from diffmem.io.data import load_dataset, load_patterns_npz, nested_order

    if (data is None) == (patterns is None):
        _fail("give exactly one of --data NAME or --patterns FILE.npz")
    if patterns is not None:
        ds = load_patterns_npz(patterns, dtype=torch.float64, device=device)
        return ds, ds.x
    ds = load_dataset(data, dtype=torch.float64, device=device)
    return ds, ds.x[nested_order(len(ds), 0).to(ds.x.device)]


@app.command()
def census(
    data: DataOpt = None,
    patterns: PatternsOpt = None,
    k: Annotated[int, typer.Option("--k", help="Use the first K patterns (nested order for built-in data).")] = 0,
    sigma: Annotated[float, typer.Option("--sigma", help="Noise level; beta = 1 / sigma^2.")] = 0.0,
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
    from diffmem.experiments.attractors import continuum_panel, exact_census, landscape_panel
    from diffmem.viz.figures import attractor_gallery, landscape_figure
    from diffmem.io.files import prepare_out_dir, write_json_atomic

    try:
        ds, ordered = _load_patterns(data, patterns, _check_device(device))
        if not 1 <= k <= ordered.shape[0]:
            raise ValueError(f"--k must lie in [1, {ordered.shape[0]}] for {ds.name}, got {k}")
        if not sigma > 0:
            raise ValueError(f"--sigma must be > 0, got {sigma}")
        if starts < 1:
            raise ValueError(f"--starts must be >= 1, got {starts}")
        out_dir = prepare_out_dir(out, "diffmem-census")
        pats = ordered[:k]
        typer.echo(f"census: {ds.name}, K={k}, sigma={sigma:g}, {starts} starts ...", err=True)
        result = exact_census(pats, sigma, starts, seed=seed)
        record = {"data": ds.name, "seed": seed, **result.to_dict()}
        write_json_atomic(out_dir / "census.json", record)
        if pats.shape[1] == 2:
            lim = 1.2 * float(pats.abs().max()) + 3 * sigma
            panels = [landscape_panel(pats, sigma, title=f"{ds.name}, K = {k}", result=result, lim=lim)]
            if ds.name == "circle":
                panels.append(continuum_panel(sigma, lim=lim))
            landscape_figure(panels, out_dir / "census.png", sigma=sigma)
        else:
            attractor_gallery(record, pats.cpu().numpy(), ds.image_shape, out_dir / "census.png")
    except ValueError as e:
        _fail(str(e))
    c = result.counts
    typer.echo(
        f"memories {c['memory']}, spurious {c['spurious']}, saddles {c['saddle']}; "
        + ", ".join(f"share {kind} {v:.3f}" for kind, v in result.shares.items())
    )
    typer.echo(
        f"starts {result.n_starts}, converged {result.n_converged}, unconverged by strategy {result.unconverged}"
    )
    typer.echo(f"results written to {out_dir} (census.json, census.png)")


DEFAULT_SWEEP = {
    "circle": ((2, 4, 9, 16, 32, 64, 128), (0.005, 1.0)),
    "digits": ((2, 8, 32, 128, 512), (0.3, 3.0)),
}


@app.command("census-sweep")
def census_sweep(
    data: DataOpt = None,
    patterns: PatternsOpt = None,
    k: Annotated[list[int] | None, typer.Option("--k", help="Training-set size; repeat for several.")] = None,
    sigma_min: Annotated[float | None, typer.Option("--sigma-min", help="Smallest sigma of the grid.")] = None,
    sigma_max: Annotated[float | None, typer.Option("--sigma-max", help="Largest sigma of the grid.")] = None,
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
    import csv
    import io

    import numpy as np

    from diffmem.experiments.attractors import phase_diagram
    from diffmem.viz.figures import phase_heatmap
    from diffmem.io.files import prepare_out_dir, write_bytes_atomic, write_json_atomic

    try:
        ds, ordered = _load_patterns(data, patterns, _check_device(device))
        default_k, (lo, hi) = DEFAULT_SWEEP.get(ds.name, ((2, 8, 32, 128), (0.1, 2.0)))
        ks = sorted(set(k or [kk for kk in default_k if kk <= ordered.shape[0]]))
        lo = sigma_min if sigma_min is not None else lo
        hi = sigma_max if sigma_max is not None else hi
        if not 0 < lo < hi:
            raise ValueError(f"need 0 < --sigma-min < --sigma-max, got {lo} and {hi}")
        if n_sigma < 2:
            raise ValueError(f"--n-sigma must be >= 2, got {n_sigma}")
        if starts < 1:
            raise ValueError(f"--starts must be >= 1, got {starts}")
        sigmas = [float(s) for s in np.geomspace(lo, hi, n_sigma)]
        out_dir = prepare_out_dir(out, "diffmem-phase")
        diagram = phase_diagram(ordered, ks, sigmas, n_starts=starts, seed=seed)
        for name, rows in (("phase.csv", diagram.rows), ("thresholds.csv", diagram.thresholds)):
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
            write_bytes_atomic(out_dir / name, buf.getvalue().encode())
        write_json_atomic(
            out_dir / "phase.json",
            {"data": ds.name, "seed": seed, "starts": starts, "rows": diagram.rows, "thresholds": diagram.thresholds},
        )
        phase_heatmap(diagram, out_dir / "phase.png", title=f"Exact dense memory of {ds.name}: phase diagram")
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"{'K':>6} {'sigma all memories':>20} {'first spurious sigma':>22}")
    for t in diagram.thresholds:
        a = "below grid" if t["sigma_all_memories"] is None else f"{t['sigma_all_memories']:.4g}"
        a = f">= {a}" if t["beyond_grid"] else a
        b = "-" if t["sigma_first_spurious"] is None else f"{t['sigma_first_spurious']:.4g}"
        typer.echo(f"{t['K']:>6} {a:>20} {b:>22}")
    typer.echo(f"results written to {out_dir} (phase.csv, thresholds.csv, phase.json, phase.png)")


@app.command()
def landscape(
    sigma: Annotated[float, typer.Option("--sigma", help="Noise level of the panels.")] = 0.15,
    k: Annotated[list[int] | None, typer.Option("--k", help="Circle subset sizes (default 2, 9, 1000).")] = None,
    starts: Annotated[int, typer.Option("--starts", help="Starts per census.")] = 300,
    merge_k: Annotated[list[int] | None, typer.Option("--merge-k", help="K values of the merging study.")] = None,
    trained: Annotated[
        list[Path] | None, typer.Option("--trained", help="A trained 2D run to add as a panel; repeatable.")
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
      diffmem landscape --trained runs/circle-k9 --trained runs/circle-k1000
    """
    from diffmem.experiments.attractors import circle_landscape_panels, merging_scaling, trained_landscape_panel
    from diffmem.viz.figures import landscape_figure, merging_plot
    from diffmem.io.files import prepare_out_dir, write_json_atomic

    try:
        if not sigma > 0:
            raise ValueError(f"--sigma must be > 0, got {sigma}")
        ks = k or [2, 9, 1000]
        if any(kk < 1 or kk > 2000 for kk in ks):
            raise ValueError(f"--k values must lie in [1, 2000], got {ks}")
        mk = merge_k or [4, 6, 8, 12, 16, 24, 32, 48, 64]
        if any(kk < 3 for kk in mk):
            raise ValueError(f"--merge-k values must be >= 3, got {mk}")
        out_dir = prepare_out_dir(out, "diffmem-landscape")
        extra = []
        for run in trained or []:
            typer.echo(f"landscape: trained run {run}", err=True)
            extra.append(trained_landscape_panel(run, sigma, n_starts=starts, seed=seed))
        panels = circle_landscape_panels(
            sigma, ks, seed=seed, n_starts=starts, extra=extra, progress=lambda m: typer.echo(m, err=True)
        )
        landscape_figure(panels, out_dir / "landscape.png", sigma=sigma)
        write_json_atomic(
            out_dir / "landscape.json",
            {
                "sigma": sigma,
                "panels": [
                    {"title": p.title, "attractors": p.attractors, "ring_radius": p.ring_radius} for p in panels
                ],
            },
        )
        merging = merging_scaling(mk)
        write_json_atomic(out_dir / "merging.json", merging)
        merging_plot(merging, out_dir / "merging.png")
    except ValueError as e:
        _fail(str(e))
    for p in panels:
        kinds = [a["kind"] for a in p.attractors]
        ring = f", ring r*={p.ring_radius:.4f}" if p.ring_radius else ""
        typer.echo(
            f"{p.title:>22}: memories {kinds.count('memory')}, spurious {kinds.count('spurious')}, "
            f"saddles {kinds.count('saddle')}{ring}"
        )
    typer.echo(
        f"neighbour merging (barrier {merging['threshold_nats']:g} nat): sigma_merge = "
        f"{merging['constant']:.3f} * K^-{merging['exponent']:.3f}"
    )
    typer.echo(f"results written to {out_dir} (landscape.png, landscape.json, merging.json, merging.png)")


@app.command()
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
    from diffmem.experiments.hopfield import capacity_curve, mixture_check
    from diffmem.viz.figures import hopfield_capacity_plot
    from diffmem.io.files import prepare_out_dir, write_json_atomic

    try:
        ns = n or [200, 500, 1000]
        if any(v < 10 for v in ns):
            raise ValueError(f"--n values must be >= 10, got {ns}")
        if spins < 1:
            raise ValueError(f"--spins must be >= 1, got {spins}")
        dev = _check_device(device)
        out_dir = prepare_out_dir(out, "diffmem-hopfield")
        cap = capacity_curve(ns, spins_per_point=spins, seed=seed, device=dev)
        mix = mixture_check(max(ns), seed=seed, device=dev)
        write_json_atomic(out_dir / "hopfield.json", {"capacity": cap, "mixtures": mix})
        hopfield_capacity_plot(cap, out_dir / "hopfield_capacity.png")
    except ValueError as e:
        _fail(str(e))
    for size, a in cap["alpha_drop_0.9"].items():
        typer.echo(f"N={size}: mean overlap drops below 0.9 at alpha = {'-' if a is None else f'{a:.3f}'}")
    typer.echo(
        f"3-mixtures at N={mix['N']}, P={mix['P']}: fixed points {mix['fixed_point_fraction']:.2f}, "
        f"energy/spin {mix['energy_per_spin_mixture']:.4f} (theory -0.375), stored pattern "
        f"{mix['energy_per_spin_pattern']:.4f} (theory -0.5)"
    )
    typer.echo(f"results written to {out_dir} (hopfield.json, hopfield_capacity.png)")


# ---------------------------------------------------------------------------------------------
# Trained models
# ---------------------------------------------------------------------------------------------


@app.command("train")
def train_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run directory; an existing run with the same options resumes.")],
    data: Annotated[str, typer.Option("--data", help="Dataset name (digits, circle, mnist, cifar10, ...).")] = "digits",
    root: Annotated[Path | None, typer.Option("--root", help="Folder (or .npz) of a file-based dataset.")] = None,
    k: Annotated[int, typer.Option("--k", help="Training-set size: the first K of the seeded permutation.")] = 128,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps (the same for every K).")] = 2000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size.")] = 128,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate after warm-up.")] = 1e-3,
    network: Annotated[str, typer.Option("--network", help="'mlp' or 'unet'.")] = "mlp",
    hidden: Annotated[int, typer.Option("--hidden", help="MLP width.")] = 256,
    depth: Annotated[int, typer.Option("--depth", help="MLP residual blocks.")] = 3,
    prediction: Annotated[str, typer.Option("--prediction", help="'epsilon' or 'sample' (x0).")] = "epsilon",
    n_held_out: Annotated[int, typer.Option("--n-held-out", help="Examples never trained on (far end).")] = 0,
    subset: Annotated[
        str, typer.Option("--subset", help="'nested', or 'pair_a'/'pair_b' (two-model test).")
    ] = "nested",
    seed: Annotated[int, typer.Option("--seed", help="Seed of initialisation, batches and noise.")] = 0,
    split_seed: Annotated[int, typer.Option("--split-seed", help="Seed of the data permutation.")] = 0,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")] = 500,
    device: DeviceOpt = "cpu",
) -> None:
    """Train a DDPM denoiser on the nested training subset of size K (EMA weights are used for sampling).

    Writes OUT/config.json, OUT/checkpoint.safetensors + OUT/checkpoint.json and OUT/metrics.jsonl.

    Examples:
      diffmem train --data digits --k 32 --steps 4000 --out runs/digits-k32
      diffmem train --data mnist --root ~/data/mnist --network unet --k 1000 --device cuda --out runs/mnist-k1000
    """
    from diffmem.models.nets import NetworkConfig
    from diffmem.models.train import TrainConfig, train

    try:
        net = NetworkConfig(kind=network, mlp={"hidden": hidden, "depth": depth} if network == "mlp" else {})
        config = TrainConfig(
            data=data,
            data_options={"root": str(root)} if root else {},
            k=k,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            network=net,
            prediction_type=prediction,
            n_held_out=n_held_out,
            subset=subset,
            seed=seed,
            split_seed=split_seed,
            checkpoint_every=checkpoint_every,
        )
        result = train(config, out, device=_check_device(device))
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"trained {result.step} steps; results written to {result.out_dir}")


@app.command()
def sample(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `diffmem train`.")],
    n: Annotated[int, typer.Option("--samples", help="Number of samples.")] = 256,
    sampler: Annotated[str, typer.Option("--sampler", help="ddim, ddpm, ode (Heun), euler or heun.")] = "ddim",
    steps: Annotated[int, typer.Option("--steps", help="Sampling steps.")] = 50,
    eta: Annotated[float, typer.Option("--eta", help="DDIM stochasticity in [0, 1].")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Sample i uses seed seed * 1000003 + i.")] = 0,
    weights: Annotated[str, typer.Option("--weights", help="'ema' or 'live'.")] = "ema",
    out_file: Annotated[Path | None, typer.Option("--out", help="Write FILE.npz (and FILE.png, FILE.json).")] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Sample a trained run; each sample is identified by its seed.

    Writes samples.npz (samples, seeds, nearest training index and distance), samples.png (samples
    above their nearest training images) and sample.json into a new RUN_DIR/samples-NNNNN/, or to
    --out FILE.npz with FILE.png and FILE.json beside it.

    Examples:
      diffmem sample runs/digits-k32 --samples 512
      diffmem sample runs/digits-k32 --sampler ddpm --steps 1000 --seed 3
    """
    from diffmem.core import schedule_from_dict
    from diffmem.viz.figures import sample_neighbour_grid
    from diffmem.io.files import new_run_dir, write_json_atomic
    from diffmem.models.sampling import nearest_distance, sample_denoiser, save_samples
    from diffmem.models.train import load_denoiser

    try:
        if weights not in ("ema", "live"):
            raise ValueError(f"--weights must be 'ema' or 'live', got {weights!r}")
        if eta != 0 and sampler != "ddim":
            raise ValueError(f"--eta applies to the ddim sampler only (got --sampler {sampler})")
        if not run_dir.is_dir():
            raise ValueError(f"run directory not found: {run_dir}")
        dev = _check_device(device)
        den, config, train_x, event, _ = load_denoiser(run_dir, device=dev, use_ema=weights == "ema")
        schedule = schedule_from_dict(config.schedule)
        samples, seeds = sample_denoiser(
            den, schedule, n, event, sampler=sampler, steps=steps, eta=eta, seed=seed, device=dev
        )
        dist, idx = nearest_distance(samples, train_x.cpu())
        if out_file is None:
            out = new_run_dir(run_dir, "samples")
            npz, png, meta = out / "samples.npz", out / "samples.png", out / "sample.json"
        else:
            out = out_file.with_suffix(".npz")
            if not out.parent.is_dir():
                raise ValueError(f"the directory of --out ({out.parent}) does not exist")
            npz, png, meta = out, out.with_suffix(".png"), out.with_suffix(".json")
        save_samples(npz, samples, seeds, nearest_index=idx.numpy(), nearest_distance=dist.numpy())
        options = {"n": n, "sampler": sampler, "steps": steps, "eta": eta, "seed": seed, "weights": weights}
        write_json_atomic(meta, {**options, "run": str(run_dir), "distance": "L2 / sqrt(D)"})
        if len(event) >= 2:
            show = min(16, n)
            grid = samples[:show].reshape(show, *event)
            near = train_x.cpu()[idx[:show]].reshape(show, *event)
            if len(event) == 3:  # grey images show as they are, colour ones as the mean over channels
                grid, near = grid.mean(1), near.mean(1)
            sample_neighbour_grid(
                [(f"K={config.k}", grid.numpy(), near.numpy())],
                png,
                title=f"{sampler}, {steps} steps: samples above their nearest training images",
            )
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"median distance to the nearest training example: {float(dist.median()):.4f} (L2 / sqrt(D))")
    typer.echo(f"results written to {out}")


@app.command()
def memorization(
    out: Annotated[Path, typer.Option("--out", help="Study directory (one run per K inside; resumable).")],
    data: Annotated[str, typer.Option("--data", help="Dataset name.")] = "digits",
    root: Annotated[Path | None, typer.Option("--root", help="Folder of a file-based dataset.")] = None,
    k: Annotated[list[int] | None, typer.Option("--k", help="Training-set sizes (default 8 32 128 512 1500).")] = None,
    n_held_out: Annotated[int, typer.Option("--n-held-out", help="Held-out examples (never trained on).")] = 297,
    steps: Annotated[int, typer.Option("--train-steps", help="Optimizer steps for every K.")] = 6000,
    hidden: Annotated[int, typer.Option("--hidden", help="MLP width.")] = 512,
    depth: Annotated[int, typer.Option("--depth", help="MLP residual blocks.")] = 4,
    samples: Annotated[int, typer.Option("--samples", help="Samples per K.")] = 512,
    device: DeviceOpt = "cpu",
) -> None:
    """Train one model per nested K, sample it, and measure how many samples are training copies.

    A sample counts as memorized when its nearest training image is closer than the 5% quantile of
    the held-out images' nearest-training distances. Writes memorization.json/.csv/.png.

    Examples:
      diffmem memorization --out studies/digits
      diffmem memorization --k 8 --k 1500 --train-steps 2000 --out studies/quick
    """
    from diffmem.study.memorization import memorization_study
    from diffmem.models.nets import NetworkConfig
    from diffmem.models.train import TrainConfig

    try:
        base = TrainConfig(
            data=data,
            data_options={"root": str(root)} if root else {},
            n_held_out=n_held_out,
            steps=steps,
            lr_schedule="cosine",
            warmup_steps=200,
            network=NetworkConfig("mlp", {"hidden": hidden, "depth": depth}),
        )
        rows = memorization_study(
            base, k or [8, 32, 128, 512, 1500], out, n_samples=samples, device=_check_device(device)
        )
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"{'K':>6} {'memorized':>10} {'threshold':>10} {'train s':>8}")
    for r in rows:
        typer.echo(f"{r['K']:>6} {r['fraction']:>10.3f} {r['threshold']:>10.4f} {r['train_seconds']:>8.1f}")
    typer.echo(f"results written to {out} (memorization.json, memorization.csv, memorization.png)")


@app.command()
def analyze(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `diffmem train`.")],
    metric: Annotated[str, typer.Option("--metric", help="'l2' (pixel L2 / sqrt(D)) or 'lpips'.")] = "l2",
    samples: Annotated[int, typer.Option("--samples", help="Generated samples to classify.")] = 512,
    steps: Annotated[int, typer.Option("--steps", help="Sampling steps.")] = 50,
    sampler: Annotated[str, typer.Option("--sampler", help="ddim, ddpm, ode (Heun), euler or heun.")] = "ddim",
    delta_m: Annotated[
        float | None, typer.Option("--delta-m", help="Memorized threshold (default: calibrated on held-out data).")
    ] = None,
    delta_s: Annotated[
        float | None, typer.Option("--delta-s", help="Spurious threshold (default: calibrated on held-out data).")
    ] = None,
    quantile: Annotated[float, typer.Option("--quantile", help="Calibration quantile of held-out distances.")] = 0.05,
    rule: Annotated[str, typer.Option("--rule", help="'threshold' (m <= delta_m) or 'ratio' (m/m2 < 1/3).")] = (
        "threshold"
    ),
    basins: Annotated[bool, typer.Option("--basins", help="Critical noise levels per class.")] = False,
    energy: Annotated[bool, typer.Option("--energy", help="-log p per class along two paths.")] = False,
    curvature: Annotated[bool, typer.Option("--curvature", help="Hessian spectra of -log p per class.")] = False,
    census: Annotated[bool, typer.Option("--census", help="Fixed points of the trained denoiser.")] = False,
    collapse: Annotated[bool, typer.Option("--collapse", help="Collapse levels along sampling trajectories.")] = False,
    points: Annotated[int, typer.Option("--points", help="Points per class for basins, energy, curvature.")] = 32,
    sigma: Annotated[float, typer.Option("--sigma", help="Noise level of energy, curvature and census.")] = 0.2,
    weights_dir: Annotated[
        Path | None, typer.Option("--weights-dir", help="Folder of the LPIPS weight files (--metric lpips).")
    ] = None,
    lpips_net: Annotated[str, typer.Option("--lpips-net", help="'alex' or 'vgg'.")] = "alex",
    lpips_resize: Annotated[
        int | None, typer.Option("--lpips-resize", help="Upsample images to this side before LPIPS.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of samples, point choice and analyses.")] = 0,
    device: DeviceOpt = "cpu",
) -> None:
    """Classify a run's samples as memorized / spurious / generalized and measure their attractors.

    Writes RUN_DIR/analysis/: samples.npz, distances.npz, samples.csv (per sample: class, m, s,
    neighbours), classification.json (thresholds, fractions with bootstrap 95% intervals),
    gallery.png, and with the flags basins / energy / curvature / census / collapse .csv/.json;
    analysis.json sums it up.

    Examples:
      diffmem analyze runs/digits-k32
      diffmem analyze runs/digits-k32 --basins --energy --curvature --census --collapse
      diffmem analyze runs/cifar-k1000 --metric lpips --weights-dir ~/weights --device cuda
    """
    from diffmem.evaluate.analysis import AnalysisConfig, analyze_run

    try:
        config = AnalysisConfig(
            n_samples=samples,
            sampler=sampler,
            sample_steps=steps,
            sample_seed=seed,
            metric=metric,
            lpips_net=lpips_net,
            weights_dir=str(weights_dir) if weights_dir else None,
            lpips_resize=lpips_resize,
            delta_m=delta_m,
            delta_s=delta_s,
            quantile=quantile,
            rule=rule,
            basin_points=points,
            energy_points=points,
            curvature_points=points,
            energy_sigma=sigma,
            curvature_sigma=sigma,
            census_sigma=sigma,
            seed=seed,
        )
        flags = {"basins": basins, "energy": energy, "curvature": curvature, "census": census, "collapse": collapse}
        extra = tuple(name for name, on in flags.items() if on)
        result = analyze_run(run_dir, config, extra=extra, device=_check_device(device))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    c = result["classification"]
    typer.echo(f"K = {result['K']}, N = {c['n_samples']} samples, metric {c['metric']}, rule {c['rule']}")
    dm = "-" if c["delta_m"] is None else f"{c['delta_m']:.4f}"
    typer.echo(f"thresholds: delta_m = {dm}, delta_s = {c['delta_s']:.4f} ({c['calibration'].get('calibration')})")
    for cls, f in c["fractions"].items():
        typer.echo(f"  {cls:<12} {f['value']:.3f}  [{f['low']:.3f}, {f['high']:.3f}]")
    typer.echo(f"results written to {Path(run_dir) / 'analysis'}")


@app.command("two-model")
def two_model(
    out: Annotated[Path, typer.Option("--out", help="Study directory (two runs per K inside; resumable).")],
    data: Annotated[str, typer.Option("--data", help="Dataset name.")] = "digits",
    root: Annotated[Path | None, typer.Option("--root", help="Folder of a file-based dataset.")] = None,
    k: Annotated[list[int] | None, typer.Option("--k", help="Training-set size of each model; repeat.")] = None,
    n_held_out: Annotated[int, typer.Option("--n-held-out", help="Held-out examples (calibrate delta).")] = 297,
    steps: Annotated[int, typer.Option("--train-steps", help="Optimizer steps for every K.")] = 6000,
    hidden: Annotated[int, typer.Option("--hidden", help="MLP width.")] = 512,
    depth: Annotated[int, typer.Option("--depth", help="MLP residual blocks.")] = 4,
    samples: Annotated[int, typer.Option("--samples", help="Samples per model, same seeds for both.")] = 256,
    delta: Annotated[
        float | None, typer.Option("--delta", help="Agreement radius (default: held-out calibration).")
    ] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Two models trained on disjoint sets of size K, sampled from the same noise: agreement vs K.

    Writes OUT/two_model.json and OUT/two_model.png.

    Examples:
      diffmem two-model --out studies/two-model --k 8 --k 64 --k 512
    """
    from diffmem.models.nets import NetworkConfig
    from diffmem.models.train import TrainConfig
    from diffmem.evaluate.two_model import two_model_study

    try:
        base = TrainConfig(
            data=data,
            data_options={"root": str(root)} if root else {},
            n_held_out=n_held_out,
            steps=steps,
            lr_schedule="cosine",
            warmup_steps=min(200, steps),
            network=NetworkConfig("mlp", {"hidden": hidden, "depth": depth}),
        )
        rows = two_model_study(
            base, k or [8, 64, 512], out, n_samples=samples, delta=delta, device=_check_device(device)
        )
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"{'K':>6} {'agreement':>10} {'mean dist':>10}")
    for r in rows:
        typer.echo(f"{r['K']:>6} {r['agreement']:>10.3f} {r['mean_distance']:>10.4f}")
    typer.echo(f"results written to {out} (two_model.json, two_model.png)")


@app.command()
def sweep(
    config_file: Annotated[Path, typer.Argument(help="Study configuration (.yaml, .yml, .toml or .json).")],
    out: Annotated[Path | None, typer.Option("--out", help="Study directory; rerunning resumes it.")] = None,
    executor: Annotated[
        str | None, typer.Option("--executor", help="local, pool or ray (default: the config's).")
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Jobs at once (pool, ray).")] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster address, e.g. auto or ray://head:10001.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved configuration and stop.")] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write the HTML report at the end.")] = True,
    device: Annotated[
        str | None, typer.Option("--device", help="Torch device, e.g. cpu, cuda (default: the config's).")
    ] = None,
) -> None:
    """Run a K sweep: train, sample, classify and analyse one model per (K, seed), then the phase table.

    Every stage is recorded in a manifest with content hashes; rerunning the same command resumes
    after a crash, and a directory made by another configuration is refused.

    Examples:
      diffmem sweep examples/digits-study.yaml --dry-run
      diffmem sweep examples/digits-study.yaml --out studies/digits --executor pool --workers 2
      diffmem sweep cifar.yaml --out /shared/cifar --executor ray --address auto --device cuda
    """
    from diffmem.study.executors import JobsFailedError
    from diffmem.study.runner import format_phase_table, run_study
    from diffmem.study.config import ExecutorConfig, format_resolved, load_study_config

    try:
        config = load_study_config(config_file)
        ex = config.executor.to_dict()
        if executor is not None:
            ex["kind"] = executor
            if executor != "ray":
                ex["address"] = None
            if executor == "local":
                ex["workers"] = 1
        if workers is not None:
            ex["workers"] = workers
        if address is not None:
            ex["address"] = address
        resolved = {**config.to_dict(), "executor": ExecutorConfig.from_dict(ex).to_dict()}
        if device is not None:
            resolved["device"] = _check_device(device)
        config = type(config).from_dict(resolved)  # validated again: e.g. gpus_per_job against the device
        if dry_run:
            typer.echo(format_resolved(config), nl=False)
            return
        if out is None:
            raise ValueError("give the study directory with --out DIR (or use --dry-run)")
        _check_device(config.device)
        result = run_study(config, out, report=report)
    except (ValueError, ImportError, JobsFailedError) as e:
        _fail(str(e))
    typer.echo(format_phase_table(result.rows))
    t = result.transitions
    typer.echo(
        f"last memorizing K: {t['last_memorizing_K']}, first generalizing K: {t['first_generalizing_K']}, "
        f"spurious peak at K = {t['spurious_peak_K']} ({t['spurious_peak_fraction']:.3f})"
    )
    where = out / "report" / "report.html" if report else out
    typer.echo(f"results written to {where} ({result.seconds:.0f} s)")


@app.command()
def report(
    study_dir: Annotated[Path, typer.Argument(help="Study directory written by `diffmem sweep CONFIG --out DIR`.")],
) -> None:
    """One self-contained HTML page of a K sweep (phase diagram, galleries, basins, energy, curvature,
    census, two-model test, collapse levels, 2D landscape), plus the tables behind it.

    Writes DIR/report/report.html, DIR/report/*.csv, DIR/report/*.png and DIR/report/summary.json.

    Examples:
      diffmem report studies/digits
    """
    from diffmem.report.page import write_report

    try:
        path = write_report(study_dir)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"results written to {path}")


@app.command()
def status(
    study_dir: Annotated[Path, typer.Argument(help="Study directory written by `diffmem sweep`.")],
) -> None:
    """Which stages of which jobs of a study are done, running, interrupted or failed.

    Examples:
      diffmem status studies/digits
    """
    from diffmem.study.store import format_status, study_status

    try:
        rows = study_status(study_dir)
    except ValueError as e:
        _fail(str(e))
    typer.echo(format_status(rows))
    typer.echo(f"results are in {study_dir}")
