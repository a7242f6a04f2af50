"""Every registered backbone keeps the stage contract that freezing, `tfl inspect` and --freeze-up-to rely on.

On the classifier tfl builds (weights left uninitialised, the smallest input Keras accepts, so all of them build
in under a minute): each backbone layer with weights is in exactly one canonical stage, stages follow the layer order, only a
trailing `head` may be empty, and freezing up to a stage freezes exactly that stage and the ones before it. And
its default --freeze-up-to (BackboneSpec.default_freeze_up_to) freezes some stages, trains the ones above, and is
the choice of the rule in scripts/freeze_defaults.py that chose it.
"""

from __future__ import annotations


import keras
import pytest

from tfl import freezing, models
from tfl.backbones import registry
from tiny_runs import freeze_defaults_rule

SPECS = registry.all_specs()


RULE = freeze_defaults_rule()


@pytest.fixture(autouse=True)
def fresh_session():
    # The contract is about names and shapes: models are built in a StatelessScope that never creates or fills
    # the variables (~1.5G parameters in all), and make_plan counts parameters from shapes.
    yield
    keras.backend.clear_session()  # also drops Keras' list of uninitialised variables


def build(spec) -> keras.Model:
    # The smallest input Keras accepts: 32, but 75 for Inception (71 for Xception).
    with keras.StatelessScope(initialize_variables=False):
        try:
            return models.build_classifier(spec.name, 3, 32, "none")
        except ValueError as err:
            if "Input size must be at least" not in str(err):
                raise
            return models.build_classifier(spec.name, 3, 75, "none")


@pytest.mark.parametrize("spec", SPECS, ids=[spec.name for spec in SPECS])
def test_stages_cover_the_backbone_in_order_freeze_as_prefixes_and_the_default_trains_the_top(spec):
    model = build(spec)
    layers = models.backbone_of(model).layers
    weighted = [layer.name for layer in layers if layer.weights]

    matches = {name: [s.name for s in spec.stages if s.matches(name)] for name in weighted}
    bad = {name: stages for name, stages in matches.items() if len(stages) != 1}
    assert not bad, f"weighted layers in no stage or in several: {dict(list(bad.items())[:5])}"

    staged = [(layer.name, spec.stage_of(layer.name)) for layer in layers if spec.stage_of(layer.name)]
    index = {stage: i for i, stage in enumerate(spec.stage_names)}
    backwards = [(a, b) for (a, sa), (b, sb) in zip(staged, staged[1:]) if index[sb] < index[sa]]
    assert not backwards, f"a layer of an earlier stage follows a later one: {backwards[:5]}"

    members = {stage: [name for name, s in staged if s == stage] for stage in spec.stage_names}
    empty = [stage for stage in spec.stage_names if not members[stage]]
    assert not empty or empty == spec.stage_names[-1:] == ["head"], f"empty stages: {empty}"

    for stage in spec.stage_names:
        plan = freezing.make_plan(spec, model, stage)
        frozen = {p.name for p in plan.layers if p.frozen and p.params}
        expected = {name for name in weighted if index[spec.stage_of(name)] <= index[stage]}
        assert frozen == expected, (f"--freeze-up-to {stage}: frozen but later: {sorted(frozen - expected)[:5]}, "
                                    f"earlier but trainable: {sorted(expected - frozen)[:5]}")

    check_default_plan(spec, freezing.make_plan(spec, model, "default"))


def check_default_plan(spec, plan):
    assert plan.freeze_up_to == spec.default_freeze_up_to  # the plan (and freeze_plan.json) records the stage
    backbone = [layer for layer in plan.layers if layer.stage != freezing.CLASSIFIER_STAGE and layer.params]
    frozen = [s for s in spec.stage_names if any(l.stage == s for l in backbone)
              and all(l.frozen for l in backbone if l.stage == s)]
    trained = [s for s in spec.stage_names if any(l.stage == s and not l.frozen for l in backbone)]
    assert frozen and trained, f"frozen stages {frozen}, trained stages {trained}"
    index = spec.stage_names.index
    assert max(map(index, frozen)) < min(map(index, trained))  # a prefix: stage 2 trains the top
    assert plan.boundary() is not None

    totals = {s: sum(l.params for l in backbone if l.stage == s) for s in spec.stage_names}
    assert sum(totals.values()) == sum(l.params for l in backbone)  # every weighted layer is in a stage
    share = sum(l.params for l in backbone if not l.frozen) / sum(totals.values())
    assert share == pytest.approx(RULE.trainable_shares(totals)[spec.default_freeze_up_to])
    assert RULE.PINNED.get(spec.name, RULE.choose(totals)) == spec.default_freeze_up_to, f"trainable share {share:.2f}"
