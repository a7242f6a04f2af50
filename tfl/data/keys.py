"""The batch keys every producer (tfl.data.pipeline, tfl.data.mixing, the boundary cache) and the trainer share."""

IMAGE, FEATURES, LABEL = "image", "features", "label"
# Soft label rows float32 [B, classes] of a mixed batch (tfl.data.mixing); the loss trains on them instead of LABEL.
TARGET = "target"
