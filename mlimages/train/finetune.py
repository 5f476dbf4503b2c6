"""Single-label fine-tuning from a pre-training checkpoint (upstream finetune.py).

Everything but the classifier head is restored (the upstream restore skips ``logits``,
``global_step`` and the momentum slots); FixBlock2 optionally freezes the stem and stages 0-1;
softmax cross-entropy; its own staircase schedule; 224 px, then optionally 299 px from a step on.
"""
import logging
import os

import numpy as np
import tensorflow as tf

from mlimages.runtime import UserError
from mlimages.train import config as train_config
from mlimages.train import metrics, resnet
from mlimages.train.task import Task, train

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str) -> tuple:
    """A model_dir or checkpoint prefix -> (checkpoint prefix, folder holding config.yaml)."""
    if os.path.isdir(path):
        prefix = tf.train.latest_checkpoint(path)
        if not prefix:
            raise UserError(f"{path} holds no checkpoint")
        return prefix, path
    if tf.io.gfile.exists(path + ".index"):
        return path, os.path.dirname(path)
    raise UserError(f"no checkpoint at {path} (give a training model_dir or a checkpoint prefix)")


def restore_model(path: str, num_classes: int = 0):
    """Builds the model saved at ``path`` (a run folder or prefix) and restores its weights.

    Returns (model, kind, saved config). ``num_classes`` other than the saved one is an error.
    """
    prefix, folder = resolve_checkpoint(path)
    kind, saved = train_config.load_saved(folder)
    m = saved.model
    if num_classes and num_classes != m.num_classes:
        raise UserError(f"{path} has {m.num_classes} outputs, not {num_classes}")
    model = resnet.build_resnet(m.depth, m.num_classes, m.bn_momentum, m.bn_epsilon)
    tf.train.Checkpoint(model=model).restore(prefix).expect_partial().assert_existing_objects_matched()
    log.info("restored %s model (ResNet-%d, %d classes) from %s", kind, m.depth,
             m.num_classes, prefix)
    return model, kind, saved


class FinetuneTask(Task):
    kind = "finetune"
    single_label = True

    def trainable(self, model):
        if not self.config.finetune.freeze_early:
            return model.trainable_variables
        # FixBlock2: only the late variables get gradients; the early BN layers still run in
        # training mode and update their moving statistics, as upstream.
        return [v for v in model.trainable_variables if resnet.is_late(v)]

    def initialize(self, model) -> None:
        source = self.config.finetune.pretrained
        if not source:
            log.warning("finetune.pretrained is not set: fine-tuning from random weights")
            return
        pretrained, _, saved = restore_model(source)
        if saved.model.depth != self.config.model.depth:
            raise UserError(f"{source} is a ResNet-{saved.model.depth}, the config asks for "
                            f"ResNet-{self.config.model.depth}")
        copied = 0
        for layer in model.layers:
            if layer.weights and layer.name != resnet.LOGITS_LAYER:
                layer.set_weights(pretrained.get_layer(layer.name).get_weights())
                copied += len(layer.weights)
        log.info("fine-tuning from %s: %d variables restored, head re-initialised", source,
                 copied)

    def data_loss(self, labels, logits, prepared):
        onehot = tf.one_hot(labels, self.config.model.num_classes)
        return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(onehot, logits))

    def image_size(self, step: int) -> int:
        f = self.config.finetune
        if f.high_res_from_step and step >= f.high_res_from_step:
            return f.high_res_size
        return self.config.data.image_size

    def eval_batch(self, labels, logits) -> dict:
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return {"loss_sum": float(-log_probs[np.arange(len(labels)), labels].sum()),
                "n": len(labels), "top1": metrics.topk_hits(logits, labels, 1),
                "topk": metrics.topk_hits(logits, labels, self.config.finetune.top_k)}

    def eval_summary(self, totals: dict) -> dict:
        keys = ("loss_sum", "n", "top1", "topk")
        sums = np.array([float(sum(totals.get(k, []))) for k in keys])
        # Horovod: exact totals over ranks.
        sums = self.hvd.allreduce(tf.constant(sums, tf.float64), op=self.hvd.Sum).numpy()
        loss_sum, n, top1, topk = sums
        if not n:
            return {"images": 0.0}
        return {"loss": loss_sum / n, "top1": top1 / n,
                f"top{self.config.finetune.top_k}": topk / n, "images": n}


def run_finetune(config: train_config.FinetuneConfig, resume: bool = False) -> dict:
    """Fine-tunes from ``config.finetune.pretrained``; see docs/train.md."""
    return train(FinetuneTask(config), resume)
