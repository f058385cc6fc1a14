"""dPanel Edge server side: public tunnel, manager, broker config, CLI and HTTP API."""

from dpanel_proto import __version__

__all__ = ["__version__"]
