"""Checkpoint readers: each turns a file format into a plain {name: np.ndarray} dict."""

from tfl.checkpoints.errors import CheckpointError
from tfl.checkpoints.torch_pickle import read_torch_state_dict

__all__ = ["CheckpointError", "read_torch_state_dict"]
