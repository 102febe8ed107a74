"""The server's one configuration, checked in one place (before the bundle is even opened)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from runtime.errors import EdgepackError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    """host/port: where to listen (loopback unless an API key is set); api_key: required as
    `Authorization: Bearer KEY` on every /v1 route when set; threads: onnxruntime intra-op threads;
    parallel: requests decoding together (KV-cache slots); queue: requests allowed to wait for a slot
    (beyond that: 429); context: KV positions per slot (None = the model's); max_body_bytes: request cap;
    prefix_cache: reuse the KV cache of the chat template's shared system part (server.run.shared_chat_prefix)."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    threads: int | None = None
    parallel: int = 4
    queue: int = 16
    context: int | None = None
    max_body_bytes: int = 1 << 20
    prefix_cache: bool = True

    def check(self) -> None:
        if not is_loopback(self.host) and not self.api_key:
            raise EdgepackError(
                f"--host {self.host}: serving beyond this machine needs an API key "
                "(--api-key KEY or $EDGEPACK_API_KEY); refusing to start without one"
            )
        if self.api_key is not None and len(self.api_key) < 8:
            raise EdgepackError("--api-key: use at least 8 characters")
        if not 0 <= self.port <= 65535:
            raise EdgepackError(f"--port {self.port}: must be between 0 and 65535")
        if self.threads is not None and self.threads < 1:
            raise EdgepackError(f"--threads {self.threads}: must be >= 1")
        if not 1024 <= self.max_body_bytes <= 64 << 20:
            raise EdgepackError(f"--max-body {self.max_body_bytes}: must be between 1 KiB and 64 MiB")


def is_loopback(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
