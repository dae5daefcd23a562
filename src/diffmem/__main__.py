"""python -m diffmem: the same command line as `diffmem`."""

from diffmem.cli.app import app

app()
