"""Training end to end with ``horovodrun -np 2 --gloo`` on a small uneven Petastorm dataset:
ResNet-101 pre-training at 64 px, resume, fine-tuning from it, classify and extract-features."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("horovod.tensorflow", reason="Horovod is built by `make setup`")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOROVODRUN = os.path.join(os.path.dirname(sys.executable), "horovodrun")
# Train files of 9, 3 and 5 rows over 2 ranks: the odd total makes the shards uneven whatever
# order the files are listed in, and an epoch is 17 // (2 ranks x batch 2) = 4 steps.
TRAIN_FILES = (9, 3, 5)
VAL_ROWS = 4
RUN_TIMEOUT = 420  # a hang fails the test instead of blocking the suite

pytestmark = pytest.mark.slow


def _horovodrun(args, env, timeout=RUN_TIMEOUT):
    command = [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo",
               sys.executable, "-W", "ignore"] + args
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def _cli(args, env):
    command = [sys.executable, "-W", "ignore", "-m", "mlimages.train"] + args
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, spark):
    from mlimages.train.sample import write_sample_dataset

    path = str(tmp_path_factory.mktemp("train") / "dataset")
    write_sample_dataset(spark, path, TRAIN_FILES, VAL_ROWS)
    return path


@pytest.fixture(scope="module")
def pretrained(dataset, tmp_path_factory, python_env):
    """Three steps of pre-training through the CLI, checkpoints at steps 2 and 3."""
    model_dir = str(tmp_path_factory.mktemp("pretrain") / "run")
    output = _horovodrun(["-m", "mlimages.train", "pretrain", "--config", "conf/train/tiny.yaml",
                          f"data.train_url={dataset}", f"data.val_url={dataset}",
                          f"run.model_dir={model_dir}"], python_env)
    return model_dir, output


def test_pretrain_writes_checkpoints_config_and_metrics(pretrained):
    import tensorflow as tf

    model_dir, output = pretrained
    assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-3")
    assert os.path.exists(os.path.join(model_dir, "ckpt-2.index"))
    assert "[0]<stderr>" in output and "checkpoint" in output
    assert not [line for line in output.splitlines()
                if line.startswith("[1]") and "checkpoint /" in line]
    rows = _metrics(model_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows if "loss" in r)
    final = rows[-1]
    assert final["val_images"] == VAL_ROWS and 0 <= final["val_mAP"] <= 1
    # The loss counters and the data position are in the checkpoint.
    names = {name for name, _ in tf.train.list_variables(tf.train.latest_checkpoint(model_dir))}
    assert any(name.startswith("loss_counters/pos_counts") for name in names)
    assert any(name.startswith("epoch_step") for name in names)


def test_resume_continues_with_equal_weights_and_uneven_shards(pretrained, dataset, tmp_path,
                                                               python_env):
    import tensorflow as tf

    from mlimages.train import config, schedule
    from mlimages.train import input as train_input

    model_dir = str(tmp_path / "run")
    shutil.copytree(pretrained[0], model_dir)
    saved = tf.train.load_checkpoint(os.path.join(model_dir, "ckpt-3"))
    counters = saved.get_tensor("loss_counters/pos_counts/.ATTRIBUTES/VARIABLE_VALUE")
    report_dir = str(tmp_path / "reports")
    os.makedirs(report_dir)
    # Steps 4 and 5 cross the epoch boundary (4 steps per epoch).
    _horovodrun(["tests/train_horovod_script.py", report_dir, "resume",
                 f"data.train_url={dataset}", f"data.val_url={dataset}",
                 f"run.model_dir={model_dir}", "run.max_steps=5"], python_env)
    ranks = [json.load(open(os.path.join(report_dir, f"rank{r}.json"))) for r in (0, 1)]
    for report in ranks:
        assert report["start_step"] == 3 and report["step"] == 5
        assert (report["epoch"], report["epoch_step"]) == (1, 1)
        np.testing.assert_array_equal(report["start_pos_counts"], counters)
    assert [r["can_checkpoint"] for r in ranks] == [True, False]
    np.testing.assert_allclose(ranks[0]["weights"], ranks[1]["weights"], rtol=0, atol=0)
    assert ranks[0]["pos_counts"] == ranks[1]["pos_counts"]
    assert ranks[0]["result"] == ranks[1]["result"]
    rows = [r for r in _metrics(model_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    tiny = config.load(config.PretrainConfig, os.path.join(REPO, "conf/train/tiny.yaml"))
    assert rows[3]["lr"] == pytest.approx(schedule.learning_rate(tiny.schedule, 3, 2))
    assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-5")
    # The shards really were uneven.
    shards = [train_input.shard_rows(dataset, r, 2, "train") for r in (0, 1)]
    assert sum(shards) == sum(TRAIN_FILES) and shards[0] != shards[1]


@pytest.fixture(scope="module")
def finetuned(pretrained, dataset, tmp_path_factory, python_env):
    model_dir = str(tmp_path_factory.mktemp("finetune") / "run")
    _horovodrun(["-m", "mlimages.train", "finetune", "--config", "conf/train/tiny.yaml",
                 f"data.train_url={dataset}", f"data.val_url={dataset}",
                 "model.num_classes=1000", f"finetune.pretrained={pretrained[0]}",
                 f"run.model_dir={model_dir}", "run.max_steps=2",
                 "finetune.high_res_from_step=1", "finetune.high_res_size=72"], python_env)
    return model_dir


def test_finetune_restores_all_but_the_head(finetuned, pretrained):
    import tensorflow as tf

    before = tf.train.load_checkpoint(tf.train.latest_checkpoint(pretrained[0]))
    after = tf.train.load_checkpoint(tf.train.latest_checkpoint(finetuned))
    shapes = dict(tf.train.list_variables(tf.train.latest_checkpoint(finetuned)))
    kernels = [n for n in shapes if n.endswith("kernel/.ATTRIBUTES/VARIABLE_VALUE")]
    head = [n for n in kernels if shapes[n] == [2048, 1000]]
    assert len(head) == 1
    # FixBlock2: the stem kernel is frozen, so it is still the pre-trained one.
    stem = [n for n in kernels if shapes[n] == [7, 7, 3, 64]][0]
    np.testing.assert_array_equal(after.get_tensor(stem), before.get_tensor(stem))
    rows = _metrics(finetuned)
    assert rows[-1]["val_images"] == VAL_ROWS and 0 <= rows[-1]["val_top1"] <= 1


def _image_list(tmp_path, sample_photos):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(sample_photos + [str(broken), str(tmp_path / "missing.jpg")])
                       + "\n")
    return str(listing), str(broken)


def test_classify_sample_photos_with_the_finetuned_model(finetuned, sample_photos, tmp_path,
                                                         python_env):
    listing, broken = _image_list(tmp_path, sample_photos)
    out = str(tmp_path / "label_pred.txt")
    _cli(["classify", "--model", finetuned, "--images", listing, "--output", out,
          "--image-size", "64"], python_env)
    text = open(out, encoding="utf-8").read().splitlines()
    headers = [i for i, line in enumerate(text) if line.startswith("+++ the predictions of ")]
    assert len(headers) == 6
    results = json.load(open(str(tmp_path / "label_pred.json"), encoding="utf-8"))
    good = [r for r in results if not r["error"]]
    assert [r["path"] for r in good] == sample_photos
    for result in good:
        scores = [p["score"] for p in result["predictions"]]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)
        assert all(0 <= s <= 1 for s in scores) and all(p["class"] < 1000
                                                          for p in result["predictions"])
    assert {r["path"] for r in results if r["error"]} == {broken, str(tmp_path / "missing.jpg")}
    # Readable ImageNet names: every word of the dictionary line, not only the first.
    first = good[0]["predictions"][0]
    line = open(_imagenet_dictionary()).read().splitlines()[first["class"]]
    assert first["name"] == " ".join(line.split("\t")[1:])
    assert text[headers[0] + 1] == (f"{first['class']} {first['name']}: "
                                    f"{first['score']:.3f}")


def _imagenet_dictionary():
    from mlimages import sources

    return sources.sample_file(sources.IMAGENET_DICTIONARY)


def test_classify_with_the_multilabel_model_uses_sigmoid_and_hierarchy_names(
        pretrained, sample_photos, tmp_path, python_env):
    from mlimages import hierarchy, sources

    out = str(tmp_path / "pred.txt")
    _cli(["classify", "--model", pretrained[0], "--images", os.path.dirname(sample_photos[0]),
          "--output", out, "--top-k", "3", "--image-size", "64"], python_env)
    results = json.load(open(str(tmp_path / "pred.json"), encoding="utf-8"))
    names = hierarchy.load_hierarchy(sources.sample_file(sources.HIERARCHY)).classes
    assert len(results) == 4 and not any(r["error"] for r in results)
    for result in results:
        for p in result["predictions"]:
            assert p["name"] == names[p["class"]].name and 0 <= p["score"] <= 1


def test_extract_features_of_sample_photos(pretrained, sample_photos, tmp_path, python_env):
    listing, broken = _image_list(tmp_path, sample_photos)
    out = str(tmp_path / "features.parquet")
    _cli(["extract-features", "--model", pretrained[0], "--images", listing, "--output", out,
          "--image-size", "64"], python_env)
    table = pq.read_table(out).to_pylist()
    assert [r["path"] for r in table[:4]] == sample_photos
    for row in table[:4]:
        vector = np.array(row["features"])
        assert vector.shape == (2048,) and (vector >= 0).all() and row["error"] is None
    assert table[4]["features"] is None and table[4]["error"]
