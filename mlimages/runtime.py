"""What every job entry point shares: its argument parser, logging, profile and summary file."""
import argparse
import json
import logging
import os
import sys
import time

from mlimages import config, hierarchy, spark

log = logging.getLogger(__name__)

EPILOG = """examples:
  python jobs/{job}.py {example}
  spark-submit --master spark://host:7077 jobs/{job}.py --profile cluster {example}"""


class UserError(Exception):
    """A mistake in the job's input or options; reported as one line, without a stack trace."""


# OS errors about paths the user named (a folder given for a file, no permission) count too.
USER_ERRORS = (UserError, config.ConfigError, hierarchy.HierarchyError, FileNotFoundError,
               IsADirectoryError, NotADirectoryError, PermissionError)


def job_parser(job: str, description: str, example: str) -> argparse.ArgumentParser:
    """A parser with the options every job has (profile, Spark, log level)."""
    parser = argparse.ArgumentParser(
        prog=f"jobs/{job}.py", description=description,
        epilog=EPILOG.format(job=job, example=example),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=config.DEFAULT_PROFILE,
                        help="profile name in conf/ or a YAML path (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    spark.add_spark_arguments(parser)
    return parser


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes: notebooks and test runners
    replace it, and a handler bound to the old stream would write to a closed file."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(level: str = "INFO") -> None:
    """Sends this package's log records to stderr at ``level``.

    The handler sits on the package logger rather than the root logger, because PySpark and
    test runners may configure the root logger before a job starts.
    """
    package = logging.getLogger("mlimages")
    package.setLevel(level.upper())
    if not any(getattr(h, "mlimages_handler", False) for h in package.handlers):
        handler = StderrHandler()
        handler.mlimages_handler = True
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)


def run(job: str, args, body) -> int:
    """Runs ``body(session, profile)`` in a session built from ``args``; returns an exit code.

    User mistakes (:class:`UserError`, config and input errors) end the job with one line on
    the log and exit code 2, not with a stack trace.
    """
    setup_logging(args.log_level)
    started = time.time()
    try:
        output = getattr(args, "output", None)
        if output and os.path.isfile(output.removeprefix("file://")):
            raise UserError(f"--output {output} is a file; expected a folder")
        profile = config.load_profile(args.profile)
        # an explicit --master, then spark-submit's, then the profile's
        master = args.master or spark.launcher_master() or config.spark_master(profile)
        args.master = master
        with spark.session_from_args(args, f"mlimages-{job}", config.spark_conf(profile)) as ss:
            body(ss, profile)
    except USER_ERRORS as err:
        log.error("%s failed: %s", job, err)
        return 2
    except Exception as err:  # Spark reports a missing input as an analysis error
        if getattr(err, "getCondition", lambda: None)() != "PATH_NOT_FOUND":
            raise
        log.error("%s failed: %s", job, str(err).splitlines()[0])
        return 2
    log.info("%s finished in %.1f s", job, time.time() - started)
    return 0


def write_summary(folder: str, summary: dict) -> str:
    """Writes ``_summary.json`` into a local output folder (skipped for remote URIs)."""
    if "://" in folder and not folder.startswith("file://"):
        return ""
    folder = folder.removeprefix("file://")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "_summary.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2, sort_keys=True)
    return path


def read_summary(folder: str) -> dict:
    with open(os.path.join(folder.removeprefix("file://"), "_summary.json"),
              encoding="utf-8") as handle:
        return json.load(handle)
