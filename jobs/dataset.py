"""Dataset: labels + downloaded images -> training-ready Petastorm Parquet per split, rejects."""
import sys

from mlimages import config, dataset, runtime


def _main(argv=None) -> int:
    parser = runtime.job_parser(
        "dataset", __doc__,
        "--labels runs/x/labels --download runs/x/download --output runs/x/dataset")
    parser.add_argument("--labels", required=True,
                        help="output folder of the labels job (image_labels/, class_counts/)")
    parser.add_argument("--download", required=True,
                        help="output folder of the download job (manifest/, _store.json)")
    parser.add_argument("--output", required=True,
                        help="output folder: one Petastorm dataset per split, rejects/")
    parser.add_argument("--class-filter", choices=dataset.CLASS_FILTERS, default=None,
                        help="override dataset.class_filter of the profile")
    parser.add_argument("--sample-fraction", type=float, default=None,
                        help="override dataset.sample_fraction of the profile")
    args = parser.parse_args(argv)

    def body(spark, profile):
        options = config.section(profile, "dataset", dataset.DatasetOptions)
        overrides = {k: v for k, v in (("class_filter", args.class_filter),
                                       ("sample_fraction", args.sample_fraction)) if v is not None}
        if overrides:
            options = dataset.DatasetOptions(**{**vars(options), **overrides})
        dataset.run_dataset(spark, args.labels, args.download, args.output, options)

    return runtime.run("dataset", args, body)


def main() -> int:
    return _main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
