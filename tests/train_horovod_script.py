"""Run under horovodrun by tests/test_train_horovod.py: trains like the CLI, then each rank
writes what the test compares (weight checksums, counters, whether it could checkpoint)."""
import json
import os
import sys

import numpy as np

import mlimages.train  # noqa: F401
from mlimages import runtime
from mlimages.train import config
from mlimages.train.pretrain import PretrainTask
from mlimages.train.task import Trainer, fit


def main(argv) -> int:
    out, resume, overrides = argv[0], argv[1] == "resume", argv[2:]
    runtime.setup_logging("INFO")
    task = PretrainTask(config.load(config.PretrainConfig, "conf/train/tiny.yaml", overrides))
    trainer = Trainer(task, resume)
    start_step = int(trainer.optimizer.iterations)
    start_counters = task.loss.pos_counts.numpy().tolist()
    result = fit(trainer)
    report = {
        "rank": trainer.rank, "start_step": start_step, "start_pos_counts": start_counters,
        "step": int(trainer.optimizer.iterations), "epoch": int(trainer.epoch),
        "epoch_step": int(trainer.epoch_step), "can_checkpoint": trainer.manager is not None,
        "weights": [float(np.sum(v.numpy().astype(np.float64))) for v in trainer.model.variables],
        "pos_counts": task.loss.pos_counts.numpy().tolist(), "result": result}
    with open(os.path.join(out, f"rank{trainer.rank}.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
