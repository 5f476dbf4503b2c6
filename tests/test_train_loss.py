"""The multi-label loss, schedule and config against independent NumPy / table values."""
import math

import numpy as np
import pytest

import mlimages.train  # noqa: F401  (Keras 2 before TensorFlow)
from mlimages.config import ConfigError
from mlimages.train import config, loss, metrics, schedule


def _numpy_step(labels, logits, pos, neg, uniform, tau=0.7, rho=0.1, w=12.0):
    """Upstream train.py written out per class, in plain Python/NumPy."""
    batch, classes = labels.shape
    new_pos, new_neg, coef = np.zeros(classes), np.zeros(classes), np.zeros(classes)
    for c in range(classes):
        present = any(labels[i, c] >= tau for i in range(batch))
        selected = uniform[c] <= rho
        if present:
            new_pos[c], new_neg[c] = pos[c] + 1, 0
            v = -math.log10((new_pos[c] + 0.01) / 10)
            coef[c] = v if v > 0.01 else 0.01
        else:
            new_pos[c], new_neg[c] = 0, neg[c] + (1 if selected else 0)
            v = -math.log10((new_neg[c] + 8) / 10)
            coef[c] = (v if v > 0.01 else 0.001) if selected else 0.0
    total = 0.0
    for c in range(classes):
        column = 0.0
        for i in range(batch):
            y, z = labels[i, c], logits[i, c]
            if y == -1:
                continue
            p = 1 / (1 + math.exp(-z))
            column += w * y * -math.log(p) + (1 - y) * -math.log(1 - p)
        total += coef[c] * column / batch
    return total, coef, new_pos, new_neg


def test_coefficient_values_match_the_upstream_table():
    positives = np.ones(10, np.float32)
    pos = np.arange(10, dtype=np.float32)  # updated counters become 1..10
    coef, _, _ = loss.coefficients(positives, pos, np.zeros(10, np.float32),
                                   np.ones(10, np.float32), 0.1)
    expected = [0.996, 0.697, 0.521, 0.397, 0.300, 0.221, 0.154, 0.096, 0.045, 0.01]
    np.testing.assert_allclose(coef.numpy(), expected, atol=5e-4)
    # Negative-only, selected: n=1 -> 0.0458, n>=2 -> 0.001; unselected -> 0.
    coef, _, new_neg = loss.coefficients(np.zeros(3, np.float32), np.zeros(3, np.float32),
                                         np.array([0, 1, 5], np.float32),
                                         np.array([0.05, 0.05, 0.5], np.float32), 0.1)
    np.testing.assert_allclose(coef.numpy(), [0.04576, 0.001, 0.0], atol=1e-4)
    np.testing.assert_array_equal(new_neg.numpy(), [1, 2, 5])


def test_loss_and_counters_match_numpy_over_several_steps():
    rng = np.random.default_rng(7)
    classes, batch = 40, 6
    module = loss.MultiLabelLoss(classes, global_counters=False)
    pos, neg = np.zeros(classes), np.zeros(classes)
    for step in range(5):
        labels = rng.choice([0.0, 0.0, 0.0, 0.8, 0.9, 1.0, -1.0], size=(batch, classes))
        labels[:, 0] = 1.0  # a class present in every batch: its coefficient decays
        logits = rng.normal(0, 3, size=(batch, classes)).astype(np.float32)
        weights = module.update(labels.astype(np.float32), step)
        got = float(module(labels.astype(np.float32), logits, weights))
        # The module's uniform draw is stateless: recompute it to feed the reference.
        import tensorflow as tf
        uniform = tf.random.stateless_uniform([classes], seed=tf.constant([1234, step],
                                                                         tf.int64)).numpy()
        want, coef, pos, neg = _numpy_step(labels, logits.astype(np.float64), pos, neg, uniform)
        np.testing.assert_allclose(weights.numpy(), coef, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(module.pos_counts.numpy(), pos)
        np.testing.assert_array_equal(module.neg_counts.numpy(), neg)
        assert got == pytest.approx(want, rel=1e-4)
    assert module.pos_counts.numpy()[0] == 5
    assert weights.numpy()[0] == pytest.approx(-math.log10(5.01 / 10), rel=1e-5)


def test_weight_decay_skips_batch_norm_in_pretraining():
    import tensorflow as tf

    from mlimages.train import resnet

    model = resnet.build_resnet(50, 10)
    got = float(loss.weight_decay(model.trainable_variables, 1e-4, 0.0, resnet.is_batch_norm))
    want = 1e-4 * sum(float((v.numpy().astype(np.float64) ** 2).sum()) / 2
                      for v in model.trainable_variables
                      if "gamma" not in v.name and "beta" not in v.name)
    assert got == pytest.approx(want, rel=1e-4)
    bn = [v for v in model.trainable_variables if resnet.is_batch_norm(v)]
    assert {v.name.rsplit("/", 1)[1] for v in bn} == {"gamma:0", "beta:0"}
    assert "logits/bias:0" in {v.name for v in model.trainable_variables
                               if not resnet.is_batch_norm(v)}
    del tf


def test_upstream_parameter_counts():
    from mlimages.train import resnet

    def count(model):
        return sum(int(np.prod(v.shape)) for v in model.trainable_variables)

    assert count(resnet.build_resnet(101, 1000)) == 44_545_192
    assert count(resnet.build_resnet(101, 11166)) == 65_375_326


@pytest.mark.parametrize("step,rate", [
    (0, 0.01), (4399, 0.01), (4400, 0.01297), (8800, 0.016822), (30800, 0.061742),
    (35199, 0.061742), (35200, 0.08), (110000, 0.08), (110001, 0.008), (220001, 0.0008),
    (330001, 8e-5), (440001, 8e-6)])
def test_pretrain_schedule_matches_the_upstream_table(step, rate):
    c = config.PretrainConfig().schedule
    assert schedule.learning_rate(c, step) == pytest.approx(rate, rel=1e-4)
    assert schedule.learning_rate(c, step, ranks=4) == pytest.approx(4 * rate, rel=1e-4)
    graph = float(schedule.UpstreamSchedule(c, 4)(step))
    assert graph == pytest.approx(4 * rate, rel=1e-4)


def test_finetune_schedule_is_staircase():
    c = config.FinetuneConfig().schedule
    assert [schedule.learning_rate(c, s) for s in (0, 149999, 150000, 450000)] == \
        pytest.approx([0.1, 0.1, 0.01, 1e-4])
    assert float(schedule.UpstreamSchedule(c)(300000)) == pytest.approx(0.001)


def test_config_layers_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model: {depth: 50}\ndata: {batch_size: 8, augment: {flip: false}}\n")
    c = config.load(config.PretrainConfig, str(path), ["data.batch_size=4", "run.max_steps=9"])
    assert (c.model.depth, c.data.batch_size, c.run.max_steps) == (50, 4, 9)
    assert c.data.augment.flip is False and c.data.augment.area_range == (0.7, 1.0)
    f = config.load(config.FinetuneConfig, "", ["data.image_size=64"])
    assert f.data.augment.area_range == (0.05, 1.0) and f.model.num_classes == 1000
    # A command-line mistake is named as an override, not blamed on the YAML file.
    with pytest.raises(ConfigError, match=r"^override\.model: unknown key"):
        config.load(config.PretrainConfig, str(path), ["model.dept=50"])
    with pytest.raises(ConfigError, match=r"^override\.run\.max_steps: 'ten' is not a valid int"):
        config.load(config.PretrainConfig, str(path), ["run.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"bad\.yaml\.data: unknown key"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("data: {batch_sise: 8}\n")
        config.load(config.PretrainConfig, str(bad), [])
    with pytest.raises(ConfigError, match="depth"):
        config.load(config.PretrainConfig, "", ["model.depth=34"])
    config.save(c, str(tmp_path / "run"), "pretrain")
    kind, back = config.load_saved(str(tmp_path / "run"))
    assert kind == "pretrain" and back == c


def test_conf_files_load():
    import glob
    import os

    files = glob.glob(os.path.join(os.path.dirname(__file__), "..", "conf", "train", "*.yaml"))
    assert files
    for path in files:
        cls = config.FinetuneConfig if "finetune" in path else config.PretrainConfig
        config.load(cls, path)


def test_average_precision_against_hand_values():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    # positives at ranks 1 and 3: (1/1 + 2/3) / 2
    assert metrics.average_precision(scores, np.array([1, 0, 1, 0], bool)) == \
        pytest.approx((1 + 2 / 3) / 2)
    assert metrics.precision_recall_f1(3, 1, 2) == pytest.approx((0.75, 0.6, 2 / 3))
    assert metrics.topk_hits(np.array([[0.1, 0.5, 0.4], [0.9, 0.0, 0.1]]), np.array([2, 1]),
                             2) == 1


def test_classify_sigmoid_is_stable_at_extreme_logits():
    from mlimages.train import classify

    logits = np.array([-1000.0, -20.0, 0.0, 20.0, 1000.0])
    with np.errstate(over="raise", invalid="raise"):
        got = classify._sigmoid(logits)
    assert got == pytest.approx([0.0, 1 / (1 + np.exp(20.0)), 0.5, 1 / (1 + np.exp(-20.0)), 1.0])
