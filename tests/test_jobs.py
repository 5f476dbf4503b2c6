"""The job entry points as users run them: spark-submit, the mlimages command, bad options."""
import json
import os
import subprocess
import sys

import pytest

from mlimages import cli, config, runtime
from mlimages_jobs import labels as labels_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARK_SUBMIT = os.path.join(os.path.dirname(sys.executable), "spark-submit")


def test_spark_submit_runs_ingest_then_labels(tmp_path, python_env, hierarchy_path,
                                              sample_urls_path):
    out = tmp_path / "run"
    jit = "spark.driver.extraJavaOptions=-XX:-DontCompileHugeMethods"
    for job, submit_conf, args in (("ingest", [], [sample_urls_path]),
                                   ("labels", ["--conf", jit], ["--ingest", str(out / "ingest")])):
        done = subprocess.run(
            [SPARK_SUBMIT, "--master", "local[1]", *submit_conf,
             os.path.join(ROOT, "jobs", f"{job}.py"),
             "--hierarchy", hierarchy_path, "--output", str(out / job), *args],
            env=python_env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        # spark-submit passes the Python driver's stderr on through its own stdout
        assert f"{job} finished" in done.stdout, done.stdout[-3000:]
        assert "master local[1]," in done.stdout  # spark-submit's master wins over the profile
        # The profile's driver JVM option cannot reach a JVM spark-submit already started.
        warned = "driver JVM runs without -XX:-DontCompileHugeMethods" in done.stdout
        assert warned == (not submit_conf), done.stdout[-3000:]
    summary = json.loads((out / "labels" / "_summary.json").read_text())
    assert (summary["tags_before"], summary["tags_after"]) == (827, 1103)


def test_mlimages_command_dispatches(capsys):
    assert cli.main(["--help"]) == 0
    assert "ingest" in capsys.readouterr().out
    assert cli.main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["labels", "--help"])
    assert exit_info.value.code == 0
    assert "spark-submit --master spark://" in capsys.readouterr().out


def test_bad_profile_and_spark_conf_are_user_errors(tmp_path, caplog, hierarchy_path):
    args = ["--ingest", str(tmp_path), "--hierarchy", hierarchy_path,
            "--output", str(tmp_path / "o")]
    assert labels_job._main([*args, "--profile", "nowhere"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("labels:\n  trainable_treshold: 5\n")
    assert labels_job._main([*args, "--profile", str(bad)]) == 2
    section = tmp_path / "section.yaml"
    section.write_text("lables:\n  trainable_threshold: 5\n")
    assert labels_job._main([*args, "--profile", str(section)]) == 2
    assert labels_job._main([*args, "--profile", str(tmp_path)]) == 2  # a folder
    messages = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "no profile 'nowhere'" in messages
    assert "unknown key(s) ['trainable_treshold']" in messages
    assert "unknown section(s) ['lables']" in messages
    assert "Is a directory" in messages


def test_bad_master_and_output_paths_are_user_errors(spark, tmp_path, caplog, hierarchy_path):
    from mlimages.spark import build_session

    # Checked before the JVM launcher sees it (jobs report a ConfigError in one line).
    with pytest.raises(config.ConfigError, match="Spark master 'lokal\\[2\\]'"):
        build_session("x", master="lokal[2]")
    args = ["--ingest", str(tmp_path), "--hierarchy", hierarchy_path]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert labels_job._main([*args, "--output", str(a_file)]) == 2
    assert labels_job._main([*args, "--output", str(tmp_path)]) == 2  # the ingest folder
    messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "is a file" in messages[0]
    assert "is the ingest folder" in messages[1]


def test_profiles_parse_and_name_known_sections():
    for name in ("local", "cluster"):
        profile = config.load_profile(name)
        assert {"spark", "ingest", "labels"} <= set(profile)
        assert config.spark_conf(profile)["spark.sql.adaptive.enabled"] == "true"


def test_driver_options_missing_from_the_running_jvm_are_named(spark, caplog):
    from mlimages.spark import warn_missing_driver_options

    assert warn_missing_driver_options(spark, "-XX:-DontCompileHugeMethods") == []
    assert not caplog.records
    missing = warn_missing_driver_options(spark, "-XX:-DontCompileHugeMethods -Dabsent.flag=1")
    assert missing == ["-Dabsent.flag=1"]
    assert "pass it to spark-submit" in caplog.text


def test_spark_conf_pairs_are_parsed_by_the_job_parser():
    parser = runtime.job_parser("x", "x", "")
    args = parser.parse_args(["--spark-conf", "spark.a = 1", "--spark-conf", "spark.b=x=y"])
    assert dict(args.spark_conf) == {"spark.a": "1", "spark.b": "x=y"}
