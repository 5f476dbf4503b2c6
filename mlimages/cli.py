"""The ``mlimages`` command: ``mlimages <stage> [options]`` runs that stage's job entry point."""
import importlib
import sys

# command -> module whose ``_main(argv)`` runs it
COMMANDS = {
    "ingest": "mlimages_jobs.ingest",
    "labels": "mlimages_jobs.labels",
    "download": "mlimages_jobs.download",
    "dataset": "mlimages_jobs.dataset",
    "import-tfrecords": "mlimages_jobs.import_tfrecords",
    "stats": "mlimages_jobs.stats",
    "train": "mlimages.train.__main__",
    "demo": "mlimages.demo",
}

USAGE = "usage: mlimages <command> [options]   (mlimages <command> --help for its options)"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("commands: " + ", ".join(COMMANDS))
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mlimages: unknown command {command!r}; choose from {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command])
    entry = getattr(module, "_main", None) or module.main
    return entry(rest)


if __name__ == "__main__":
    sys.exit(main())
