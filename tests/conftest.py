"""Shared fixtures: one local Spark session per test run, and the upstream sample files."""
import os
import sys

import pytest

from mlimages import hierarchy, sources


@pytest.fixture(scope="session")
def spark():
    from mlimages.spark import build_session

    session = build_session("mlimages-tests", master="local[2]", conf={
        "spark.sql.shuffle.partitions": "4",
        "spark.default.parallelism": "4",
        "spark.ui.enabled": "false",
        "spark.driver.memory": "2g",
        "spark.driver.extraJavaOptions": "-XX:-DontCompileHugeMethods",  # as the profiles
    })
    yield session
    session.stop()


@pytest.fixture(scope="session")
def hierarchy_path():
    return sources.sample_file(sources.HIERARCHY)


@pytest.fixture(scope="session")
def sample_urls_path():
    return sources.sample_file(sources.TRAIN_URLS_TINY)


@pytest.fixture(scope="session")
def sample_photos():
    return [sources.sample_file(name) for name in sources.SAMPLE_PHOTOS]


@pytest.fixture(scope="session")
def class_hierarchy(hierarchy_path):
    return hierarchy.load_hierarchy(hierarchy_path)


@pytest.fixture(scope="session")
def python_env():
    """Environment for subprocesses (spark-submit, horovodrun) that must use this interpreter."""
    env = dict(os.environ)
    env["PYSPARK_PYTHON"] = sys.executable
    env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    return env
