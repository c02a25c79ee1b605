"""nsinitd: a trio supervisor for containers and plain processes, and its client nsinitctl."""

__version__ = "0.1.0"
