#!/usr/bin/env bash
# Spark 4 needs Java 17 or newer; say so plainly instead of failing inside the JVM launch.
set -u
if ! command -v java >/dev/null 2>&1; then
    echo "Java 17 is required by Spark and was not found: install a JDK 17 (e.g." \
         "'apt-get install openjdk-17-jre-headless') and retry." >&2
    exit 1
fi
version=$(java -version 2>&1 | awk -F'"' '/version/ {print $2}')
major=${version%%.*}
if [ "${major:-0}" -lt 17 ] 2>/dev/null; then
    echo "Java $version found; Spark 4 needs Java 17 or newer." >&2
    exit 1
fi
