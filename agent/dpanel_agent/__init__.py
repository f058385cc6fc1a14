"""dpanel-tunnel: the device agent of dPanel Edge."""

__version__ = "0.1.0"
