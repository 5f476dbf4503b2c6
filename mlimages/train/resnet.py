"""The upstream pre-activation bottleneck ResNet (models/resnet.py), channels-last, in tf_keras.

Quirks kept on purpose (they define the published checkpoints): a 7x7 stem conv without BN or
ReLU and no max-pool; the first block of *every* stage strides by 2, on its 3x3 conv; the
projection shortcut has its own BN-ReLU; no activation after the residual add; head
BN-ReLU-global average pool-dense. Layer names follow the upstream variable scopes with ``/``
replaced by ``.`` (see :func:`upstream_name`), so the TF1 checkpoints can be mapped by name.
"""
import logging

import tf_keras as keras

log = logging.getLogger(__name__)

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGE_CHANNELS = (256, 512, 1024, 2048)
FEATURES_LAYER = "global_pool.gap"
LOGITS_LAYER = "logits"
# Stages whose variables FixBlock2 fine-tuning keeps training (plus the head).
LATE_SCOPES = ("stages_2_", "stages_3_", "global_pool.", LOGITS_LAYER)


def _conv(x, filters: int, kernel: int, stride: int, name: str):
    # Upstream pads strided convs explicitly and symmetrically (TF "SAME" pads asymmetrically).
    padding = "same"
    if stride > 1:
        pad = kernel - 1
        x = keras.layers.ZeroPadding2D(((pad // 2, pad - pad // 2),) * 2, name=name + ".pad")(x)
        padding = "valid"
    return keras.layers.Conv2D(
        filters, kernel, strides=stride, padding=padding, use_bias=False,
        kernel_initializer=keras.initializers.VarianceScaling(
            scale=1.0, mode="fan_in", distribution="truncated_normal"),
        name=name)(x)


def _bn_relu(x, name: str, momentum: float, epsilon: float):
    x = keras.layers.BatchNormalization(momentum=momentum, epsilon=epsilon, name=name)(x)
    return keras.layers.ReLU(name=name + ".relu")(x)


def _bottleneck(x, channels: int, stride: int, project: bool, scope: str, bn: dict):
    shortcut = x
    if project:
        shortcut = _bn_relu(x, f"{scope}.conv1_b1_bn", **bn)
        shortcut = _conv(shortcut, channels, 1, stride, f"{scope}.conv1_b1")
    y = _bn_relu(x, f"{scope}.conv1_b2_bn", **bn)
    y = _conv(y, channels // 4, 1, 1, f"{scope}.conv1_b2")
    y = _bn_relu(y, f"{scope}.conv2_b2_bn", **bn)
    y = _conv(y, channels // 4, 3, stride, f"{scope}.conv2_b2")
    y = _bn_relu(y, f"{scope}.conv3_b2_bn", **bn)
    y = _conv(y, channels, 1, 1, f"{scope}.conv3_b2")
    return keras.layers.Add(name=f"{scope}.add")([y, shortcut])


def build_resnet(depth: int = 101, num_classes: int = 11166, bn_momentum: float = 0.997,
                 bn_epsilon: float = 1e-5, name: str = "") -> keras.Model:
    """A channels-last ResNet taking [-1, 1] images of any size; outputs float32 logits.

    Mixed precision follows the global Keras policy set by the caller; logits and features
    are cast back to float32.
    """
    if depth not in BLOCKS:
        raise ValueError(f"ResNet depth must be one of {sorted(BLOCKS)}, got {depth}")
    bn = {"momentum": bn_momentum, "epsilon": bn_epsilon}
    images = keras.Input(shape=(None, None, 3), name="images")
    x = _conv(images, 64, 7, 2, "init.init_conv")
    for stage, blocks in enumerate(BLOCKS[depth]):
        channels = STAGE_CHANNELS[stage]
        for block in range(blocks):
            first = block == 0
            x = _bottleneck(x, channels, 2 if first else 1, first,
                            f"stages_{stage}_block_{block}", bn)
    x = _bn_relu(x, "global_pool.bn", **bn)
    features = keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER, dtype="float32")(x)
    logits = keras.layers.Dense(num_classes, name=LOGITS_LAYER, dtype="float32")(features)
    return keras.Model(images, logits, name=name or f"resnet{depth}")


def features_model(model: keras.Model) -> keras.Model:
    """The same network returning (2048-d post-ReLU pooled features, logits)."""
    return keras.Model(model.input, [model.get_layer(FEATURES_LAYER).output, model.output])


def is_batch_norm(variable) -> bool:
    return "_bn/" in variable.name or "global_pool.bn/" in variable.name


def is_late(variable) -> bool:
    """True for variables FixBlock2 fine-tuning trains (stages 2-3, final BN, head)."""
    return variable.name.startswith(LATE_SCOPES)


def upstream_name(variable) -> str:
    """The TF1 variable name of ``variable`` in the upstream checkpoints, e.g.
    ``stages_0_block_0/conv1_b1_bn/batch_normalization/gamma``."""
    layer, weight = variable.name.split(":")[0].rsplit("/", 1)
    if layer == LOGITS_LAYER:
        return f"logits/dense/{weight}"
    kind = "batch_normalization" if layer.endswith("bn") else "conv2d"
    return f"{layer.replace('.', '/')}/{kind}/{weight}"


def load_upstream_checkpoint(model: keras.Model, prefix: str, skip_head: bool = False) -> int:
    """Assigns the variables of a TF1 upstream checkpoint (``model.ckpt``) by name.

    Returns the number of variables loaded; raises ValueError on a missing name or shape.
    """
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    loaded = 0
    for variable in model.variables:
        name = upstream_name(variable)
        if skip_head and name.startswith("logits/"):
            continue
        if name not in shapes:
            raise ValueError(f"{prefix}: no variable {name}")
        if list(shapes[name]) != variable.shape.as_list():
            raise ValueError(f"{prefix}: {name} has shape {shapes[name]}, "
                             f"the model expects {variable.shape.as_list()}")
        variable.assign(reader.get_tensor(name))
        loaded += 1
    log.info("loaded %d variables from upstream checkpoint %s", loaded, prefix)
    return loaded
