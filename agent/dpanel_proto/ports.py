"""Default port numbers, kept in one place so that config, tokens and docs agree."""

from __future__ import annotations

__all__ = ["API_PORT", "BROKER_PORT", "BROKER_TLS_PORT", "STACK_BROKER_PORT", "TUNNEL_PORT"]

#: The public SSH tunnel devices dial.
TUNNEL_PORT = 2220
#: MQTT over TLS for devices (IANA's secure-mqtt).
BROKER_TLS_PORT = 8883
#: Plain MQTT (the appliance keeps it on loopback, for the manager).
BROKER_PORT = 1883
#: The manager's HTTP API (loopback on the appliance).
API_PORT = 8780
#: The stack's own broker, off the standard port so that it never meets a system Mosquitto.
STACK_BROKER_PORT = 18830
