"""The one exception type the image tools raise for bad input or failed steps."""

from __future__ import annotations

__all__ = ["ImageError"]


class ImageError(Exception):
    """A clear, user-facing error: names the file, field or device that is wrong."""
