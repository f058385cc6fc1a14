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

#: profile -> AgentConfig defaults. ``metered``: one PINGREQ/PINGRESP every 25 minutes
#: (under the 30 minutes many carrier NATs keep an idle TCP mapping), well under 1 MB a
#: month with TLS; a NAT that drops idle TCP sooner costs a reconnect (a resumed TLS
#: handshake) each time, noticed at the next ping: the keepalive does not adapt by
#: itself. Reconnects start slower there (every attempt is paid for), cap at 15 minutes.
PROFILES: Dict[str, Dict[str, Any]] = {
    "default": {},
    "metered": {"mqtt_keepalive": 1500, "reconnect_min": 5.0, "reconnect_max": 900.0,
                "tunnel_keepalive": 60},
    "lan": {"mqtt_keepalive": 20, "reconnect_min": 0.5, "reconnect_max": 30.0},
}
