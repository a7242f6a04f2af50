"""Measure each backbone's parameters per canonical stage and pick its default --freeze-up-to.

    PYTHONPATH=. python scripts/freeze_defaults.py            # the table, and the specs that disagree
    PYTHONPATH=. python scripts/freeze_defaults.py --json     # the same as JSON

Every registered backbone is built with weights=None inside a StatelessScope (no variable is created or
filled, parameters are counted from shapes), at the smallest input it accepts: parameter counts of these
fully convolutional backbones do not depend on the input size.

The rule: freeze up to the canonical stage whose trainable share (the backbone's parameters above it) is nearest
BAND, a quarter to a third, measured as a ratio. Stage tables are coarse: where the last stage holds most of the
parameters (ResNet, Inception, NASNet) the nearest share is above a half; where one stage holds ~70% (EfficientNetV2
B0-S, MobileNetV3), 75% trainable (2.3x a third) is nearer than 4% (6x below a quarter), while EfficientNet-Lite4's
15% (1.7x below) is nearer than its 75%. It never freezes everything. The result is
written by hand into the specs (`default_freeze_up_to`, data), except where a measured result pins it
(efficientnet_lite0: block4, the embedded default `make demo` reproduces).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

BAND = (0.25, 1 / 3)  # the share of the backbone's parameters the default should leave trainable
# Specs whose default a measured run chose instead of the rule (the spec's comment gives the measurement).
PINNED = {"efficientnet_lite0": "block4"}


def stage_params(spec) -> dict[str, int]:
    """Parameters of each canonical stage of the backbone (include_top=False), in stage order."""
    import keras

    from tfl import freezing, models

    with keras.StatelessScope(initialize_variables=False):
        for size in (spec.min_input_size, 75, 299):
            try:
                model = models.build_classifier(spec.name, 2, size, "none")
                break
            except ValueError as err:  # Inception/Xception refuse tiny inputs ("Input size must be at least ...")
                if "at least" not in str(err):
                    raise
    totals = dict.fromkeys(spec.stage_names, 0)
    for layer in freezing.make_plan(spec, model, None).layers:
        if layer.stage in totals:
            totals[layer.stage] += layer.params
    keras.backend.clear_session()
    return totals


def trainable_shares(totals: dict[str, int]) -> dict[str, float]:
    """stage -> share of the backbone's parameters above it (trainable when freezing up to it)."""
    total = sum(totals.values())
    shares, frozen = {}, 0
    for stage, params in totals.items():
        frozen += params
        shares[stage] = (total - frozen) / total
    return shares


def distance(share: float) -> float:
    """How far a trainable share lies outside BAND, as a ratio (0.125 is as far below as 0.67 is above)."""
    low, high = BAND
    if share <= 0:
        return math.inf  # freezes everything: never a default
    return max(math.log(low / share), math.log(share / high), 0.0)


def choose(totals: dict[str, int]) -> str:
    """The stage whose trainable share is nearest BAND; inside it, the one nearest the band's middle."""
    shares = trainable_shares(totals)
    middle = math.sqrt(BAND[0] * BAND[1])
    return min(shares, key=lambda s: (distance(shares[s]), abs(math.log(max(shares[s], 1e-12) / middle))))


def main(argv=None) -> int:
    from tfl.backbones import registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("backbones", nargs="*", help="default: every registered backbone")
    args = parser.parse_args(argv)
    specs = [registry.get(n) for n in args.backbones] if args.backbones else registry.all_specs()
    rows, disagree = [], []
    for spec in specs:
        totals = stage_params(spec)
        shares = trainable_shares(totals)
        chosen = choose(totals)
        current = getattr(spec, "default_freeze_up_to", None)
        rows.append({"backbone": spec.name, "params": sum(totals.values()), "stage_params": totals,
                     "trainable_share": {s: round(v, 4) for s, v in shares.items()}, "rule": chosen,
                     "spec": current, "spec_share": round(shares[current], 4) if current in shares else None})
        if current != PINNED.get(spec.name, chosen):
            disagree.append(f"{spec.name}: spec {current}, rule {chosen}")
        if not args.json:
            cells = "  ".join(f"{s} {shares[s]:.2f}" for s in spec.stage_names)
            print(f"{spec.name:<22} {sum(totals.values()):>11,}  rule {chosen:<7} spec {current or '-':<7} "
                  f"| trainable share above: {cells}", flush=True)
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    if disagree:
        print("specs that differ from the rule: " + "; ".join(disagree), file=sys.stderr)
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
