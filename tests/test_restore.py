"""restore(): selection by regex, renames, classifier skips, strictness, all-or-nothing, and the report."""

import ast
import json
import pathlib
import types

import keras
import numpy as np
import pytest

from tfl.checkpoints.restore import RestoreError, model_targets, restore


def dense_net(sizes=(5, 4, 3), classes=7, features=6, name="net") -> keras.Model:
    x = inputs = keras.Input((features,))
    for i, units in enumerate(sizes, start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"hidden{i}")(x)
    return keras.Model(inputs, keras.layers.Dense(classes, name="logits")(x), name=name)


def state_of(model, offset=1.0) -> dict:
    """The model's weights by canonical name, shifted so restored values differ from the initial ones."""
    return {name: np.array(t.variable.numpy()) + offset for name, t in model_targets(model).items()}


def values(model) -> dict:
    return {name: np.array(t.variable.numpy()) for name, t in model_targets(model).items()}


def test_everything_loads_exactly_and_the_report_counts_it():
    model = dense_net()
    source = state_of(dense_net())
    report = restore(model, source)
    assert all(np.array_equal(values(model)[name], source[name]) for name in source)
    assert sorted(t for t, _ in report.loaded) == sorted(source)
    assert report.values_loaded == model.count_params()
    assert report.summary().splitlines()[0] == (
        f"restore from a dict (dict): 8 tensors loaded ({model.count_params()} values), 0 skipped, 0 problems")
    assert json.loads(json.dumps(report.to_json()))["counts"]["loaded"] == 8


def test_nested_models_are_addressed_by_leaf_layer_names():
    backbone = dense_net(sizes=(5, 4), classes=3, name="backbone")
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(backbone(inputs)))
    source = {"hidden2/kernel": np.full((5, 4), 0.5, "float32"), "logits/bias": np.arange(3, dtype="float32")}
    report = restore(model, source, include=["hidden2/kernel", "logits/bias"])
    assert np.array_equal(backbone.get_layer("hidden2").kernel.numpy(), source["hidden2/kernel"])
    assert np.array_equal(backbone.get_layer("logits").bias.numpy(), source["logits/bias"])
    assert report.matched_by == {"hidden2/kernel": "hidden2/kernel", "logits/bias": "logits/bias"}


def test_vars_index_names_address_a_layers_weights_in_order():
    model = dense_net()
    kernel, bias = np.ones((6, 5), "float32"), np.full(5, 2.0, "float32")
    report = restore(model, {"hidden1/vars/0": kernel, "hidden1/vars/1": bias}, include=["hidden1"])
    assert np.array_equal(model.get_layer("hidden1").kernel.numpy(), kernel)
    assert np.array_equal(model.get_layer("hidden1").bias.numpy(), bias)
    assert sorted(report.loaded) == [("hidden1/bias", "hidden1/vars/1"), ("hidden1/kernel", "hidden1/vars/0")]


def test_layer_pattern_selects_all_its_weights_and_weight_pattern_only_one():
    model = dense_net()
    report = restore(model, state_of(dense_net()), include=["hidden1", "hidden2/kernel"], exclude=[], strict=False)
    assert sorted(t for t, _ in report.loaded) == ["hidden1/bias", "hidden1/kernel", "hidden2/kernel"]
    assert dict(report.skipped)["hidden2/bias"] == "not selected"


def test_first_matching_include_is_recorded_and_exclude_wins():
    report = restore(dense_net(), state_of(dense_net()), include=["hidden1", "hidden.*", ".*"], exclude=["hidden3"])
    assert report.matched_by["hidden1/kernel"] == "hidden1"
    assert report.matched_by["hidden2/kernel"] == "hidden.*"
    assert report.matched_by["logits/bias"] == ".*"
    assert dict(report.skipped) == {"hidden3/kernel": "excluded by 'hidden3'", "hidden3/bias": "excluded by 'hidden3'"}
    assert "  excluded by 'hidden3': hidden3/kernel, hidden3/bias" in report.summary()


def test_rename_rules_apply_in_order_with_groups():
    model = dense_net()
    source = {f"{k.split('/')[0]}/{'weights' if k.endswith('kernel') else 'biases'}": v
              for k, v in state_of(dense_net()).items()}
    report = restore(model, source, rename=[(r"(.*)/weights", r"\1/kernel"), (r"(.*)/biases", r"\1/bias")])
    assert np.array_equal(model.get_layer("hidden3").kernel.numpy(), source["hidden3/weights"])
    assert ("hidden3/kernel", "hidden3/weights") in report.loaded
    assert ("hidden3/weights", "hidden3/kernel") in report.renamed and len(report.renamed) == 8
    assert "  renamed: hidden1/weights -> hidden1/kernel, hidden1/biases -> hidden1/bias," in report.summary()


def test_classifier_with_another_class_count_is_skipped_and_said_so():
    model = dense_net(classes=10)
    source = state_of(dense_net(classes=1000))
    before = values(model)
    with pytest.raises(RestoreError, match=r"shape mismatch: logits/kernel \(model \(3, 10\), source \(3, 1000\)\)"):
        restore(model, source)  # restore() knows no head by name: the caller says which layers are one
    report = restore(model, source, classifier=["logits"])
    assert dict(report.classifier_skipped) == {"logits/kernel": "classifier: 1000 classes in source, 10 in model",
                                               "logits/bias": "classifier: 1000 classes in source, 10 in model"}
    assert np.array_equal(values(model)["logits/kernel"], before["logits/kernel"])
    assert np.array_equal(values(model)["hidden3/kernel"], source["hidden3/kernel"])
    assert "  classifier: 1000 classes in source, 10 in model: logits/kernel, logits/bias" in report.summary()


def test_a_source_classifier_the_model_lacks_is_explained_by_classifier_names():
    model = dense_net()
    source = {**state_of(dense_net()), "fc/kernel": np.zeros((3, 1000), "float32")}
    with pytest.raises(RestoreError, match="unexpected in source: fc/kernel"):
        restore(model, source)
    report = restore(model, source, classifier=["fc"])
    assert dict(report.classifier_skipped) == {"fc/kernel": "classifier: only in source (1000 classes)"}


def test_strict_failure_lists_every_unexplained_name_and_restores_nothing():
    model = dense_net()
    source = state_of(dense_net(sizes=(5, 4, 9)))
    source["extra/kernel"] = np.zeros(3, "float32")
    del source["hidden1/bias"]
    before = values(model)
    with pytest.raises(RestoreError) as caught:
        restore(model, source, classifier=["logits"])
    assert caught.value.report.problems() == [
        "missing in source: hidden1/bias",
        "unexpected in source: extra/kernel",
        "shape mismatch: hidden3/kernel (model (4, 3), source (4, 9))",
        "shape mismatch: hidden3/bias (model (3,), source (9,))",
    ]
    assert "\n" not in str(caught.value)
    assert all(np.array_equal(before[k], v) for k, v in values(model).items())  # hidden2 fits but stays as it was


def test_non_strict_loads_what_fits_and_reports_the_rest():
    model = dense_net()
    source = state_of(dense_net(sizes=(5, 4, 9)))
    report = restore(model, source, strict=False, classifier=["logits"])
    assert np.array_equal(model.get_layer("hidden2").kernel.numpy(), source["hidden2/kernel"])
    assert [m[0] for m in report.shape_mismatches] == ["hidden3/kernel", "hidden3/bias"]
    assert "  PROBLEM shape mismatch: hidden3/kernel (model (4, 3), source (4, 9))" in report.summary()


def test_include_none_takes_what_the_source_has():
    model = dense_net()
    source = {k: v for k, v in state_of(dense_net()).items() if k.startswith("hidden1/")}
    report = restore(model, source, include=None, classifier=["logits"])
    assert sorted(t for t, _ in report.loaded) == ["hidden1/bias", "hidden1/kernel"]
    assert "  loaded (all the source has): 2" in report.summary()
    assert dict(report.skipped)["hidden2/kernel"] == "not in source"
    assert dict(report.classifier_skipped)["logits/kernel"] == "classifier: not in source, keeps its initialisation"
    with pytest.raises(RestoreError, match="unexpected in source: other/kernel"):
        restore(model, {**source, "other/kernel": np.zeros(2, "float32")}, include=None)


def test_a_pattern_that_matches_nothing_is_a_problem():
    with pytest.raises(RestoreError, match="matches nothing: hiden1"):
        restore(dense_net(), state_of(dense_net()), include=["hiden1", "hidden.*"], strict=True)


@pytest.mark.parametrize("kwargs,needle", [
    ({"include": ["hidden["]}, "include pattern 'hidden[' is not a valid regular expression"),
    ({"exclude": ["("]}, "exclude pattern '(' is not a valid regular expression"),
    ({"rename": [(r"(.*)/w", r"\2/kernel")]}, r"rename '(.*)/w' -> '\\2/kernel': bad replacement"),
    ({"rename": [(r"(.*", "x")]}, "rename '(.*' is not a valid regular expression"),
])
def test_bad_patterns_are_value_errors_naming_them(kwargs, needle):
    with pytest.raises(ValueError) as caught:
        restore(dense_net(), {}, **kwargs)
    assert needle in str(caught.value)


def test_two_source_tensors_for_one_weight_is_an_error():
    source = {"hidden1/kernel": np.zeros((6, 5), "float32"), "hidden1/vars/0": np.ones((6, 5), "float32")}
    with pytest.raises(ValueError, match="'hidden1/kernel' and 'hidden1/vars/0' in a dict both name model weight"):
        restore(dense_net(), source, include=["hidden1/kernel"])


def test_values_are_cast_to_the_variable_dtype():
    model = dense_net()
    kernel = np.random.RandomState(0).normal(size=(6, 5))  # float64
    restore(model, {"hidden1/kernel": kernel}, include=["hidden1/kernel"])
    assert np.array_equal(model.get_layer("hidden1").kernel.numpy(), kernel.astype("float32"))


@pytest.mark.parametrize("fmt", ["keras", "keras_weights_h5", "tf2_checkpoint"])
def test_restore_from_saved_files_by_path(tmp_path, fmt):
    import tensorflow as tf

    old = dense_net()
    for t in model_targets(old).values():
        t.variable.assign(t.variable.numpy() + 1.0)
    if fmt == "keras":
        path = str(tmp_path / "old.keras")
        old.save(path)
    elif fmt == "keras_weights_h5":
        path = str(tmp_path / "old.weights.h5")
        old.save_weights(path)
    else:
        path = tf.train.Checkpoint(model=old).write(str(tmp_path / "ckpt"))
    new = dense_net(classes=3)
    report = restore(new, path, include=["hidden[12]"])
    assert report.format == fmt
    for name in ("hidden1", "hidden2"):
        for mine, theirs in zip(new.get_layer(name).weights, old.get_layer(name).weights):
            assert np.array_equal(mine.numpy(), theirs.numpy())
    assert dict(report.skipped)["hidden3/kernel"] == "not selected"


def test_a_fresh_nested_sequential_matches_its_saved_file(tmp_path):
    # Keras names a freshly built nested Sequential's weights `backbone/conv1/kernel` but the same model loaded
    # from a file `conv1/kernel`; both sides use the last two parts, so a save/restore round trip matches.
    def build():
        inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="conv1")], name="backbone")
        inputs = keras.Input((4,))
        return keras.Model(inputs, keras.layers.Dense(2, name="logits")(inner(inputs)))

    source = build()
    source.save(tmp_path / "m.keras")
    target = build()
    report = restore(target, str(tmp_path / "m.keras"))
    assert sorted(name for name, _ in report.loaded) == ["conv1/bias", "conv1/kernel", "logits/bias", "logits/kernel"]
    for a, b in zip(source.weights, target.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# --- tfl.reuse: the tfl-aware side --------------------------------------------------------------------------


def test_restore_classifier_lets_the_files_top_and_tfls_logits_differ():
    from tfl.checkpoints.read import Checkpoint
    from tfl.reuse import restore_classifier

    spec = types.SimpleNamespace(classifier=("fc",), checkpoint_mapping=None)
    source = {**state_of(dense_net(classes=1000)), "fc/kernel": np.zeros((3, 1000), "float32")}
    model = dense_net(classes=10)
    report = restore_classifier(model, spec, Checkpoint("a file", "keras", source))
    assert {name for name, _ in report.classifier_skipped} == {"logits/kernel", "logits/bias", "fc/kernel"}
    assert np.array_equal(values(model)["hidden3/kernel"], source["hidden3/kernel"])


def test_open_init_from_checks_the_patterns_before_reading_anything():
    from tfl.reuse import open_init_from

    assert open_init_from(None) is None
    with pytest.raises(ValueError, match="--reuse, --rename given without --init-from FILE"):
        open_init_from(None, reuse=["x"], rename=[("a", "b")])
    with pytest.raises(ValueError, match="--reuse-exclude '\\(' is not a valid regular expression"):
        open_init_from("no such file", exclude=["("])


# --- tfl.checkpoints is a leaf: it reads files and restores names, knowing nothing else of tfl ---------------


def _tfl_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every tfl module `path` imports, at module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package the file is in
                base = ".".join(["tfl", "checkpoints"][: 3 - node.level] + ([base] if base else []))
            # `from tfl import models` imports the module tfl.models
            found += [(node.lineno, f"{base}.{alias.name}" if base == "tfl" else base) for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((node.lineno, str(node.args[0].value)))
    return [(line, module) for line, module in found if module == "tfl" or module.startswith("tfl.")]


LEAVES = ("tfl.errors",)  # modules that import nothing of tfl (.importlinter's "leaves" contract)


def test_checkpoints_imports_no_tfl_module_outside_itself_but_the_leaves():
    package = pathlib.Path(__file__).parent.parent / "tfl" / "checkpoints"
    files = sorted(package.glob("*.py"))
    assert len(files) >= 8
    outside = [f"{path.name}:{line} imports {module}" for path in files for line, module in _tfl_imports(path)
               if module != "tfl.checkpoints" and not module.startswith("tfl.checkpoints.") and module not in LEAVES]
    assert not outside, outside
    assert any(module == "tfl.errors" for path in files for _, module in _tfl_imports(path))  # UsageError
