"""Pretrained-weight downloads that fail fast and say what to do when there is no network."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

from tfl.backbones.errors import WeightsUnavailableError

# Bounds each connect/read of a weight download. Offline here DNS fails in milliseconds, but behind a
# firewall that drops packets an unbounded urlopen would wait for the OS TCP timeout (minutes).
DOWNLOAD_TIMEOUT_S = 20.0
_DOWNLOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def weights_download_errors(backbone: str):
    """Turn a failure of Keras' weight download into WeightsUnavailableError, with bounded socket waits.

    Keras Applications (and tfl's torchvision ResNets) fetch weights through keras.src.utils.file_utils.get_file
    (looked up at call time), so wrapping it here sees the exact file name, URL and cache folder Keras asked for, and
    only download failures (not Keras' argument checks) become WeightsUnavailableError.
    """
    from keras.src.backend import config
    from keras.src.utils import file_utils

    keras_get_file = file_utils.get_file

    def get_file(fname=None, origin=None, *args, **kwargs):
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            return keras_get_file(fname, origin, *args, **kwargs)
        except Exception as err:
            file_name = fname or os.path.basename(str(origin))
            cache_dir = os.path.expanduser(kwargs.get("cache_dir") or config.keras_home())
            if not os.access(cache_dir, os.W_OK):  # get_file's own fallback
                cache_dir = os.path.join("/tmp", ".keras")
            cache_path = os.path.join(cache_dir, kwargs.get("cache_subdir", "datasets"), file_name)
            root = err  # Keras re-raises as a bare Exception; name the failure underneath
            for _ in range(8):
                root = root.__cause__ or root.__context__ or root
            raise WeightsUnavailableError(
                f"backbone {backbone!r}: Keras could not download its ImageNet weights {file_name!r} from "
                f"{origin} ({type(root).__name__}: {root}). Fix: download it on a machine with internet and "
                f"pass --weights PATH (or copy it to {cache_path}, where Keras looks before downloading).",
                backbone=backbone,
                file_name=file_name,
                url=origin,
                cache_path=cache_path,
            ) from err
        finally:
            socket.setdefaulttimeout(previous_timeout)

    with _DOWNLOAD_LOCK:
        file_utils.get_file = get_file
        try:
            yield
        finally:
            file_utils.get_file = keras_get_file
