"""``tf.losses``: losses that return a scalar and join the LOSSES collection."""

from __future__ import annotations

from . import nn
from .core import convert_to_tensor, get_default_graph
from .ops import cast, multiply, reduce_mean

__all__ = ["sparse_softmax_cross_entropy", "softmax_cross_entropy", "get_losses"]

LOSSES = "losses"


def _mean_loss(per_example, weights, name, loss_collection):
    """The mean of the (weighted) per-example losses, added to ``loss_collection``."""
    loss = reduce_mean(per_example if weights == 1.0 else multiply(per_example, convert_to_tensor(weights)), name=name)
    if loss_collection:
        get_default_graph().add_to_collection(loss_collection, loss)
    return loss


def sparse_softmax_cross_entropy(labels, logits, weights=1.0, scope=None, loss_collection=LOSSES):
    """Mean cross-entropy of ``logits`` against integer ``labels`` (times ``weights``)."""
    per_example = nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return _mean_loss(per_example, weights, scope or "sparse_softmax_cross_entropy_loss", loss_collection)


def softmax_cross_entropy(onehot_labels, logits, weights=1.0, label_smoothing=0, scope=None,
                          loss_collection=LOSSES):
    """Mean cross-entropy of ``logits`` against one-hot (or soft) labels, as Horovod's TF1 MNIST sample uses."""
    logits = convert_to_tensor(logits)
    labels = convert_to_tensor(onehot_labels)
    if labels.dtype != logits.dtype:
        labels = cast(labels, logits.dtype)
    if label_smoothing:
        classes = logits.shape.as_list()[-1]
        labels = labels * (1.0 - label_smoothing) + label_smoothing / classes
    per_example = nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return _mean_loss(per_example, weights, scope or "softmax_cross_entropy_loss", loss_collection)


def get_losses(scope=None, loss_collection=LOSSES):
    return get_default_graph().get_collection(loss_collection, scope)
