#!/usr/bin/env bash
# Adds s3a:// support to the pyspark distribution: hadoop-aws at the version of the Hadoop client
# that pyspark bundles, and the AWS SDK bundle it depends on, resolved by Spark's own resolver
# (so the SDK version always matches). Run once at image build time (needs Maven Central).
set -euo pipefail
: "${SPARK_HOME:?set SPARK_HOME to the pyspark package folder}"

hadoop=$(ls "$SPARK_HOME/jars" | sed -n 's/^hadoop-client-api-\(.*\)\.jar$/\1/p')
if [ -z "$hadoop" ]; then
    echo "add_s3a_jars: no hadoop-client-api jar in $SPARK_HOME/jars" >&2
    exit 1
fi
ivy=$(mktemp -d)
trap 'rm -rf "$ivy"' EXIT
python - "org.apache.hadoop:hadoop-aws:$hadoop" "$ivy" <<'PY'
import sys

from pyspark.sql import SparkSession

(SparkSession.builder.master("local[1]").config("spark.jars.packages", sys.argv[1])
 .config("spark.jars.ivy", sys.argv[2]).getOrCreate().stop())
PY
# -n: never replace a jar pyspark already ships.
cp -n "$ivy"/jars/*.jar "$SPARK_HOME/jars/"
ls "$SPARK_HOME/jars" | grep -E '^(hadoop-aws|bundle)-' >&2
