"""Suite-wide settings: no test writes the user's real boundary cache (~/.cache/tfl), and runs compute in float32
unless a test asks otherwise (--mixed-precision auto would choose by timing, and no test's result may depend on the
machine's speed).

And the tiny image folders several test files train on (tiny_runs.image_folder), written once a session (once a
pytest-xdist worker) instead of once a file. Tests only read them: a test that changes its data writes its own.
A module whose `data` is another folder overrides the `data` fixture."""

import gc

import pytest

from tiny_runs import image_folder


def pytest_configure(config):
    """Import TensorFlow, Keras and tfl where the tests run, before collecting them: tfl.cli first (it quiets
    TensorFlow's import, as the command line does). pytest-xdist's controller only hands files to the workers, so
    it skips the import (3 s before any worker starts).

    The objects these imports make (about 300,000) live as long as the worker: set them aside from the garbage
    collector. keras.backend.clear_session(), which every recipe's sweep and some tests call between runs, runs a
    full collection; without this each one walks all of them again (measured: 0.13 s a call in a fresh process,
    more in a worker that has run many tests; 0.013 s with them set aside)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    import tfl.cli  # noqa: F401
    import tfl.job  # noqa: F401
    import tfl.models  # noqa: F401
    import tfl.reporting.figures  # noqa: F401
    import tfl.training.trainer  # noqa: F401

    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True, scope="module")
def _set_aside_what_outlives_a_module():
    """The same at the start of every test file, for what the files before it left alive (function caches, the
    session's fixtures and reports): without it a worker's full collections grow with every file it has run
    (measured over the whole suite: clear_session alone took 0.32 s a call, 55 s of the workers' CPU)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TFL_CACHE_DIR", str(tmp_path_factory.mktemp("tfl-cache")))
    mp.setenv("TFL_MIXED_PRECISION", "off")
    yield
    mp.undo()


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """circle/square (bright discs vs green squares on noise), 16 train + 4 test images a class at 32 px."""
    return image_folder(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def data_3_classes(tmp_path_factory):
    """circle/square/dot (a big and a small disc), 16 train + 4 test images a class at 32 px."""
    return image_folder(tmp_path_factory.mktemp("shapes3"), classes=("circle", "square", "dot"))


@pytest.fixture(scope="session")
def data_8_a_class(tmp_path_factory):
    """circle/square, 8 train + 2 test images a class at 32 px."""
    return image_folder(tmp_path_factory.mktemp("shapes8"), per_class=8)


@pytest.fixture(scope="session")
def data_c0_to_c3(tmp_path_factory):
    """c0..c3 (c0/c2 discs, c1/c3 squares), 16 train + 4 test images a class at 32 px."""
    return image_folder(tmp_path_factory.mktemp("c0-c3"), classes=("c0", "c1", "c2", "c3"), per_class=16)


@pytest.fixture(scope="session")
def data_a_to_d(tmp_path_factory):
    """a..d (a/c discs, b/d squares), 8 train + 2 test images a class at 32 px."""
    return image_folder(tmp_path_factory.mktemp("a-d"), classes=("a", "b", "c", "d"), per_class=8)


# The files with the longest runs (from `pytest --durations`), started first: with xdist workers taking whole
# files, a long file started last decides when the suite ends. Used with --no-loadscope-reorder (Makefile).
LONGEST_FIRST = ("test_recipes_distribute.py", "test_bench.py", "test_distribute.py", "test_advise.py",
                 "test_compare.py", "test_forgetting.py", "test_docs_examples.py", "test_pretext.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
