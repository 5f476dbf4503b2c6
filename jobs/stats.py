"""Statistics: label tables and hierarchy (manifest, dataset if given) -> JSON, Markdown, PNGs."""
import sys

from mlimages import config, runtime, stats


def _main(argv=None) -> int:
    parser = runtime.job_parser(
        "stats", __doc__,
        "--labels runs/x/labels --hierarchy dictionary_and_semantic_hierarchy.txt "
        "--output runs/x/stats")
    parser.add_argument("--labels", required=True, help="output folder of the labels job")
    parser.add_argument("--hierarchy", required=True, help="dictionary_and_semantic_hierarchy.txt")
    parser.add_argument("--output", required=True, help="local output folder")
    parser.add_argument("--ingest", help="output folder of the ingest job (sources for the "
                        "manifest)")
    parser.add_argument("--manifest", help="download manifest table (download/manifest)")
    parser.add_argument("--dataset", help="Petastorm training dataset")
    args = parser.parse_args(argv)

    def body(spark, profile):
        options = config.section(profile, "stats", stats.StatsOptions)
        stats.run_stats(spark, args.labels, args.hierarchy, args.output, options,
                        ingest_dir=args.ingest, manifest=args.manifest, dataset=args.dataset)

    return runtime.run("stats", args, body)


def main() -> int:
    return _main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
