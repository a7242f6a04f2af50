"""Suite-wide settings: no test writes the user's real boundary cache (~/.cache/tfl), and runs compute in float32
unless a test asks otherwise (--mixed-precision auto would choose by timing, and no test's result may depend on the
machine's speed)."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TFL_CACHE_DIR", str(tmp_path_factory.mktemp("tfl-cache")))
    mp.setenv("TFL_MIXED_PRECISION", "off")
    yield
    mp.undo()
