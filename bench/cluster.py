"""Benchmark: how ingest + labels scale from 1 to 2 workers on a Spark standalone cluster.

Baseline: the same two jobs, same file, on a cluster of one one-core worker. The cluster runs on
127.0.0.1 (a master and N one-core workers from the pyspark distribution); the jobs go through
``spark-submit --py-files mlimages.zip`` on an interpreter without the editable install, as in
``tests/test_cluster.py``. Prints seconds, rows/s and the 2-worker/1-worker throughput ratio;
``body_s`` is the job's own time (session up to the end), ``wall_s`` adds the JVM launch.

  python bench/cluster.py --small              # 100k rows, about 10 minutes here
  python bench/cluster.py --rows 1000000
"""
import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from spark_standalone import StandaloneCluster, build_zip, clean_python  # noqa: E402

from mlimages import config, sources  # noqa: E402

OUT = os.path.join(ROOT, "bench", "out")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO mlimages\.(spark|runtime): "
                   r"(Spark .*|\w+ finished in .*)$", re.M)


def _generate():
    """``generate`` of bench/labels.py (the synthetic file of the published shape)."""
    spec = importlib.util.spec_from_file_location("bench_labels",
                                                  os.path.join(ROOT, "bench", "labels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate


def bench_profile(path: str, partitions: int) -> str:
    """conf/cluster.yaml sized for one-core workers of 2 GiB."""
    with open(os.path.join(config.CONF_DIR, "cluster.yaml")) as handle:
        profile = yaml.safe_load(handle)
    profile["spark"]["conf"].update({
        "spark.executor.memory": "1g", "spark.executor.memoryOverhead": "512m",
        "spark.executor.cores": 1, "spark.sql.shuffle.partitions": partitions})
    with open(path, "w") as handle:
        yaml.safe_dump(profile, handle)
    return path


def body_seconds(log_text: str) -> float:
    """From the session's start line to the job's 'finished' line (the job's own time)."""
    stamps = [datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
              for m in STAMP.finditer(log_text)]
    return (stamps[-1] - stamps[0]).total_seconds() if len(stamps) >= 2 else float("nan")


def run_jobs(cluster, data, work, shipped, profile) -> dict:
    zip_path, python = shipped
    hierarchy_path = sources.sample_file(sources.HIERARCHY)
    jobs = {
        "ingest": ["--hierarchy", hierarchy_path, "--output", f"{work}/ingest", data],
        "labels": ["--hierarchy", hierarchy_path, "--ingest", f"{work}/ingest",
                   "--output", f"{work}/labels"],
    }
    result = {}
    for job, args in jobs.items():
        log_path = f"{work}/{job}.log"
        started = time.time()
        # --master also as a job option: mlimages.spark does not read spark-submit's yet.
        done = cluster.submit(os.path.join(ROOT, "jobs", f"{job}.py"),
                              [*args, "--profile", profile, "--master", cluster.url],
                              zip_path, python, log_path)
        wall = time.time() - started
        with open(log_path, errors="replace") as handle:
            text = handle.read()
        if done.returncode != 0:
            sys.stderr.write(text[-5000:])
            raise SystemExit(f"{job} failed on {cluster.workers} worker(s)")
        result[job] = {"wall_s": round(wall, 1), "body_s": round(body_seconds(text), 1)}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--small", action="store_true", help="100k rows")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    rows = 100_000 if args.small else args.rows

    work_root = os.path.join(OUT, f"cluster_{rows}")
    shutil.rmtree(work_root, ignore_errors=True)
    os.makedirs(work_root)
    data = os.path.join(OUT, f"train_synthetic_{rows}_{args.seed}.txt")
    if not os.path.exists(data):
        _generate()(data, rows, args.seed)
    shipped = (build_zip(f"{work_root}/mlimages.zip"), clean_python(f"{OUT}/clean-venv"))
    profile = bench_profile(f"{work_root}/profile.yaml", partitions=8)

    result = {"rows": rows, "cores_on_machine": os.cpu_count(), "runs": {}}
    for workers in args.workers:
        folder = f"{work_root}/workers_{workers}"
        load_before = os.getloadavg()[0]
        with StandaloneCluster(f"{folder}/cluster", workers=workers, cores=1,
                               memory="2g") as cluster:
            run = run_jobs(cluster, data, folder, shipped, profile)
        run["body_s"] = round(sum(job["body_s"] for job in run.values()), 1)
        run["rows_per_s"] = round(rows / run["body_s"])
        run["rows_per_s_per_core"] = round(run["rows_per_s"] / workers)
        # Other work on the machine skews the ratio: keep the load next to each run.
        run["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        result["runs"][f"{workers}_workers"] = run
        print(f"{workers} worker(s): {json.dumps(run)}", flush=True)
    if {1, 2} <= set(args.workers):
        one, two = result["runs"]["1_workers"], result["runs"]["2_workers"]
        result["throughput_ratio_2_to_1"] = round(two["rows_per_s"] / one["rows_per_s"], 2)
    with open(os.path.join(OUT, f"cluster_{rows}.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
