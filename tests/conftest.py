"""Suite-wide settings: no test writes the user's real boundary cache (~/.cache/tfl)."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TFL_CACHE_DIR", str(tmp_path_factory.mktemp("tfl-cache")))
    yield
    mp.undo()
