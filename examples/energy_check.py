"""Do the two energies of a trained model agree? The probability-flow ODE's -log p_sigma against the line
integral of the learned score, with the two-path discrepancy (is the level a gradient field?) and the heat
equation's residual (do the levels belong to one density?), per noise level. docs/likelihood.md shows the output.

    python examples/energy_check.py runs/digits-k32 runs/digits-k512 --sigmas 0.2,0.5,1,2,4 --plot energy-check.png

For each run: `points` of its training images and `points` held-out images, each against the training mean.
"""

from __future__ import annotations

import argparse

import torch

from diffmem import level_consistency, log_likelihood, relative_energy
from diffmem.io.data import held_out_indices
from diffmem.models.train import load_denoiser


def check(run_dir: str, sigmas: list[float], points: int, seed: int) -> list[dict]:
    run = load_denoiser(run_dir)
    for p in run.model.parameters():
        p.requires_grad_(False)
    unseen = held_out_indices(len(run.data.x), run.config.n_held_out, run.config.split_seed)[:points]
    x = torch.cat([run.train_x[:points], run.data.x[unseen]])
    anchor = run.train_x.mean(0, keepdim=True)
    a, b = anchor.expand_as(x).reshape(-1, *run.event_shape), x.reshape(-1, *run.event_shape)
    sigma_max = float(run.schedule.sigmas.max())
    divergence = "exact" if x.shape[1] <= 64 else "hutchinson"
    rows = []
    for sigma in sigmas:
        with torch.no_grad():
            line = relative_energy(run.denoiser, sigma, a, b)
        lik = log_likelihood(
            run.denoiser,
            torch.cat([a[:1], b]),
            sigma,
            sigma_max=sigma_max,
            divergence=divergence,
            generator=torch.Generator().manual_seed(seed),
        )
        energy, energy_error = (v[1:] for v in lik.difference(0))
        gap = energy - line.straight.double()
        gap_error = energy_error + line.straight_error.double()
        heat = level_consistency(
            run.denoiser, sigma, a, b, divergence=divergence, generator=torch.Generator().manual_seed(seed + 1)
        )
        n = x.shape[0]
        row = {
            "run": run_dir,
            "sigma": sigma,
            "energy": float(line.straight.abs().median()),
            "gap": float(gap.abs().median()),
            "gap_error": float(gap_error.median()),
            "agree": int((gap.abs() <= gap_error).sum()),
            "discrepancy": float(line.discrepancy.median()),
            "residual": float(heat.residual.abs().median()),
            "residual_error": float(heat.error.median()),
            "scale": float(torch.maximum(heat.line.abs(), heat.heat.abs()).median()),
            "consistent": int((heat.residual.abs() <= heat.error).sum()),
            "n": n,
        }
        rows.append(row)
        print(
            "| {run} | {sigma:g} | {energy:.2f} | {gap:.2f} ({gap_error:.2g}) | {agree}/{n} | {discrepancy:.2f} "
            "| {residual:.2f} ({residual_error:.2g}) | {scale:.2f} | {consistent}/{n} |".format(**row),
            flush=True,
        )
    return rows


def plot(rows: list[dict], path: str) -> None:
    """Per run against sigma: the ODE's gap to the line integral, the two-path discrepancy and the heat residual."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-3  # nats: a median below it is drawn on the axis
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    runs = list(dict.fromkeys(r["run"] for r in rows))
    for i, run in enumerate(runs):
        mine = [r for r in rows if r["run"] == run]
        s, color, marker = [r["sigma"] for r in mine], f"C{i}", "os^D"[i % 4]
        label = run.rstrip("/").rsplit("/", 1)[-1]
        gap = [max(r["gap"], floor) for r in mine]
        low = [min(r["gap_error"], g - floor) for r, g in zip(mine, gap, strict=True)]
        axes[0].errorbar(
            s,
            gap,
            yerr=[low, [r["gap_error"] for r in mine]],
            marker=marker,
            color=color,
            capsize=3,
            label=f"{label}: ODE - line integral",
        )
        axes[0].plot(
            s,
            [max(r["discrepancy"], floor) for r in mine],
            marker=marker,
            color=color,
            linestyle=":",
            label=f"{label}: straight - arc path",
        )
        axes[1].plot(s, [r["residual"] / r["scale"] for r in mine], marker=marker, color=color, label=label)
    axes[0].set(yscale="log", ylabel="median |difference| [nats]", title="Two energies of a trained model")
    axes[0].set_ylim(floor / 2, None)
    axes[1].set(ylabel="median |residual| / its scale", ylim=(0, None), title="Heat equation between its levels")
    sigmas = sorted({r["sigma"] for r in rows})
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(sigmas, [f"{v:g}" for v in sigmas])
        ax.minorticks_off()
        ax.set_xlabel("noise level sigma")
        ax.legend(fontsize=9)
        ax.tick_params(labelsize=9)
    fig.savefig(path, dpi=120)
    print(f"figure written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories written by diffmem train")
    parser.add_argument("--sigmas", default="0.2,0.5,1,2", help="noise levels, comma-separated")
    parser.add_argument("--points", type=int, default=6, help="training and held-out images per run (each)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Hutchinson probes (D > 64)")
    parser.add_argument("--plot", help="write a figure of the gap and the residual against sigma to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "| run | sigma | median abs energy | median abs gap (error) | agree | median two-path discrepancy "
        "| median abs heat residual (error) | its scale | consistent |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for run_dir in args.runs:
        rows += check(run_dir, [float(s) for s in args.sigmas.split(",")], args.points, args.seed)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
