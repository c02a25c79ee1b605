"""nsinitd: a trio supervisor for containers and plain processes, and its client nsinitctl."""

from nsruntime import __version__  # nsinit, nsinitd and nsinitctl ship together: one version

__all__ = ["__version__"]
