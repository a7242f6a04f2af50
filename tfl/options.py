"""The choices every option can take, in one place, light to import: the library validates against these
and the CLI offers them (defaults live in the options dataclasses, tfl.job.JobOptions and the recipes')."""

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")
FREEZE_MODES = ("trainable", "stop_gradient")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
CACHE_MODES = ("auto", "on", "off")
MIXED_PRECISION = ("auto", "on", "off")  # --mixed-precision (tfl.precision)
PRECISIONS = ("float32", "bfloat16", "float16")  # what a run computes in; config.json "precision"
EXPORT_FORMATS = ("saved_model", "tflite")
TFLITE_MODES = ("float32", "float16", "int8")
BENCH_CASES = ("head_only", "partial_finetune", "resnet50_forward", "resnet50_forward_bf16", "serving")
UNFREEZE = ("two_stage", "gradual")
SPLITS = ("train", "val", "test")
# Image files tfl reads, for training, evaluation and predict alike (Pillow decodes WebP and TIFF; an export's
# serving_default decodes JPEG, PNG, GIF and BMP bytes, as TF Serving does). EXIF orientation is ignored everywhere.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEACHER_LOGITS = ("auto", "cached", "online")  # tfl distill: teacher outputs computed once, or per batch
CL_SCENARIOS = ("class-il", "task-il")  # tfl forgetting --scenario
CL_STRATEGIES = ("naive", "replay", "lwf", "ewc", "joint")  # tfl forgetting --strategies
DANN_SHIFTS = ("invert", "tint", "texture")  # tfl dann --target-shift: the shifted copy of the dataset made as target
BALANCE = ("none", "sampler", "loss")  # tfl finetune --balance: class-balanced sampling or class-weighted loss
PRETEXT_OBJECTIVES = ("rotation", "simclr")  # tfl pretext --objective
