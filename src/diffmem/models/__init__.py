"""Trained denoiser networks: MLP and U-Net (nets.py), DDPM training with checkpoints, loading and
export (train.py), seeded sampling (sampling.py), and diffusers models trained elsewhere as a
denoiser D(x, sigma) (pretrained.py). The names a researcher uses are listed in docs/api.md, section 3.

Nothing is re-exported here: `diffmem.models.train` is both a module and its main function."""
