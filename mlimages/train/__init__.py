"""Training stage: ResNet pre-training with Horovod on the Petastorm dataset, fine-tuning,
classification and feature extraction.

Keras 2 (``tf_keras``) is selected before TensorFlow is imported: Horovod 0.28.1's gradient
helpers fail on Keras 3 variables (see docs/train.md).
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
