"""Multi-label pre-training on the ML-Images Petastorm dataset (upstream train.py)."""
import logging

import numpy as np
import tensorflow as tf

from mlimages.train import config as train_config
from mlimages.train import metrics
from mlimages.train.loss import MultiLabelLoss, weighted_loss
from mlimages.train.task import Task, train

log = logging.getLogger(__name__)


class PretrainTask(Task):
    kind = "pretrain"
    single_label = False

    def __init__(self, config: train_config.PretrainConfig):
        super().__init__(config)
        self._loss = None

    @property
    def loss(self) -> MultiLabelLoss:
        if self._loss is None:
            c = self.config.loss
            hvd = self.hvd
            self._loss = MultiLabelLoss(
                self.config.model.num_classes, c.mask_threshold, c.neg_select, c.pos_weight,
                c.seed, c.global_counters, rank=hvd.rank() if hvd else 0,
                allreduce_sum=(lambda x: hvd.allreduce(x, op=hvd.Sum)) if hvd else None)
        return self._loss

    def checkpoint_items(self) -> dict:
        return {"loss_counters": self.loss}

    def prepare(self, labels, step):
        return self.loss.update(labels, step)

    def data_loss(self, labels, logits, prepared):
        return self.loss(labels, logits, prepared)

    def eval_batch(self, labels, logits) -> dict:
        probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        ones = np.ones(labels.shape[1], np.float32)
        loss = float(weighted_loss(labels, logits, ones, self.config.loss.pos_weight))
        return {"loss_sum": loss * len(labels), "n": len(labels),
                "counts": metrics.multilabel_counts(probs, labels,
                                                    self.config.run.metric_threshold),
                "scores": probs.astype(np.float32), "labels": labels}

    def eval_summary(self, totals: dict) -> dict:
        """Loss (unweighted: mean over images of the summed masked weighted CE), mAP and
        micro precision/recall/F1 at run.metric_threshold, over all ranks."""
        hvd, threshold = self.hvd, self.config.run.metric_threshold
        n = float(sum(totals.get("n", [])))
        counts = np.sum(totals["counts"], axis=0) if n else np.zeros(3)
        local_map = 0.0
        if n:
            local_map = metrics.mean_average_precision(
                np.concatenate(totals["scores"]), np.concatenate(totals["labels"]), threshold)
        has_map = 0.0 if np.isnan(local_map) else n
        sums = np.array([sum(totals.get("loss_sum", [])), n, has_map,
                         0.0 if np.isnan(local_map) else local_map * n, *counts])
        # Horovod: sums over ranks, so the figures are those of the whole validation split.
        sums = hvd.allreduce(tf.constant(sums, tf.float64), op=hvd.Sum).numpy()
        loss_sum, n, map_n, map_sum, tp, fp, fn = sums
        precision, recall, f1 = metrics.precision_recall_f1(tp, fp, fn)
        return {"loss": loss_sum / n if n else float("nan"),
                "mAP": map_sum / map_n if map_n else float("nan"),
                "precision": precision, "recall": recall, "f1": f1, "images": n}


def run_pretrain(config: train_config.PretrainConfig, resume: bool = False) -> dict:
    """Pre-trains ``config.model`` on ``config.data.train_url``; see docs/train.md."""
    return train(PretrainTask(config), resume)
