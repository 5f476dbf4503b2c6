"""The Horovod training loop shared by pre-training and fine-tuning.

A :class:`Task` supplies the hooks (model, per-batch loss, trainable variables, evaluation);
:func:`train` runs them: broadcast from rank 0, fixed steps per epoch on every rank, rank-0-only
checkpoints (model, optimizer, loss counters, data position) and logs, resume, evaluation.
"""
import json
import logging
import os
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras

from mlimages.runtime import UserError
from mlimages.train import config as train_config
from mlimages.train import input as train_input
from mlimages.train import loss as train_loss
from mlimages.train import resnet, schedule

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class Task:
    """Hooks of one kind of training; subclasses: pretrain.PretrainTask, finetune.FinetuneTask."""
    kind = ""
    single_label = False

    def __init__(self, config):
        self.config = config
        self.hvd = None

    def build_model(self) -> keras.Model:
        m = self.config.model
        return resnet.build_resnet(m.depth, m.num_classes, m.bn_momentum, m.bn_epsilon)

    def trainable(self, model):
        return model.trainable_variables

    def checkpoint_items(self) -> dict:
        """Extra objects saved in checkpoints (e.g. the loss counters)."""
        return {}

    def initialize(self, model) -> None:
        """Called on rank 0 of a fresh (not resumed) run, before the broadcast."""

    def prepare(self, labels, step):
        """Graph code run before the forward pass (may use Horovod collectives)."""
        return tf.zeros([])

    def data_loss(self, labels, logits, prepared):
        raise NotImplementedError

    def image_size(self, step: int) -> int:
        return self.config.data.image_size

    def eval_batch(self, labels, logits) -> dict:
        """NumPy sums (and arrays to keep) of one validation batch."""
        raise NotImplementedError

    def eval_summary(self, totals: dict) -> dict:
        raise NotImplementedError


def _init_horovod():
    import horovod.tensorflow as hvd

    hvd.init()
    return hvd


def _set_threads(hvd, requested: int) -> None:
    # Horovod: ranks on one node share its cores; without this each rank starts a thread pool
    # the size of the machine and they thrash.
    threads = requested or max(1, (os.cpu_count() or 1) // hvd.local_size())
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))


def _set_precision(precision: str) -> None:
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16",
              "float16": "mixed_float16"}[precision]
    keras.mixed_precision.set_global_policy(policy)


def _optimizer(config, ranks: int):
    s = config.schedule
    rate = schedule.UpstreamSchedule(s, ranks)
    momentum = s.momentum if s.optimizer == "momentum" else 0.0
    optimizer = keras.optimizers.SGD(learning_rate=rate, momentum=momentum)
    if config.model.precision == "float16":
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def _optimizer_variables(optimizer):
    variables = optimizer.variables
    return list(variables() if callable(variables) else variables)


class Trainer:
    """State and compiled steps of one run on one rank."""

    def __init__(self, task: Task, resume: bool):
        self.task = task
        self.config = config = task.config
        self.hvd = hvd = _init_horovod()
        task.hvd = hvd
        self.rank, self.ranks = hvd.rank(), hvd.size()
        self.is_chief = self.rank == 0
        self.model_dir = config.run.model_dir
        _set_threads(hvd, config.run.intra_op_threads)
        _set_precision(config.model.precision)
        tf.random.set_seed(config.run.seed + self.rank)

        self.model = task.build_model()
        self.train_vars = task.trainable(self.model)
        self.optimizer = _optimizer(config, self.ranks)
        self.optimizer.build(self.train_vars)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.epoch_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch_step")
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, epoch=self.epoch,
            epoch_step=self.epoch_step, **task.checkpoint_items())
        self.manager = None
        if self.is_chief:
            self.manager = tf.train.CheckpointManager(
                self.checkpoint, self.model_dir, max_to_keep=config.run.keep_checkpoints,
                checkpoint_name="ckpt")
        self._restore_or_initialize(resume)
        self._broadcast()
        self._compute = tf.function(self._gradients, jit_compile=config.model.xla)
        self._train_step = tf.function(self._step)
        self._eval_logits = tf.function(lambda images: self.model(images, training=False))

    # -- start ------------------------------------------------------------------------------
    def _restore_or_initialize(self, resume: bool) -> None:
        latest = tf.train.latest_checkpoint(self.model_dir) if self.is_chief else None
        # Horovod: rank 0 decides for everyone, so all ranks fail (or go on) together.
        latest = self.hvd.broadcast_object(latest, root_rank=0, name="latest_checkpoint")
        if latest and not resume:
            raise UserError(f"{self.model_dir} already holds checkpoints ({latest}): "
                            "pass --resume to continue that run, or choose another run.model_dir")
        if self.is_chief:
            if latest:
                self.checkpoint.restore(latest).assert_existing_objects_matched()
                log.info("resumed from %s at step %d", latest, int(self.optimizer.iterations))
            else:
                if resume:
                    log.warning("--resume: no checkpoint in %s, starting from scratch",
                                self.model_dir)
                self.task.initialize(self.model)

    def _broadcast(self) -> None:
        # Horovod: every rank starts from rank 0's weights, optimizer slots, counters and step.
        items = self.task.checkpoint_items().values()
        variables = (self.model.variables + _optimizer_variables(self.optimizer)
                     + [self.epoch, self.epoch_step]
                     + [v for item in items for v in item.variables])
        self.hvd.broadcast_variables(variables, root_rank=0)

    # -- steps ------------------------------------------------------------------------------
    def _gradients(self, images, labels, prepared):
        c = self.config
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            data = self.task.data_loss(labels, logits, prepared)
            decay = train_loss.weight_decay(self.train_vars, c.loss.weight_decay,
                                            c.loss.bn_weight_decay_scale, resnet.is_batch_norm)
            total = data + decay
            scaled = total
            if c.model.precision == "float16":
                scaled = self.optimizer.get_scaled_loss(total)
        return data, total, tape.gradient(scaled, self.train_vars)

    def _step(self, images, labels):
        prepared = self.task.prepare(labels, self.optimizer.iterations)
        data, total, grads = self._compute(images, labels, prepared)
        # Horovod: average the gradients over ranks (outside the XLA cluster: no XLA kernels
        # for Horovod ops in this build).
        grads = self.hvd.grouped_allreduce(grads, op=self.hvd.Average)
        if self.config.model.precision == "float16":
            grads = self.optimizer.get_unscaled_gradients(grads)
        self.optimizer.apply_gradients(zip(grads, self.train_vars, strict=True))
        return data, total

    def average_over_ranks(self, values):
        return self.hvd.allreduce(tf.constant(values, tf.float64), op=self.hvd.Average).numpy()

    def sync_batch_norm_statistics(self) -> None:
        # Horovod: BN moving statistics are updated from each rank's local batch; averaging them
        # before a checkpoint makes the saved model the same whichever rank saved it.
        moving = [v for v in self.model.non_trainable_variables if "moving_" in v.name]
        averaged = self.hvd.grouped_allreduce([tf.convert_to_tensor(v) for v in moving],
                                              op=self.hvd.Average)
        for variable, value in zip(moving, averaged, strict=True):
            variable.assign(value)

    def save(self, step: int) -> None:
        self.sync_batch_norm_statistics()
        if self.is_chief:
            path = self.manager.save(checkpoint_number=step)
            log.info("step %d: checkpoint %s", step, path)

    # -- loops ------------------------------------------------------------------------------
    def record(self, entry: dict) -> None:
        if self.is_chief:
            with open(os.path.join(self.model_dir, METRICS_FILE), "a", encoding="utf-8") as out:
                out.write(json.dumps(entry, sort_keys=True) + "\n")

    def evaluate(self, step: int) -> dict:
        """One pass over each rank's validation shard; no collectives until the end."""
        c = self.config
        if not c.data.val_url:
            return {}
        totals: dict = {}
        with train_input.open_dataset(
                c.data.val_url, self.rank, self.ranks, c.data, num_classes=c.model.num_classes,
                training=False, size=self.task.image_size(step),
                single_label=self.task.single_label, split=c.data.val_split) as data:
            for index, (images, labels) in enumerate(data):
                if c.run.eval_steps and index >= c.run.eval_steps:
                    break
                logits = self._eval_logits(images)
                batch = self.task.eval_batch(labels.numpy(), logits.numpy())
                for key, value in batch.items():
                    totals.setdefault(key, []).append(value)
        summary = self.task.eval_summary(totals)
        summary = {f"val_{k}": v for k, v in summary.items()}
        if self.is_chief:
            log.info("step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in summary.items()))
        self.record({"step": step, **summary})
        return summary


def train(task: Task, resume: bool = False) -> dict:
    """Runs the task to ``run.max_steps``; returns the final metrics (the same on every rank)."""
    return fit(Trainer(task, resume))


def fit(trainer: Trainer) -> dict:
    """The epoch loop of :func:`train` on a prepared trainer."""
    task = trainer.task
    c = task.config
    rank, ranks = trainer.rank, trainer.ranks
    if not c.data.train_url:
        raise UserError("data.train_url is not set")
    rows = train_input.count_rows(c.data.train_url, c.data.train_split)
    if rows == 0:
        raise UserError(f"{c.data.train_url} holds no {c.data.train_split or ''} rows")
    per_epoch = train_input.steps_per_epoch(rows, c.data.batch_size, ranks)
    # Horovod: a shard without training rows would make its rank wait forever for a batch
    # (the reader repeats an empty shard); every rank checks the smallest shard and stops.
    local = train_input.shard_rows(c.data.train_url, rank, ranks, c.data.train_split)
    smallest = int(trainer.hvd.allreduce(tf.constant(local, tf.int64), op=trainer.hvd.Min))
    if smallest == 0:
        raise UserError(f"a shard of {c.data.train_url} has no {c.data.train_split} rows for "
                        f"{ranks} ranks: write more (smaller) row groups or use fewer ranks")
    if trainer.is_chief:
        os.makedirs(c.run.model_dir, exist_ok=True)
        train_config.save(c, c.run.model_dir, task.kind)
        log.info("%s config:\n%s", task.kind, json.dumps(train_config.to_dict(c), indent=1))
        log.info("%d ranks x batch %d; %d training rows (smallest shard %d), %d steps per "
                 "epoch; lr %s", ranks, c.data.batch_size, rows, smallest, per_epoch,
                 schedule.describe(c.schedule, ranks, c.run.max_steps))
    step = int(trainer.optimizer.iterations)
    started, window_start, window_steps = time.time(), time.time(), 0
    losses = []
    while step < c.run.max_steps:
        epoch, skip = int(trainer.epoch), int(trainer.epoch_step)
        size = task.image_size(step)
        with train_input.open_dataset(
                c.data.train_url, rank, ranks, c.data, num_classes=c.model.num_classes,
                training=True, seed=c.run.seed + epoch, size=size,
                single_label=task.single_label, split=c.data.train_split) as data:
            # Resume: skip the batches this epoch already consumed.
            batches = iter(data.skip(skip))
            for in_epoch in range(skip, per_epoch):
                if step >= c.run.max_steps or task.image_size(step) != size:
                    break
                images, labels = next(batches)
                data_loss, _ = trainer._train_step(images, labels)
                losses.append(float(data_loss))
                step += 1
                window_steps += 1
                trainer.epoch_step.assign(in_epoch + 1)
                if step % c.run.log_every == 0 or step == c.run.max_steps:
                    mean = trainer.average_over_ranks([np.mean(losses)])[0]
                    rate = window_steps * c.data.batch_size * ranks / (time.time() - window_start)
                    lr = schedule.learning_rate(c.schedule, step - 1, ranks)
                    if trainer.is_chief:
                        log.info("step %d epoch %d: loss %.4f lr %.5g %.1f images/s", step,
                                 epoch, mean, lr, rate)
                    trainer.record({"step": step, "epoch": epoch, "loss": float(mean),
                                    "lr": lr, "images_per_s": rate})
                    losses, window_start, window_steps = [], time.time(), 0
                if step % c.run.checkpoint_every == 0 and step < c.run.max_steps:
                    trainer.save(step)
                if c.run.eval_every and step % c.run.eval_every == 0 and step < c.run.max_steps:
                    trainer.evaluate(step)
        if int(trainer.epoch_step) >= per_epoch:
            trainer.epoch.assign_add(1)
            trainer.epoch_step.assign(0)
    trainer.save(step)
    metrics = trainer.evaluate(step)
    if trainer.is_chief:
        log.info("%s finished at step %d in %.1f s", task.kind, step, time.time() - started)
    return {"step": step, **metrics}
