"""Link profiles: one word in the agent's config picks keepalive and reconnect policy for
the kind of link a device sits on (a metered LTE contract is not a factory LAN).

What each costs on the wire and how soon a dead device shows offline is measured by
``invoke bench --wan`` (tests/bench/bench_wire.py) and tabulated in README.md. The
broker declares a silent client dead after 1.5 x its keepalive (MQTT 3.1.1 s3.1.2.10),
so the keepalive is the presence bound; an idle agent sends nothing else (its retained
status is published once per connection, never periodically).
"""

from __future__ import annotations

from typing import Any, Dict

__all__ = ["PROFILES"]

#: profile -> AgentConfig defaults. ``metered``: one PINGREQ/PINGRESP every 20 minutes,
#: ~0.6 MB/month with TLS; carrier NATs that drop idle TCP sooner cost a reconnect (a
#: resumed TLS handshake) each time, which the device notices at its next ping.
#: Reconnects start slower there (every attempt is paid for), and cap at 15 minutes.
PROFILES: Dict[str, Dict[str, Any]] = {
    "default": {},
    "metered": {"mqtt_keepalive": 1200, "reconnect_min": 5.0, "reconnect_max": 900.0,
                "tunnel_keepalive": 60},
    "lan": {"mqtt_keepalive": 20, "reconnect_min": 0.5, "reconnect_max": 30.0},
}
