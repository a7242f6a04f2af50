"""Freeze plans: which layers train, chosen by stage, layer name or regex, applied by flags or a gradient stop.

A plan is computed from the backbone spec and the model (`make_plan`), printed by `tfl inspect`, and applied
by `training_graph` in mode "trainable" (layer flags) or "stop_gradient" (a gradient stop at the boundary).

Rules, in order:
1. `freeze_up_to` X freezes every layer from the input through the last layer of X (a canonical stage, a
   real layer name, or a layer-name prefix), inclusive. "default" means the backbone's own depth
   (BackboneSpec.default_freeze_up_to); None or "none" freezes nothing (`resolve_freeze_up_to`).
2. `--freeze R` / `--unfreeze R` rules (regex fullmatch over layer names) are applied in the order given;
   for each layer the last rule that matches wins.
BatchNormalization: a frozen BN layer always runs in inference mode and its statistics never change. BN layers
above the boundary follow `train_bn` (default False: they stay frozen too, as the Keras fine-tuning guide
recommends, because small fine-tuning batches give poor batch statistics).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable, Sequence

import keras

from tfl import adapters
from tfl.backbones.spec import CANONICAL_STAGE, BackboneSpec
from tfl.errors import UsageError
from tfl.models import INPUT, NoSingleCut, backbone_of, head_layers, preprocess_layer, submodel
from tfl.options import FREEZE_DEFAULT, FREEZE_NONE
from tfl.options import FREEZE_MODES as MODES

CLASSIFIER_STAGE = "classifier"  # the new head tfl adds (not the backbone's own `head` stage)


@dataclasses.dataclass
class LayerPlan:
    name: str
    stage: str
    frozen: bool  # below the freeze boundary or frozen by a rule: the layer is out of training
    params: int  # the layer's own weights (an adapter's are adapter_params)
    is_batch_norm: bool = False
    # With --adapter lora (tfl.adapters) a layer above the boundary keeps its own weights frozen: "lora" trains
    # its adapter's adapter_params weights; base_frozen: a layer with no adapter trains nothing (batch norm: only
    # with --train-bn, which the plan's counts leave out).
    adapter: str | None = None
    adapter_params: int = 0
    base_frozen: bool = False

    @property
    def trained(self) -> int:
        """The weights this layer trains when the plan is applied."""
        if self.frozen:
            return 0
        if self.adapter:
            return self.adapter_params
        return 0 if self.base_frozen else self.params

    @property
    def weights_frozen(self) -> bool:
        """Whether the layer's own weights stay as loaded."""
        return self.frozen or self.base_frozen or bool(self.adapter)


@dataclasses.dataclass
class FreezePlan:
    backbone: str
    layers: list[LayerPlan]  # backbone layers in model order, then the classifier layers
    freeze_up_to: str | None = None
    rules: tuple[tuple[str, str], ...] = ()

    @property
    def trainable_params(self) -> int:
        return sum(layer.trained for layer in self.layers)

    @property
    def frozen_params(self) -> int:
        return sum(layer.params for layer in self.layers if layer.weights_frozen)

    @property
    def adapter(self) -> str | None:
        return next((layer.adapter for layer in self.layers if layer.adapter), None)

    def open_backbone_layers(self) -> list[str]:
        """The backbone layers above the freeze boundary (not frozen), in model order."""
        return [l.name for l in self.layers if not l.frozen and l.stage != CLASSIFIER_STAGE]

    def frozen_names(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.frozen]

    def boundary(self) -> str | None:
        """The last layer of the frozen prefix, if the frozen set is a prefix of the backbone (else None).

        Layers without weights don't break the prefix shape: freezing them means nothing.
        """
        last_frozen = None
        for i, layer in enumerate(self.layers):
            if layer.frozen and layer.params:
                last_frozen = i
        if last_frozen is None:
            return None
        for layer in self.layers[: last_frozen + 1]:
            if layer.params and not layer.frozen:
                return None
        if self.layers[last_frozen].stage == CLASSIFIER_STAGE:
            return None
        # Extend over trailing weightless layers of the frozen run (activation, pooling) to a clean cut.
        end = last_frozen
        while (end + 1 < len(self.layers) and self.layers[end + 1].frozen and not self.layers[end + 1].params
               and self.layers[end + 1].stage != CLASSIFIER_STAGE):
            end += 1
        return self.layers[end].name

    def to_json(self) -> dict:
        return {
            "backbone": self.backbone,
            "freeze_up_to": self.freeze_up_to,
            "rules": [list(rule) for rule in self.rules],
            "layers": [_layer_json(l) for l in self.layers],
            "trainable_params": self.trainable_params,
            "frozen_params": self.frozen_params,
            **({"adapter": self.adapter} if self.adapter else {}),
        }


def _layer_json(layer: LayerPlan) -> dict:
    """"frozen": the layer's own weights stay as loaded; with an adapter, "adapter" and "adapter_params" say what
    trains instead."""
    entry = {"name": layer.name, "stage": layer.stage, "frozen": layer.weights_frozen, "params": layer.params}
    if layer.adapter:
        entry.update(adapter=layer.adapter, adapter_params=layer.adapter_params)
    return entry


def _param_count(layer) -> int:
    return sum(math.prod(w.shape) for w in adapters.base_weights(layer))  # from shapes: reads no variable


def _adapter_count(layer) -> int:
    return sum(math.prod(w.shape) for w in adapters.adapter_weights(layer))


def resolve_freeze_up_to(spec: BackboneSpec, value: str | None) -> str | None:
    """What a --freeze-up-to value means for this backbone, before any model is built: "default" becomes the
    spec's default stage, None / "" / "none" become None (nothing frozen), a canonical stage name the backbone
    lacks is refused; anything else (a stage, a layer name or prefix, "auto") passes on as given."""
    if value == FREEZE_DEFAULT:
        return spec.default_freeze_up_to
    if value in (None, "", FREEZE_NONE):
        return None
    check_stage_name(spec, value)
    return value


def check_stage_name(spec: BackboneSpec, value: str, layer_names: Sequence[str] = ()) -> None:
    """Refuse a canonical stage name (stem, blockN, head) that is not one of this backbone's stages, even where
    it prefixes layer names (Xception's own block5_* layers are inside its canonical block3)."""
    if CANONICAL_STAGE.fullmatch(value) and value not in spec.stage_names:
        prefixed = any(name.startswith(value + "_") for name in layer_names)
        raise UsageError(
            f"--freeze-up-to {value!r} is not a stage of {spec.name}; its stages are: "
            f"{', '.join(spec.stage_names)} (default {spec.default_freeze_up_to})"
            + (f". For its layers named {value}_*, pass the prefix {value + '_'!r}" if prefixed else "")
        )


def resolve_up_to(spec: BackboneSpec, layer_names: Sequence[str], value: str) -> int:
    """Index (in layer_names) of the last layer that `value` names: a stage, a layer, or a name prefix."""
    if value not in layer_names:
        check_stage_name(spec, value, layer_names)
    if value in spec.stage_names:
        members = [i for i, name in enumerate(layer_names) if spec.stage_of(name) == value]
        if members:
            return members[-1]
        # An empty stage (some backbones have no `head` layers) ends where the previous stage ends.
        position = spec.stage_names.index(value)
        earlier = [i for i, name in enumerate(layer_names) if spec.stage_of(name) in spec.stage_names[:position]]
        return earlier[-1] if earlier else -1
    if value in layer_names:
        return list(layer_names).index(value)
    prefixed = [i for i, name in enumerate(layer_names) if name.startswith(value)]
    if prefixed:
        return prefixed[-1]
    raise UsageError(
        f"--freeze-up-to {value!r} is not a stage, layer name or layer-name prefix of {spec.name}; "
        f"stages are: {', '.join(spec.stage_names)} (see `tfl inspect {spec.name}` for layer names)"
    )


def compile_rules(rules: Iterable[tuple[str, str]]) -> list[tuple[str, re.Pattern]]:
    compiled = []
    for action, pattern in rules:
        if action not in ("freeze", "unfreeze"):
            raise UsageError(f"unknown rule {action!r}; use 'freeze' or 'unfreeze'")
        try:
            compiled.append((action, re.compile(pattern)))
        except re.error as err:
            raise UsageError(f"--{action} {pattern!r} is not a valid regular expression: {err}") from None
    return compiled


def make_plan(
    spec: BackboneSpec,
    model: keras.Model,
    freeze_up_to: str | None = None,
    rules: Sequence[tuple[str, str]] = (),
) -> FreezePlan:
    """The plan for a classifier built by tfl.models.build_classifier (backbone nested inside).

    freeze_up_to: see resolve_freeze_up_to ("default": the backbone's default stage; None or "none": nothing);
    the plan records the resolved value. A model with LoRA adapters (tfl.adapters.add_lora) gets the adapter plan:
    above the boundary only the adapters train, the backbone's own weights (batch norm aside: --train-bn) stay."""
    backbone = backbone_of(model)
    lora = any(adapters.has_adapter(layer) for layer in backbone.layers)
    names = [layer.name for layer in backbone.layers]
    freeze_up_to = resolve_freeze_up_to(spec, freeze_up_to)
    up_to = resolve_up_to(spec, names, freeze_up_to) if freeze_up_to else -1
    plans = []
    for i, layer in enumerate(backbone.layers):
        stage = spec.stage_of(layer.name) or "unstaged"
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        adapter = adapters.LORA if adapters.has_adapter(layer) else None
        plans.append(
            LayerPlan(layer.name, stage, i <= up_to, _param_count(layer), is_bn, adapter, _adapter_count(layer),
                      base_frozen=lora and not adapter)
        )
    for layer in head_layers(model):
        plans.append(LayerPlan(layer.name, CLASSIFIER_STAGE, False, _param_count(layer)))
    compiled = compile_rules(rules)
    for plan in plans:
        for action, pattern in compiled:
            if pattern.fullmatch(plan.name):
                plan.frozen = action == "freeze"
    return FreezePlan(spec.name, plans, freeze_up_to, tuple(tuple(r) for r in rules))


def leaf_layers(model: keras.Model) -> list:
    """The layers that own weights, in order, descending into nested models."""
    if not isinstance(model, keras.Model):
        return [model]
    return [leaf for layer in model.layers for leaf in leaf_layers(layer)]


def freeze_layers(model: keras.Model, rules: Sequence[tuple[str, str]]) -> list[str]:
    """Freeze or unfreeze the leaf layers of any Keras model (not only tfl classifiers) by regex.

    rules: [("freeze" | "unfreeze", regex)], fullmatch over layer names, the last matching rule wins, layers no
    rule matches keep their flag — e.g. [("freeze", "hidden[12]")] for a TF1-style dense net. A rule matching
    no layer is an error, since a typo would otherwise silently train everything. Returns the frozen names.
    """
    leaves = leaf_layers(model)
    compiled = compile_rules(rules)
    for action, pattern in compiled:
        if not any(pattern.fullmatch(layer.name) for layer in leaves):
            raise UsageError(f"--{action} {pattern.pattern!r} matches no layer of {model.name}; its layers are: "
                             + ", ".join(layer.name for layer in leaves))
    for layer in leaves:
        for action, pattern in compiled:
            if pattern.fullmatch(layer.name):
                layer.trainable = action == "unfreeze"
    return [layer.name for layer in leaves if not layer.trainable]


def head_only_plan(plan: FreezePlan) -> FreezePlan:
    """Stage 1 of two-stage training: the whole backbone frozen, the classifier as the plan says."""
    layers = [
        dataclasses.replace(l, frozen=True if l.stage != CLASSIFIER_STAGE else l.frozen) for l in plan.layers
    ]
    return FreezePlan(plan.backbone, layers, "backbone", plan.rules)


def _bn_frozen(layer_plan: LayerPlan, train_bn: bool) -> bool:
    """Batch norm above the boundary trains only with --train-bn, also in a LoRA plan (base_frozen)."""
    if layer_plan.is_batch_norm:
        return layer_plan.frozen or not train_bn
    return layer_plan.frozen or layer_plan.base_frozen


@keras.saving.register_keras_serializable(package="tfl")
class StopGradient(keras.layers.Layer):
    def call(self, x):
        return keras.ops.stop_gradient(x)


@dataclasses.dataclass
class TrainGraph:
    """What the trainer runs: a graph sharing `model`'s layers, and the variables that may change, by the
    canonical stage of their layer (CLASSIFIER_STAGE for the new head), in model order."""

    model: keras.Model
    variables: dict  # stage name -> trainable variables of that stage's layers
    boundary: str | None

    @property
    def head_variables(self) -> list:
        return list(self.variables.get(CLASSIFIER_STAGE, []))

    @property
    def backbone_variables(self) -> list:
        return [v for stage, vs in self.variables.items() if stage != CLASSIFIER_STAGE for v in vs]

    def trainable_stages(self) -> list[str]:
        return [stage for stage, vs in self.variables.items() if vs]


def training_graph(model: keras.Model, plan: FreezePlan, mode: str = "trainable", train_bn: bool = False) -> TrainGraph:
    """Apply `plan` to `model` in `mode` and return the graph to train.

    trainable: frozen layers get trainable=False (Keras then runs frozen BN in inference mode).
    stop_gradient: layers keep trainable=True; a gradient stop sits at the boundary tensor and the variables
    below it are left out of the optimizer, so nothing there can change. Only prefix-shaped plans qualify.
    In both modes a prefix-shaped plan trains a graph whose frozen prefix is called with training=False, so
    the prefix behaves exactly as at inference (BN statistics, stochastic depth off): both modes give the same
    numbers on the same seed.
    """
    if mode not in MODES:
        raise UsageError(f"unknown freeze mode {mode!r}; choose one of {', '.join(MODES)}")
    boundary = plan.boundary()
    frozen_head = [l.name for l in plan.layers if l.frozen and l.stage == CLASSIFIER_STAGE]
    if mode == "stop_gradient" and (boundary is None or frozen_head):
        raise UsageError(
            "--freeze-mode stop_gradient needs a prefix-shaped freeze (everything from the input up to one "
            "layer frozen, nothing above it); this plan freezes " + _describe_frozen(plan)
            + ". Use --freeze-up-to alone, or --freeze-mode trainable for arbitrary patterns"
        )
    backbone = backbone_of(model)
    by_name = {l.name: l for l in plan.layers}
    model.trainable = True  # Keras propagates this to every sublayer; the per-layer flags follow.
    prefix_names = set()
    if boundary is not None:
        index = [layer.name for layer in backbone.layers].index(boundary)
        prefix_names = {layer.name for layer in backbone.layers[: index + 1]}
    for layer in list(backbone.layers) + head_layers(model):
        if mode == "stop_gradient" and layer.name in prefix_names:
            continue
        layer.trainable = not _bn_frozen(by_name[layer.name], train_bn)
        if adapters.has_adapter(layer):  # after the flag: Keras' setter made the layer's own weights trainable again
            adapters.freeze_base(layer)

    train_model = model
    if boundary is not None:
        try:
            train_model = _split_graph(model, backbone, boundary, stop=mode == "stop_gradient")
        except NoSingleCut as err:
            if mode == "stop_gradient":
                raise UsageError(
                    f"--freeze-mode stop_gradient: the boundary after layer {boundary!r} is crossed by a skip "
                    "connection, so no single tensor separates frozen from trainable layers. Freeze up to the "
                    f"end of a stage or block instead (see `tfl inspect {plan.backbone}`) [{err}]"
                ) from None
    variables: dict[str, list] = {}
    for layer in list(backbone.layers) + head_layers(model):
        if layer.name not in prefix_names and layer.trainable and layer.trainable_weights:
            variables.setdefault(by_name[layer.name].stage, []).extend(layer.trainable_weights)
    return TrainGraph(train_model, variables, boundary)


class InferenceOnly(keras.layers.Layer):
    """Calls a wrapped model with training=False whatever the outer call says.

    Keras 3 functional graphs inject the outer call's `training` into every node, overriding a
    `training=False` recorded at graph construction, so `prefix(x, training=False)` alone is not enough.
    `call` takes no `training` argument, so none is injected here.
    """

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, x):
        return self.inner(x, training=False)

    def compute_output_shape(self, input_shape):
        return self.inner.compute_output_shape(input_shape)


def _split_graph(model: keras.Model, backbone: keras.Model, boundary: str, stop: bool) -> keras.Model:
    """preprocess -> backbone prefix (inference mode) [-> stop_gradient] -> backbone suffix -> head."""
    prefix = submodel(backbone, end=boundary, name=f"{backbone.name}_frozen")
    suffix = None
    if boundary != backbone.layers[-1].name:
        suffix = submodel(backbone, start=boundary, name=f"{backbone.name}_trainable")
    inputs = keras.Input(shape=model.inputs[0].shape[1:], name=INPUT)
    x = preprocess_layer(model)(inputs)
    x = InferenceOnly(prefix, name=prefix.name)(x)
    if stop:
        x = StopGradient(name="freeze_boundary")(x)
    if suffix is not None:
        x = suffix(x)
    for layer in head_layers(model):
        x = layer(x)
    return keras.Model(inputs, x, name=f"{model.name}_train")


def _describe_frozen(plan: FreezePlan) -> str:
    frozen = plan.frozen_names()
    if not frozen:
        return "nothing"
    shown = ", ".join(frozen[:6]) + (f", ... ({len(frozen)} layers)" if len(frozen) > 6 else "")
    return shown
