"""Download: fetch the ingest images/ table's URLs into object storage; write manifest/."""
import sys

from mlimages import download, runtime


def _main(argv=None) -> int:
    parser = runtime.job_parser(
        "download", __doc__, "--images runs/x/ingest/images --output runs/x/download")
    parser.add_argument("--images", required=True, help="the ingest stage's images/ table")
    parser.add_argument("--output", required=True,
                        help="output folder: manifest/, manifest_parts/, objects/ (local store)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="also retry rows whose last status is not ok (default: skip them)")
    parser.add_argument("--threads", type=int, help="fetch threads per task (profile override)")
    args = parser.parse_args(argv)

    def body(spark, profile):
        options, store = download.options_from_profile(profile, args.output)
        if args.threads is not None:
            options = download.replace(options, threads=args.threads)
        download.run_download(spark, args.images, args.output, options, store,
                              retry_failed=args.retry_failed)

    return runtime.run("download", args, body)


def main() -> int:
    return _main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
