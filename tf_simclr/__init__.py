"""tf_simclr: SimCLRv2 for TensorFlow 2 / Keras 3."""

import os

# TensorFlow's C++ start-up chatter (CUDA probes, CPU feature notes) hides our own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
