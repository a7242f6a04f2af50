"""Checkpoint readers: each turns a file format into a plain {name: np.ndarray} dict."""

from tfl.checkpoints.errors import CheckpointError
from tfl.checkpoints.read import FORMATS, Checkpoint, detect_format, read_checkpoint
from tfl.checkpoints.torch_pickle import read_torch_state_dict

__all__ = ["FORMATS", "Checkpoint", "CheckpointError", "detect_format", "read_checkpoint", "read_torch_state_dict"]
