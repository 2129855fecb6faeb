"""Activation recomputation ("gradient checkpointing") for residual blocks.

A recomputed block keeps only its input for the backward pass and runs its forward again when
its output gradient arrives, trading about one extra forward of the block for the memory of
its inner activations. The early, high-resolution block groups hold most of a ResNet's
activations (docs/PERFORMANCE.md), so recomputing those is where memory is won.

The second forward must not update BN moving statistics again: `BatchNorm` asks
`is_recomputing()` and skips its update while the backward pass re-runs a block.
"""

import contextlib
import threading

import tensorflow as tf

# Per thread: MirroredStrategy runs each replica's step (and its gradients) in its own thread.
_state = threading.local()


def is_recomputing() -> bool:
  """True while a recomputed block's forward runs again inside the backward pass."""
  return getattr(_state, "recomputing", False)


@contextlib.contextmanager
def _recomputing():
  previous = is_recomputing()
  _state.recomputing = True
  try:
    yield
  finally:
    _state.recomputing = previous


def recomputed(fn, x):
  """fn(x) whose backward pass recomputes fn's activations from x instead of keeping them.

  fn may read variables (their gradients are returned) and must be deterministic given x
  and the variables, which holds for the trunk's blocks (no dropout).
  """

  @tf.custom_gradient
  def forward(x):
    y = fn(x)

    def backward(dy, variables=None):
      variables = list(variables or [])
      # Start the recomputation only when dy exists, so the executor cannot run it early and
      # keep its activations alive through the rest of the forward pass.
      with tf.control_dependencies([dy]):
        x_again = tf.identity(x)
      with tf.GradientTape() as tape, _recomputing():
        tape.watch(x_again)
        y_again = fn(x_again)
      grads = tape.gradient(y_again, [x_again] + variables, output_gradients=dy)
      return grads[0], grads[1:]

    return y, backward

  return forward(x)
