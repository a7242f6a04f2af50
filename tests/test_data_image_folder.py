"""Image-folder datasets: layout, class checks, bad files, the seeded stratified split, fingerprints."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from tfl.data import DataError, load_dataset


def make_folder(root, layout: dict[str, dict[str, int]], size=(6, 4)) -> dict[str, list[str]]:
    """root/<split>/<class>/<i>.png; pixel (0, 0) holds a unique id so tests can tell images apart."""
    paths: dict[str, list[str]] = {}
    uid = 0
    for split, classes in layout.items():
        for cls, count in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.zeros((size[1], size[0], 3), np.uint8)
                pixels[0, 0] = (uid % 256, uid // 256, 7)
                path = folder / f"{i:03d}.png"
                Image.fromarray(pixels).save(path)
                paths.setdefault(split, []).append(str(path))
                uid += 1
    return paths


def ids(ds) -> list[int]:
    return [int(img[0, 0, 0]) + 256 * int(img[0, 0, 1]) for img, _ in ds.as_numpy_iterator()]


def quiet(*_args):
    pass


def test_derived_val_is_stratified_disjoint_and_seeded(tmp_path):
    make_folder(tmp_path, {"train": {"cat": 20, "dog": 10, "emu": 3}})
    splits = load_dataset(str(tmp_path), val_split=0.2, seed=1, log=quiet)
    assert splits.class_names == ["cat", "dog", "emu"]
    assert splits.num_examples == {"train": 26, "val": 7, "test": 0}  # 4 + 2 + max(1, round(0.6))
    assert splits.test is None and splits.native_size == (4, 6)
    val_labels = [int(label) for _, label in splits.val.as_numpy_iterator()]
    assert sorted(set(val_labels)) == [0, 1, 2]
    train_ids, val_ids = ids(splits.train), ids(splits.val)
    assert not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == list(range(33))

    again = load_dataset(str(tmp_path), val_split=0.2, seed=1, log=quiet)
    assert ids(again.val) == val_ids and ids(again.train) == train_ids
    assert again.fingerprint == splits.fingerprint
    other = load_dataset(str(tmp_path), val_split=0.2, seed=2, log=quiet)
    assert set(ids(other.val)) != set(val_ids)
    assert other.fingerprint != splits.fingerprint


def test_train_order_mixes_classes(tmp_path):
    # A class-sorted order would defeat a bounded shuffle buffer.
    make_folder(tmp_path, {"train": {"a": 30, "b": 30}})
    labels = [int(label) for _, label in load_dataset(str(tmp_path), log=quiet).train.as_numpy_iterator()]
    assert labels != sorted(labels)


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_val_and_test_folders_are_used(tmp_path, val_name):
    make_folder(tmp_path, {"train": {"a": 3, "b": 2}, val_name: {"a": 1, "b": 2}, "test": {"a": 2, "b": 2}})
    splits = load_dataset(str(tmp_path), log=quiet)
    assert splits.num_examples == {"train": 5, "val": 3, "test": 4}
    assert sorted(ids(splits.val)) == [5, 6, 7]
    assert sorted(ids(splits.test)) == [8, 9, 10, 11]
    assert [int(label) for _, label in splits.test.as_numpy_iterator()] == [0, 0, 1, 1]


def test_class_mismatch_names_missing_and_extra_classes(tmp_path):
    make_folder(tmp_path, {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "bird": 1}})
    with pytest.raises(DataError) as error:
        load_dataset(str(tmp_path), log=quiet)
    message = str(error.value)
    assert "lacks class folder(s) that train has: dog" in message
    assert "has class folder(s) that train lacks: bird" in message
    assert str(tmp_path / "val") in message


def test_bad_files_are_all_listed_then_skipped_on_request(tmp_path):
    good = make_folder(tmp_path, {"train": {"a": 4, "b": 4}, "test": {"a": 1, "b": 1}})
    text = tmp_path / "train" / "a" / "notes.jpg"
    text.write_text("this is text, not a JPEG")
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    cut = tmp_path / "test" / "b" / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    other = tmp_path / "train" / "b" / "readme.txt"
    other.write_text("not an image type")
    (tmp_path / "train" / "b" / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored, not bad
    bad = sorted(str(p) for p in (text, cut, other))

    with pytest.raises(DataError) as error:
        load_dataset(str(tmp_path), log=quiet)
    message = str(error.value)
    assert "3 file(s)" in message and "--skip-bad-images" in message and "skip_bad_images" not in message
    listed = sorted(line.split("  (")[0].strip() for line in message.splitlines() if line.startswith("  /"))
    assert listed == bad
    assert not any(path in message for paths in good.values() for path in paths)

    logged = []
    splits = load_dataset(str(tmp_path), skip_bad_images=True, log=logged.append)
    assert splits.num_examples["train"] + splits.num_examples["val"] == 8
    assert splits.num_examples["test"] == 2
    assert len(list(splits.train.as_numpy_iterator())) == splits.num_examples["train"]
    warning = next(line for line in logged if "skipping 3" in line)
    assert all(path in warning for path in bad)


def test_bad_file_list_is_capped(tmp_path):
    make_folder(tmp_path, {"train": {"a": 2}})
    for i in range(25):
        (tmp_path / "train" / "a" / f"junk{i:02d}.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"25 file\(s\)[\s\S]*and 5 more"):
        load_dataset(str(tmp_path), log=quiet)


def test_mixed_sizes_have_no_native_size_and_decode_at_their_own_size(tmp_path):
    make_folder(tmp_path, {"train": {"a": 2, "b": 2}})
    Image.new("RGB", (9, 3), (1, 2, 3)).save(tmp_path / "train" / "a" / "wide.jpg")
    splits = load_dataset(str(tmp_path), log=quiet)
    assert splits.native_size is None
    shapes = {img.shape for img, _ in splits.train.concatenate(splits.val).as_numpy_iterator()}
    assert shapes == {(4, 6, 3), (3, 9, 3)}


@pytest.mark.parametrize(
    "layout, expected",
    [
        ({"train": {"a": 2, "b": 0}}, r"has no files[\s\S]*train/b"),
        ({"train": {}}, "has no class folders"),
        ({"valid": {"a": 1}}, "has no train/ folder"),
        ({"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 0}}, r"has no files[\s\S]*val/b"),
    ],
)
def test_layout_problems_are_data_errors(tmp_path, layout, expected):
    make_folder(tmp_path, layout)
    for split, classes in layout.items():
        (tmp_path / split).mkdir(exist_ok=True)
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
    with pytest.raises(DataError, match=expected):
        load_dataset(str(tmp_path), log=quiet)


def test_class_folders_at_the_root_get_a_hint(tmp_path):
    make_folder(tmp_path, {"cats": {"x": 0}})
    Image.new("RGB", (4, 4)).save(tmp_path / "cats" / "one.png")
    with pytest.raises(DataError, match="move them into ROOT/train/"):
        load_dataset(str(tmp_path), log=quiet)


def test_two_val_folders_are_ambiguous(tmp_path):
    make_folder(tmp_path, {"train": {"a": 2}, "val": {"a": 1}, "validation": {"a": 1}})
    with pytest.raises(DataError, match="more than one val folder"):
        load_dataset(str(tmp_path), log=quiet)


def test_fingerprint_follows_file_changes_only(tmp_path):
    paths = make_folder(tmp_path, {"train": {"a": 3, "b": 3}})
    first = load_dataset(str(tmp_path), log=quiet).fingerprint
    assert load_dataset(str(tmp_path), log=quiet).fingerprint == first
    stat = os.stat(paths["train"][0])
    os.utime(paths["train"][0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_dataset(str(tmp_path), log=quiet).fingerprint == first  # by content: a touch changes nothing
    Image.new("RGB", (6, 4), (9, 9, 9)).save(paths["train"][0])
    os.utime(paths["train"][0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    repainted = load_dataset(str(tmp_path), log=quiet).fingerprint
    assert repainted != first  # new pixels under the old mtime
    Image.new("RGB", (6, 4)).save(tmp_path / "train" / "a" / "new.png")
    assert load_dataset(str(tmp_path), log=quiet).fingerprint not in (first, repainted)


@pytest.mark.parametrize("val_split", [0, 1, 1.5, -0.1])
def test_bad_val_split_is_rejected(tmp_path, val_split):
    make_folder(tmp_path, {"train": {"a": 2}})
    with pytest.raises(DataError, match="val_split"):
        load_dataset(str(tmp_path), val_split=val_split, log=quiet)
