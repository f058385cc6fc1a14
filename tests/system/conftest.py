"""Fixtures for the system tests; each suite keeps its own in a module imported here."""

from appliance_fixtures import appliance, device, fresh_guest, tls_port_squatter  # noqa: F401
