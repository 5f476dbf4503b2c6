"""Benchmark: ingest + labels on a synthetic annotation file of the published shape and size.

Baseline: the same work (parse, explode, closure join, aggregate, write Parquet) as one DuckDB
query on the same machine and the same file. Prints rows/s for both, the Spark/DuckDB time
ratio, and the peak memory (RSS) of the Spark process tree.

  python bench/labels.py --rows 1000000          # about 10 minutes here
  python bench/labels.py --rows 17609752         # full size
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mlimages import hierarchy, sources  # noqa: E402

OUT = os.path.join(ROOT, "bench", "out")
IMAGENET_SHARE = 10_706_941 / 17_609_752  # published split between the two sources
UNCLOSED_SHARE = 0.1  # rows whose 0.9 labels carry only the direct parent (not closed)
BAD_ROW_EVERY = 10_000  # one defective row per this many


def _class_terms(classes):
    """Per class: the closed term string (all ancestors, conf 1) and an unclosed variant."""
    parents = classes.parents()
    closed, unclosed = [], []
    for cls in range(len(parents)):
        chain, node = [], cls
        while node != -1:
            chain.append(node)
            node = parents[node]
        closed.append("\t".join(f"{c}:1" for c in chain))
        unclosed.append("\t".join(f"{c}:0.9" for c in chain[:2]))
    return closed, unclosed


def generate(path: str, rows: int, seed: int) -> None:
    """Writes a seeded synthetic annotation file of ``rows`` rows."""
    classes = hierarchy.load_hierarchy(sources.sample_file(sources.HIERARCHY))
    closed, unclosed = _class_terms(classes)
    wnids = [c.wnid for c in classes.classes]
    rng = np.random.default_rng(seed)
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8") as out:
        for start in range(0, rows, 500_000):
            n = min(500_000, rows - start)
            picks = rng.integers(0, len(wnids), n)
            extra = rng.integers(0, len(wnids), n)
            open_rows = rng.random(n) < UNCLOSED_SHARE
            lines = []
            for i in range(n):
                row = start + i
                cls = int(picks[i])
                if row < rows * IMAGENET_SHARE:
                    key = f"{wnids[cls]}/{wnids[cls]}_{row}.JPEG"
                else:
                    key = f"https://c{row % 9}.staticflickr.com/{row % 7919}/{row}_o.jpg"
                terms = unclosed[cls] if open_rows[i] else closed[cls]
                if row % BAD_ROW_EVERY == 17:
                    terms += f"\t{int(extra[i]) + 20000}:1\t{int(extra[i])}:abc"
                if row % BAD_ROW_EVERY == 29:
                    key = f"ftp://bad.example/{row}.jpg"
                lines.append(f"{key}\t{terms}\n")
            out.write("".join(lines))
    os.replace(tmp, path)


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{current}/task/{current}/children") as handle:
                stack.extend(int(c) for c in handle.read().split())
        except OSError:
            continue
    return total


def _run_measured(cmd, env=None):
    """Runs ``cmd``; returns (seconds, peak RSS bytes of its process tree)."""
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    peak = [0]

    def poll():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.5)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        sys.stderr.write(err[-5000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.time() - started, peak[0]


def run_spark(data: str, work: str, driver_memory: str):
    hierarchy_path = sources.sample_file(sources.HIERARCHY)
    spark_args = ["--spark-conf", f"spark.driver.memory={driver_memory}",
                  "--spark-conf", "spark.sql.shuffle.partitions=16",
                  "--log-level", "WARNING"]
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    ingest_s, ingest_rss = _run_measured(
        [sys.executable, os.path.join(ROOT, "jobs", "ingest.py"), "--hierarchy", hierarchy_path,
         "--output", f"{work}/ingest", data, *spark_args], env)
    labels_s, labels_rss = _run_measured(
        [sys.executable, os.path.join(ROOT, "jobs", "labels.py"), "--hierarchy", hierarchy_path,
         "--ingest", f"{work}/ingest", "--output", f"{work}/labels", *spark_args], env)
    # The stats job is timed beside them (its budget is the labels job's), not in the ratio.
    stats_s, stats_rss = _run_measured(
        [sys.executable, os.path.join(ROOT, "jobs", "stats.py"), "--hierarchy", hierarchy_path,
         "--labels", f"{work}/labels", "--ingest", f"{work}/ingest",
         "--output", f"{work}/stats", *spark_args], env)
    return {"ingest_s": round(ingest_s, 1), "labels_s": round(labels_s, 1),
            "seconds": round(ingest_s + labels_s, 1), "stats_s": round(stats_s, 1),
            "peak_rss_gib": round(max(ingest_rss, labels_rss, stats_rss) / 2**30, 2)}


DUCKDB_QUERY = """
COPY (
  WITH lines AS (
    SELECT row_number() OVER () AS line_number, line
    FROM read_csv('{data}', columns={{'line': 'VARCHAR'}}, delim='\\x01', header=false,
                  quote='', escape='', auto_detect=false)),
  fields AS (
    SELECT line_number, string_split_regex(trim(line), '\\s+') AS f
    FROM lines WHERE trim(line) <> ''),
  keyed AS (
    SELECT line_number, f[1] AS key, hash(f[1]) AS image_id, f[2:] AS terms FROM fields
    WHERE regexp_matches(f[1], '^(https?://|n[0-9]{{8}}/)')),
  terms AS (SELECT image_id, unnest(terms) AS t FROM keyed),
  parsed AS (
    SELECT image_id, TRY_CAST(split_part(t, ':', 1) AS INTEGER) AS class,
           COALESCE(TRY_CAST(NULLIF(split_part(t, ':', 2), '') AS FLOAT), 1.0) AS confidence
    FROM terms),
  good AS (
    SELECT * FROM parsed
    WHERE class BETWEEN 0 AND {max_class} AND confidence > 0 AND confidence <= 1),
  augmented AS (
    SELECT image_id, c.ancestor AS class, max(confidence) AS confidence
    FROM good JOIN closure c USING (class) GROUP BY ALL)
  SELECT image_id, list(class ORDER BY class) AS classes,
         list(confidence ORDER BY class) AS confidences
  FROM augmented GROUP BY image_id
) TO '{out}' (FORMAT parquet, COMPRESSION zstd)
"""


def run_duckdb(data: str, work: str, memory: str):
    """The baseline in a child process, so its memory is measured the same way."""
    classes = hierarchy.load_hierarchy(sources.sample_file(sources.HIERARCHY))
    parents = classes.parents()
    pairs = []
    for cls in range(len(parents)):
        node = cls
        while node != -1:
            pairs.append((cls, node))
            node = parents[node]
    closure_csv = f"{work}/closure.csv"
    with open(closure_csv, "w") as handle:
        handle.write("class,ancestor\n" + "".join(f"{c},{a}\n" for c, a in pairs))
    query = DUCKDB_QUERY.format(data=data, out=f"{work}/duckdb.parquet",
                                max_class=len(parents) - 1)
    script = (
        "import duckdb, sys\n"
        f"con = duckdb.connect(); con.execute(\"SET threads=2; SET memory_limit='{memory}'\")\n"
        f"con.execute(\"CREATE TABLE closure AS SELECT * FROM read_csv('{closure_csv}')\")\n"
        f"con.execute({query!r})\n")
    seconds, rss = _run_measured([sys.executable, "-c", script])
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(rss / 2**30, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--driver-memory", default="6g",
                        help="Spark heap in local mode (the issue's budget is 8 GiB in total)")
    parser.add_argument("--skip-duckdb", action="store_true")
    args = parser.parse_args(argv)

    os.makedirs(OUT, exist_ok=True)
    data = os.path.join(OUT, f"train_synthetic_{args.rows}_{args.seed}.txt")
    if not os.path.exists(data):
        started = time.time()
        generate(data, args.rows, args.seed)
        print(f"generated {data} in {time.time() - started:.0f} s")
    work = os.path.join(OUT, f"labels_{args.rows}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    result = {"rows": args.rows, "spark_local2": run_spark(data, work, args.driver_memory)}
    with open(f"{work}/ingest/_summary.json") as handle:
        result["ingest_summary"] = json.load(handle)
    with open(f"{work}/labels/_summary.json") as handle:
        result["labels_summary"] = json.load(handle)
    spark_s = result["spark_local2"]["seconds"]
    result["spark_local2"]["rows_per_s"] = round(args.rows / spark_s)
    if not args.skip_duckdb:
        duck = run_duckdb(data, work, "8GB")
        duck["rows_per_s"] = round(args.rows / duck["seconds"])
        result["duckdb_baseline"] = duck
        result["ratio_spark_to_duckdb_time"] = round(spark_s / duck["seconds"], 2)
    with open(os.path.join(OUT, f"labels_{args.rows}.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("summary")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
