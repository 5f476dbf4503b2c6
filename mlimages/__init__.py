"""mlimages: build the Tencent ML-Images dataset with Spark and train ResNet-101 on it."""

__version__ = "0.1.0"
