"""A small stdlib HTTP client for the manager API, so that ``dpanel`` starts fast."""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from dpanel_proto.codes import ErrorCode

from .config import ServerConfig, _hostport, load_config
from .errors import DPanelError

__all__ = ["DEFAULT_CONFIG", "ApiClient", "ApiError", "find_config"]

DEFAULT_CONFIG = "/etc/dpanel/server.toml"


class ApiError(DPanelError):
    """An error the API answered with (``code`` as it sent it), or no answer at all."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        known = code in ErrorCode._value2member_map_
        super().__init__(message, code if known else None)
        self.status, self.wire_code = status, code


def find_config(path: Optional[str]) -> ServerConfig:
    """--config, else $DPANEL_CONFIG, else /etc/dpanel/server.toml."""
    return load_config(path or os.environ.get("DPANEL_CONFIG") or DEFAULT_CONFIG)


class ApiClient:
    def __init__(self, cfg: ServerConfig, timeout: float = 120) -> None:
        self.cfg = cfg
        self.host, self.port = _hostport(cfg.manager.api_listen, "manager.api_listen", 8780)
        self.timeout = timeout
        token_file = Path(cfg.manager.admin_token_file)
        try:
            self._token = token_file.read_text().strip()
        except OSError as exc:
            raise ApiError(f"cannot read the admin token {token_file}: {exc.strerror} "
                           "(run as the dpanel user or root?)") from None

    def _send(self, method: str, path: str, body: Any = None) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
        except OSError as exc:
            raise ApiError(f"manager API at http://{self.host}:{self.port} is unreachable "
                           f"({exc}); is the manager running?") from None
        if resp.status >= 400:
            raw = resp.read()
            try:
                detail = json.loads(raw)
            except ValueError:
                detail = {"error": raw.decode(errors="replace")}
            msg = detail.get("error") or detail.get("detail") or f"HTTP {resp.status}"
            if isinstance(msg, list):  # FastAPI validation errors
                msg = "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}"
                                for e in msg)
            raise ApiError(str(msg), resp.status, str(detail.get("code", "")))
        return resp

    def call(self, method: str, path: str, body: Any = None) -> Any:
        resp = self._send(method, path, body)
        return json.loads(resp.read() or b"null")

    def stream(self, method: str, path: str, body: Any = None) -> Iterator[dict[str, Any]]:
        resp = self._send(method, path, body)
        while True:
            line = resp.readline()
            if not line:
                return
            yield json.loads(line)
