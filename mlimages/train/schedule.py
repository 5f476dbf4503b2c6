"""Learning-rate schedules of upstream train.py (warm-up growth, then piecewise decay) and
finetune.py (staircase decay), both scaled by the number of Horovod ranks when configured."""
import logging
import math

import tensorflow as tf
import tf_keras as keras

from mlimages.train.config import ScheduleConfig

log = logging.getLogger(__name__)


def learning_rate(config: ScheduleConfig, step: int, ranks: int = 1) -> float:
    """The rate at ``step`` as a Python float (the reference the Keras schedule matches)."""
    scale = ranks if config.scale_with_ranks else 1
    if step < config.warmup_steps:
        return scale * config.warmup_lr * config.warmup_factor ** (step // config.warmup_interval)
    if config.kind == "pretrain":
        # piecewise_constant: the rate changes once step is strictly past a boundary.
        decays = sum(1 for k in range(1, config.num_decays + 1) if step > k * config.decay_steps)
    else:
        decays = step // config.decay_steps
        if config.num_decays:
            decays = min(decays, config.num_decays)
    return scale * config.lr * config.decay_factor ** decays


class UpstreamSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """:func:`learning_rate` as a graph function of the optimizer step."""

    def __init__(self, config: ScheduleConfig, ranks: int = 1):
        self.config = config
        self.ranks = ranks

    def __call__(self, step):
        c = self.config
        step = tf.cast(step, tf.float32)
        scale = float(self.ranks if c.scale_with_ranks else 1)
        interval = float(max(c.warmup_interval, 1))
        warm = c.warmup_lr * tf.pow(c.warmup_factor, tf.floor(step / interval))
        if c.kind == "pretrain":
            bounds = tf.constant([k * c.decay_steps for k in range(1, c.num_decays + 1)] or [0],
                                 tf.float32)
            decays = tf.reduce_sum(tf.cast(step > bounds, tf.float32)) if c.num_decays else 0.0
        else:
            decays = tf.floor(step / float(c.decay_steps))
            if c.num_decays:
                decays = tf.minimum(decays, float(c.num_decays))
        after = c.lr * tf.pow(c.decay_factor, decays)
        rate = tf.where(step < float(c.warmup_steps), warm, after)
        return scale * rate

    def get_config(self):
        return {"config": self.config, "ranks": self.ranks}


def describe(config: ScheduleConfig, ranks: int, max_steps: int) -> str:
    """A short table of where the rate changes, for the start-of-run log."""
    points, last = [], None
    probe = sorted({0, max_steps} | {k * config.warmup_interval
                                     for k in range(math.ceil(config.warmup_steps / max(
                                         config.warmup_interval, 1)) + 1)}
                   | {k * config.decay_steps + d for k in range(1, 6) for d in (0, 1)})
    for step in probe:
        if step > max_steps:
            break
        rate = learning_rate(config, step, ranks)
        if rate != last:
            points.append(f"{step}:{rate:.6g}")
            last = rate
    return " ".join(points)
