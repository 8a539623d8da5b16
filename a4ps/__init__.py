"""A4PS / BAT OS: a persistent, local-first, self-improving multi-agent living image.

Importing the package does no work: every part is built explicitly by
:class:`a4ps.system.System` from :class:`a4ps.config.Settings`.
"""
__version__ = "0.1.0"
