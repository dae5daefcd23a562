"""The `diffmem` command line."""

from diffmem.cli.app import app

__all__ = ["app"]
