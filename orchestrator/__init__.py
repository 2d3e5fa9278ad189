"""Launch side: CLI, local launcher, supervision, checkpoint tools. Imports ``workers``, never the reverse."""

from workers import __version__

__all__ = ["__version__"]
