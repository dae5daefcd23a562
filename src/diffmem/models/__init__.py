"""Trained denoisers: networks (MLP, U-Net), DDPM training with checkpoints, sampling of trained runs."""
