"""One way to get a SparkSession for every job: master, app name and ``--spark-conf`` pairs.

Library functions take the session as an argument; only the job entry points call
:func:`session_from_args` and stop what they started.
"""
import argparse
import contextlib
import logging
import os
import re
import sys

from mlimages.config import ConfigError

log = logging.getLogger(__name__)

_QUIET_LOGGERS = ("py4j", "pyspark")


# The master URL forms Spark accepts; anything else would fail inside the JVM launcher.
MASTER_URL = re.compile(r"^(local(\[(\d+|\*)(,\s*\d+)?\])?|local-cluster\[[\d,\s]+\]"
                        r"|(spark|k8s|sc)://\S+|yarn)$")


def add_spark_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the Spark options shared by all jobs to ``parser``."""
    group = parser.add_argument_group("spark")
    group.add_argument(
        "--master", default=None,
        help="Spark master URL; default: the one spark-submit gives, else the profile's")
    group.add_argument(
        "--spark-conf", action="append", default=[], metavar="KEY=VALUE", type=conf_pair,
        help="extra Spark setting, repeatable (overrides the profile)")


def conf_pair(text: str) -> tuple:
    """argparse type of ``--spark-conf``: ``"k=v"`` -> ``("k", "v")``; a malformed pair is a
    usage error, not a trace."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def launcher_master():
    """The master spark-submit passed to this driver, if it was launched that way."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        return None
    from pyspark import SparkConf, SparkContext

    # SparkConf reads spark-submit's settings from the JVM only once it is connected.
    SparkContext._ensure_initialized()
    return SparkConf().get("spark.master", None)


def build_session(app_name: str, master=None, conf=None):
    """Creates (or reuses) a SparkSession.

    The master is, in order: ``master``, the one spark-submit set, ``local[2]``.
    Executors run the driver's interpreter unless ``PYSPARK_PYTHON`` says otherwise,
    because workers on another interpreter cannot import this package.
    """
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    chosen = master or launcher_master() or "local[2]"
    if not MASTER_URL.match(chosen):
        raise ConfigError(f"Spark master {chosen!r}: expected local, local[N], local[*], "
                          "spark://host:port, yarn or k8s://https://host:port")
    builder = SparkSession.builder.appName(app_name).master(chosen)
    for key, value in (conf or {}).items():
        builder = builder.config(key, str(value))
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    warn_missing_driver_options(session, (conf or {}).get("spark.driver.extraJavaOptions", ""))
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    log.info("Spark %s, master %s, app %s", session.version, chosen, app_name)
    return session


def warn_missing_driver_options(session, options: str) -> list:
    """Logs, and returns, the JVM options asked for the driver that its JVM did not start with.

    spark-submit starts the driver JVM before the job reads its profile, so a profile's
    ``spark.driver.extraJavaOptions`` only applies when it is given to spark-submit itself.
    """
    runtime = session.sparkContext._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean()
    started_with = set(runtime.getInputArguments())
    missing = [option for option in options.split() if option not in started_with]
    if missing:
        log.warning("the driver JVM runs without %s; pass it to spark-submit: --conf "
                    "spark.driver.extraJavaOptions=%s (see README, Benchmarks)",
                    " ".join(missing), options)
    return missing


@contextlib.contextmanager
def session_from_args(args, app_name: str, profile_conf=None):
    """Context manager giving the session described by parsed job arguments; stops it after."""
    from pyspark.sql import SparkSession

    conf = dict(profile_conf or {})
    conf.update(args.spark_conf)  # (key, value) pairs, parsed by conf_pair
    existing = SparkSession.getActiveSession()
    session = existing or build_session(app_name, master=args.master, conf=conf)
    try:
        yield session
    finally:
        if existing is None:  # a session handed in by the caller is the caller's to stop
            session.stop()
