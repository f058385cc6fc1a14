"""dpanel-tunnel: the device agent of dPanel Edge."""

from dpanel_proto import __version__

__all__ = ["__version__"]
