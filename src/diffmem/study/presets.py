"""Studies with a single purpose, as configurations of the one study runner (run_study):

- memorization: one MLP per nested K, sampled and classified; the memorized fraction against K is
  the phase table's f_M (a sample is memorized when its nearest training example is within delta_m,
  calibrated as the 5% quantile of held-out images' nearest-training distances; SCIENCE.md §5);
- two-model: two MLPs per K on disjoint training sets, sampled from the same noise; their agreement
  against K (SCIENCE.md §6).

Both write the study layout of diffmem.study.runner, resume like any study, and load back with
`diffmem report` / `diffmem status`.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffmem.study.config import StudyConfig

MEMORIZATION_KS = (8, 32, 128, 512, 1500)
TWO_MODEL_KS = (8, 32, 128, 512)


def _base(
    name: str,
    *,
    ks: Sequence[int],
    data: str,
    root: str | None,
    n_held_out: int,
    steps: int,
    hidden: int,
    depth: int,
    device: str,
) -> dict:
    return {
        "name": name,
        "data": {"name": data, "options": {"root": root} if root else {}},
        "ks": sorted(set(int(k) for k in ks)),
        "n_held_out": n_held_out,
        "network": {"kind": "mlp", "mlp": {"hidden": hidden, "depth": depth}},
        "train": {"steps": steps, "lr_schedule": "cosine", "warmup_steps": 200},
        "device": device,
    }


def memorization_config(
    *,
    ks: Sequence[int] = MEMORIZATION_KS,
    data: str = "digits",
    root: str | None = None,
    n_held_out: int = 297,
    steps: int = 6000,
    hidden: int = 512,
    depth: int = 4,
    n_samples: int = 512,
    device: str = "cpu",
) -> StudyConfig:
    """The memorization study: sample, distances and classify for each nested K (run 'phase')."""
    d = _base(
        "memorization",
        ks=ks,
        data=data,
        root=root,
        n_held_out=n_held_out,
        steps=steps,
        hidden=hidden,
        depth=depth,
        device=device,
    )
    return StudyConfig.from_dict({**d, "run": "phase", "sampling": {"n_samples": n_samples}})


def two_model_config(
    *,
    ks: Sequence[int] = TWO_MODEL_KS,
    data: str = "digits",
    root: str | None = None,
    n_held_out: int = 297,
    steps: int = 6000,
    hidden: int = 512,
    depth: int = 4,
    n_samples: int = 256,
    delta: float | None = None,
    device: str = "cpu",
) -> StudyConfig:
    """The two-model test alone (run 'two_model'); delta None calibrates it from held-out images."""
    d = _base(
        "two-model",
        ks=ks,
        data=data,
        root=root,
        n_held_out=n_held_out,
        steps=steps,
        hidden=hidden,
        depth=depth,
        device=device,
    )
    two = {"enabled": True, "n_samples": n_samples, "delta": delta}
    return StudyConfig.from_dict({**d, "run": "two_model", "analyses": {"two_model": two}})


__all__ = ["memorization_config", "two_model_config"]
