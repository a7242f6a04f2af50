"""A quick reachability probe for download hosts, so an offline download fails in seconds.

tfds retries an unreachable host ten times with exponential backoff (about 3.5 minutes) before giving up.
"""

from __future__ import annotations

import socket
import threading
import urllib.parse
import urllib.request

PROBE_TIMEOUT_S = 5.0


def unreachable(urls: list[str], timeout: float = PROBE_TIMEOUT_S) -> list[str]:
    """The `host:port` endpoints (the proxy's, when one is configured) that do not accept a TCP connection."""
    endpoints = list(dict.fromkeys(_endpoint(url) for url in urls))
    results: dict[str, bool] = {}
    threads = [threading.Thread(target=_probe, args=(e, timeout, results), daemon=True) for e in endpoints]
    for thread in threads:
        thread.start()
    for thread in threads:
        # create_connection's timeout does not cover DNS; a daemon thread still stuck in getaddrinfo
        # counts as unreachable and is left to finish on its own.
        thread.join(timeout + 1.0)
    return [e for e in endpoints if not results.get(e, False)]


def _endpoint(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def _probe(endpoint: str, timeout: float, results: dict[str, bool]) -> None:
    host, port = endpoint.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        results[endpoint] = True
    except OSError:
        results[endpoint] = False
