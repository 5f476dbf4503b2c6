"""Training-stage speed: input pipeline images/s per core at 224 and 299 px (full training
augmentation against a crop-and-resize baseline without flip, rotation or colour), and CPU
training images/s with 1 and 2 Horovod ranks (2 ranks against the 1-rank baseline: scaling
efficiency).

  .venv/bin/python bench/train.py [--small]

Results go to bench/out/train.json. Numbers on a shared 2-core machine are noisy; run alone.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import mlimages.train  # noqa: E402,F401  (Keras 2 before TensorFlow)


def _dataset(spark, path: str, rows: int, size: int) -> None:
    from mlimages.train.sample import write_sample_dataset

    write_sample_dataset(spark, path, (rows // 2, rows - rows // 2), val_rows=0, size=size)


def _input_rate(path: str, size: int, augment: bool, images: int) -> float:
    """Images/s of one core: one map thread, one reader worker, TF ops on one thread."""
    import tensorflow as tf

    from mlimages.train import config
    from mlimages.train import input as train_input

    c = config.load(config.PretrainConfig, "", [
        f"data.image_size={size}", "data.batch_size=16", "data.map_parallelism=1",
        "data.reader_workers=1", "data.shuffle_buffer=64"])
    if not augment:
        c.data.augment.rotate = c.data.augment.color = c.data.augment.flip = False
    with train_input.open_dataset(path, 0, 1, c.data, num_classes=11166, training=True,
                                  seed=1, split="") as data:
        batches = iter(data)
        next(batches)
        started, seen = time.time(), 0
        while seen < images:
            images_batch, _ = next(batches)
            seen += int(tf.shape(images_batch)[0])
        return seen / (time.time() - started)


def _train_rate(path: str, ranks: int, steps: int, size: int, batch: int, depth: int) -> float:
    """Images/s of the whole job (all ranks), steps after the first two (tracing) only."""
    with tempfile.TemporaryDirectory() as model_dir:
        command = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np",
                   str(ranks), "-H", f"localhost:{ranks}", "--gloo", sys.executable, "-W",
                   "ignore", "-m", "mlimages.train", "pretrain", "--config",
                   "conf/train/tiny.yaml", f"data.train_url={path}", "data.val_url=",
                   f"data.image_size={size}", f"data.batch_size={batch}",
                   f"model.depth={depth}", f"run.model_dir={model_dir}",
                   f"run.max_steps={steps}", f"run.checkpoint_every={steps + 1}"]
        subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=1800)
        with open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if '"images_per_s"' in line]
        timed = [r["images_per_s"] for r in rows if r["step"] > 2]
        return sum(timed) / len(timed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="fewer images and steps")
    args = parser.parse_args(argv)
    from mlimages.spark import build_session

    images = 96 if args.small else 400
    steps = 5 if args.small else 8
    results = {"input": {}, "training": {}}
    with tempfile.TemporaryDirectory() as tmp:
        spark = build_session("bench-train", master="local[2]",
                              conf={"spark.ui.enabled": "false"})
        big, small = os.path.join(tmp, "big"), os.path.join(tmp, "small")
        _dataset(spark, big, 64, 400)
        _dataset(spark, small, 32, 64)
        spark.stop()
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        for size in (224, 299):
            base = _input_rate(big, size, False, images)
            full = _input_rate(big, size, True, images)
            results["input"][size] = {"crop_resize_baseline": base, "train_augment": full,
                                      "ratio": full / base}
            print(f"input {size}px, 1 core: augmented {full:.1f} images/s vs baseline "
                  f"crop+resize {base:.1f} images/s (ratio {full / base:.2f})")
        size, batch, depth = 64, 2, 101
        one = _train_rate(small, 1, steps, size, batch, depth)
        two = _train_rate(small, 2, steps, size, batch, depth)
        results["training"] = {"model": f"resnet{depth}", "image_size": size,
                               "batch_per_rank": batch, "ranks_1": one, "ranks_2": two,
                               "scaling_efficiency": two / (2 * one)}
        print(f"training ResNet-{depth} {size}px batch {batch}/rank on CPU: 1 rank {one:.2f} "
              f"images/s (baseline), 2 ranks {two:.2f} images/s, scaling efficiency "
              f"{two / (2 * one):.2f}")
    os.makedirs(os.path.join(REPO, "bench", "out"), exist_ok=True)
    with open(os.path.join(REPO, "bench", "out", "train.json"), "w", encoding="utf-8") as out:
        json.dump(results, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
