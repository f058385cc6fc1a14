"""dPanel's protocol package: the one contract the agent and the server both depend on.

It sits at the bottom of the layers (proto -> agent -> server, image, deploy -> tasks),
imports neither asyncssh nor anything of the agent or the server, and stays small enough
for the frozen agent on a Pi Zero 2 W. Modules:

- :mod:`.wire`: MQTT topics, their broker ACL patterns, message schemas, the decoder
- :mod:`.codes`: error codes, each with its HTTP status and CLI exit status
- :mod:`.token`: the device token format
- :mod:`.signing`: request signing (manager) and verification (agent)
- :mod:`.events`: the NDJSON exec event stream between API and CLI
- :mod:`.result`: the ``DPANEL-RESULT`` line that remote deploy steps print
- :mod:`.ports`: default port numbers
- :mod:`.util`: ``host:port`` parsing, atomic writes, jittered backoff
"""

__version__ = "0.1.0"
