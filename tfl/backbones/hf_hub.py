"""`--weights hf://ORG/NAME[@REVISION]`: a timm checkpoint from the Hugging Face Hub, through `huggingface_hub`.

The real client does the work (its cache under HF_HUB_CACHE, HF_HUB_OFFLINE, tokens, revisions), so a file already
in the cache loads offline. `model.safetensors` is preferred, `pytorch_model.bin` (read without torch) is the
fallback, and the repository's `config.json` lands beside the file in the snapshot folder, where the backbone
looks for it. Without network and without the file in the cache this fails at once, naming the URL and the
`--weights PATH` fix, as Keras downloads do (tfl.backbones.download).
"""

from __future__ import annotations

import re
import socket

from tfl.backbones.download import DOWNLOAD_TIMEOUT_S
from tfl.backbones.errors import WeightsUnavailableError
from tfl.errors import UsageError

PREFIX = "hf://"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
_REPO = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


def parse(url: str) -> tuple[str, str | None]:
    """hf://ORG/NAME[@REVISION] -> (repo id, revision or None), or a UsageError naming the expected form."""
    match = _REPO.fullmatch(url[len(PREFIX):]) if url.startswith(PREFIX) else None
    if match is None:
        raise UsageError(f"--weights {url!r}: expected hf://ORG/NAME or hf://ORG/NAME@REVISION (a Hugging Face Hub "
                         "model repository, e.g. hf://timm/vit_small_patch16_224.augreg_in21k_ft_in1k)")
    return match["repo"], match["revision"]


def _reachable() -> bool:
    """Whether the Hub's host (HF_ENDPOINT) answers a TCP connect within DOWNLOAD_TIMEOUT_S; False in offline mode."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=DOWNLOAD_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def download_checkpoint(url: str, backbone: str) -> str:
    """The local path of the repository's weights file (and its config.json beside it), downloaded or cached."""
    repo, revision = parse(url)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise UsageError(f"--weights {url}: downloading from the Hugging Face Hub needs huggingface_hub; run `pip "
                         "install huggingface_hub` (or `pip install -e .[hf]`), or download the repository's "
                         "model.safetensors (and config.json) and pass --weights PATH") from None
    from huggingface_hub import constants

    page = f"{constants.ENDPOINT.rstrip('/')}/{repo}" + (f"/tree/{revision}" if revision else "")
    # huggingface_hub retries an unreachable host with backoff (about 25 s a file); when the Hub cannot be reached
    # at all, look in the cache only, so that offline either loads at once or fails at once.
    local_only = not _reachable()
    failures = []
    for file_name in WEIGHT_FILES:
        try:
            path = hf_hub_download(repo, file_name, revision=revision, local_files_only=local_only)
        except LocalEntryNotFoundError as err:  # offline (or unreachable) and not in the cache
            failures.append((file_name, err))
            continue
        except EntryNotFoundError:  # the repository has no such file: try the next kind
            continue
        except (OSError, ValueError) as err:  # no such repository or revision, HTTP errors, bad ids
            raise WeightsUnavailableError(
                f"backbone {backbone!r}: could not fetch {file_name} of {page} ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). Fix: download it (and config.json) from {page} "
                "and pass --weights PATH", backbone=backbone, file_name=file_name, url=page) from err
        try:
            # optional: the checkpoint's width and pooling, beside the weights in the snapshot folder
            hf_hub_download(repo, CONFIG_FILE, revision=revision, local_files_only=local_only)
        except (EntryNotFoundError, OSError):
            pass
        return path
    if failures:
        file_name, err = failures[0]
        raise WeightsUnavailableError(
            f"backbone {backbone!r}: {page} is not reachable and {' / '.join(WEIGHT_FILES)} of {repo} is not in the "
            f"Hugging Face cache ({type(err).__name__}). Fix: download {file_name} and config.json from {page} on a "
            "machine with internet and pass --weights PATH (or fill the cache there: HF_HUB_CACHE)",
            backbone=backbone, file_name=file_name, url=page) from failures[0][1]
    raise UsageError(f"--weights {url}: {page} has neither {' nor '.join(WEIGHT_FILES)}; pass a timm checkpoint "
                     "repository, or --weights PATH")
