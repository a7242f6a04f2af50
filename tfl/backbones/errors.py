"""Errors a backbone builder raises when it cannot do what was asked."""

from __future__ import annotations

from tfl.errors import Unavailable


class WeightsUnavailableError(Unavailable):
    """Pretrained weights could not be fetched: offline, blocked, timed out, or a corrupt download.

    The message names the backbone, the file and URL wanted, where it would be cached, and how to supply
    the file by hand; the same facts are attributes, so a CLI can print its own hint.
    """

    def __init__(
        self,
        message: str,
        *,
        backbone: str | None = None,
        file_name: str | None = None,
        url: str | None = None,
        cache_path: str | None = None,
    ):
        super().__init__(message)
        self.backbone = backbone
        self.file_name = file_name
        self.url = url
        self.cache_path = cache_path
