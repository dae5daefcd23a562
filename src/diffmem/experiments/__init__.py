"""Experiments built on the layers below: census studies and the circle toy, the classical
Hopfield reference, and the CPU-scale demo; the `diffmem` commands run them (README.md, "Commands")."""
