"""The upstream multi-label loss (train.py), with its two run-length counters.

Per class c, for a batch of labels y (soft confidences; -1 means "ignore"):

* ``a_c = 1[#{i: y_ic >= mask_threshold} > 0]`` (the class has a positive in the batch);
* ``s_c = 1[u_c <= neg_select]`` with ``u_c ~ U(0, 1)`` drawn every step (negative selection);
* counters ``p_c <- a_c (p_c + 1)`` (consecutive batches with a positive) and
  ``n_c <- (1 - a_c)(n_c + s_c)`` (selections as a negative-only class since the last positive);
* coefficients ``r_c = a_c max*(-log10((p_c + 0.01) / 10), 0.01)
  + (1 - a_c) s_c max*(-log10((n_c + 8) / 10), 0.001)``, where ``max*(v, f)`` is v if v > 0.01
  else f (the upstream floors), using the updated counters;
* ``L = sum_c r_c (1/B) sum_i 1[y_ic != -1] wce(y_ic, z_ic)`` with the sigmoid cross-entropy
  weighted by ``pos_weight`` (12) on positives; masked entries still count in B.

Horovod: with ``global_counters`` the positive counts are all-reduced (summed) over ranks and
the uniform draw uses the same seed on every rank, so all ranks hold the same counters and
coefficients, as one process with the global batch would. Without it each rank counts its own
batch and draws its own selection (upstream per-process behaviour) and rank 0's counters are
the ones checkpointed.
"""
import logging

import tensorflow as tf

log = logging.getLogger(__name__)

POS_FLOOR = 0.01
NEG_FLOOR = 0.001
SWITCH = 0.01  # both floors apply when the log term is <= 0.01


def coefficients(positives, pos_counts, neg_counts, uniform, neg_select):
    """The counter update and per-class coefficients; returns (r, new_pos, new_neg).

    ``positives`` is the per-class number of positives in the batch (local or global).
    """
    present = tf.cast(positives > 0, tf.float32)
    selected = tf.cast(uniform <= neg_select, tf.float32)
    new_pos = present * (pos_counts + 1.0)
    new_neg = (1.0 - present) * (neg_counts + selected)
    pos_term = -tf.math.log((new_pos + 0.01) / 10.0) / tf.math.log(10.0)
    neg_term = -tf.math.log((new_neg + 8.0) / 10.0) / tf.math.log(10.0)
    alpha = present * tf.where(pos_term > SWITCH, pos_term, POS_FLOOR)
    beta = (1.0 - present) * selected * tf.where(neg_term > SWITCH, neg_term, NEG_FLOOR)
    return alpha + beta, new_pos, new_neg


def positives_per_class(labels, mask_threshold):
    return tf.reduce_sum(tf.cast(labels >= mask_threshold, tf.float32), axis=0)


def weighted_loss(labels, logits, weights, pos_weight):
    """Sum over classes of ``weights_c`` times the batch mean of the masked weighted CE."""
    labels = tf.cast(labels, tf.float32)
    logits = tf.cast(logits, tf.float32)
    mask = tf.cast(tf.not_equal(labels, -1.0), tf.float32)
    elementwise = tf.nn.weighted_cross_entropy_with_logits(
        labels=labels, logits=logits, pos_weight=pos_weight)
    batch = tf.cast(tf.shape(labels)[0], tf.float32)
    per_class = tf.reduce_sum(mask * elementwise, axis=0) / batch
    return tf.reduce_sum(weights * per_class)


class MultiLabelLoss(tf.Module):
    """Holds the counters (checkpointed with the model) and computes the coefficients."""

    def __init__(self, num_classes: int, mask_threshold: float = 0.7, neg_select: float = 0.1,
                 pos_weight: float = 12.0, seed: int = 1234, global_counters: bool = True,
                 rank: int = 0, allreduce_sum=None):
        super().__init__(name="multilabel_loss")
        self.num_classes = num_classes
        self.mask_threshold = mask_threshold
        self.neg_select = neg_select
        self.pos_weight = pos_weight
        self.seed = seed
        self.global_counters = global_counters
        self.rank = rank
        self.allreduce_sum = allreduce_sum
        zeros = tf.zeros([num_classes], tf.float32)
        self.pos_counts = tf.Variable(zeros, trainable=False, name="pos_counts")
        self.neg_counts = tf.Variable(zeros, trainable=False, name="neg_counts")

    def update(self, labels, step):
        """Advances the counters with this batch; returns the coefficients r (shape [C])."""
        positives = positives_per_class(labels, self.mask_threshold)
        seed_rank = 0
        if self.global_counters and self.allreduce_sum is not None:
            # Horovod: the global batch decides which classes are present.
            positives = self.allreduce_sum(positives)
        else:
            seed_rank = self.rank
        seed = tf.stack([tf.cast(self.seed + 7919 * seed_rank, tf.int64),
                         tf.cast(step, tf.int64)])
        uniform = tf.random.stateless_uniform([self.num_classes], seed=seed)
        weights, new_pos, new_neg = coefficients(
            positives, self.pos_counts, self.neg_counts, uniform, self.neg_select)
        self.pos_counts.assign(new_pos)
        self.neg_counts.assign(new_neg)
        return weights

    def __call__(self, labels, logits, weights):
        return weighted_loss(labels, logits, weights, self.pos_weight)


def weight_decay(variables, rate: float, bn_scale: float, is_batch_norm) -> tf.Tensor:
    """``rate * sum ||v||^2 / 2`` over non-BN variables plus ``bn_scale`` times that on BN ones.

    Pre-training (upstream): bn_scale 0, so BN gamma/beta are excluded and the FC bias is
    included; fine-tuning: bn_scale 0.1.
    """
    total = tf.constant(0.0)
    for variable in variables:
        scale = bn_scale if is_batch_norm(variable) else 1.0
        if scale:
            total += scale * tf.nn.l2_loss(tf.cast(variable, tf.float32))
    return rate * total
