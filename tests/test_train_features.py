"""extract-features over a whole Petastorm dataset, distributed with Spark (no Horovod)."""
import os

import numpy as np
import pytest

import mlimages.train  # noqa: F401  (Keras 2 before TensorFlow)
from mlimages.train import config, features, resnet
from mlimages.train.sample import write_sample_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A randomly initialised ResNet-50 saved like a training run (checkpoint + config.yaml)."""
    import tensorflow as tf

    folder = str(tmp_path_factory.mktemp("model"))
    c = config.load(config.PretrainConfig, "", ["model.depth=50", "model.num_classes=10",
                                                "model.bn_momentum=0.5"])
    model = resnet.build_resnet(50, 10)
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model), folder, 1,
                               checkpoint_name="ckpt").save(checkpoint_number=1)
    config.save(c, folder, "pretrain")
    return folder


def test_extract_dataset_with_spark_matches_in_process_features(spark, model_dir, tmp_path):
    dataset = str(tmp_path / "dataset")
    write_sample_dataset(spark, dataset, (5, 3), val_rows=2)
    output = str(tmp_path / "features")
    counts = features.extract_dataset(spark, model_dir, dataset, output, image_size=64,
                                      batch_size=4)
    assert counts == {"images": 10, "extracted": 10, "failed": 0}
    rows = {r.image_id: r for r in spark.read.parquet(output).collect()}
    assert sorted(rows) == list(range(10))
    # Independent check of one row: decode and run the restored model in this process.
    from mlimages.train import classify
    from mlimages.train.finetune import restore_model

    source = spark.read.parquet(dataset).where("image_id = 7").first()
    model, _, _ = restore_model(model_dir)
    import io
    image = classify.load_image(io.BytesIO(source.image), 64)
    want = resnet.features_model(model)(image[None], training=False)[0].numpy()[0]
    got = np.array(rows[7].features)
    assert got.shape == (2048,) and (got >= 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert os.path.exists(os.path.join(output, "_SUCCESS"))
