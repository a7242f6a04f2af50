"""tfl: transfer learning for TensorFlow/Keras — freeze, reuse, fine-tune, ship."""

__version__ = "0.1.0"
