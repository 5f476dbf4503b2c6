"""Stand-in images for URLs that cannot be reached, so later stages can run on offline machines.

The demo machines have no internet: every Flickr URL fails, and the manifest records that. To let
the dataset and training stages run anyway, each unreachable row then gets a stand-in: one of the
upstream sample photos, served from a server on 127.0.0.1 in the driver and fetched by the normal
download path (validation, storage, manifest part). Stand-in rows are marked ``origin =
'standin'``, keep the original URL, and carry the original failure in ``error``; the summary
counts them. Local Spark mode only: executors elsewhere cannot reach the driver's loopback.
"""
import http.server
import logging
import threading
import time

from mlimages import download, runtime, sources, storage

log = logging.getLogger(__name__)

UNREACHABLE = ("dns_error", "connection_error", "timeout", "offline")


class StandinServer:
    """Serves ``/standin/<image_id>.jpg`` from ``photos`` (chosen by image id) on 127.0.0.1."""

    def __init__(self, photos=None):
        paths = photos or [sources.sample_file(name) for name in sources.SAMPLE_PHOTOS]
        self.bodies = []
        for path in paths:
            with open(path, "rb") as handle:
                self.bodies.append(handle.read())
        handler = type("StandinHandler", (_Handler,), {"bodies": self.bodies})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        log.info("stand-in images served at %s", self.base)
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    bodies: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 (the http.server API)
        name = self.path.rsplit("/", 1)[-1].removesuffix(".jpg")
        try:
            body = self.bodies[int(name) % len(self.bodies)]
        except ValueError:
            body = None
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "image/jpeg" if body else "text/plain")
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


def fill_standins(spark, images_path: str, output_path: str,
                  options: download.DownloadOptions = None,
                  store: storage.StoreOptions = None, photos=None,
                  statuses=UNREACHABLE) -> dict:
    """Gives every manifest row whose status is in ``statuses`` a stand-in image; returns the
    updated download summary (with ``standins_used``)."""
    from pyspark.sql import functions as F

    options = options or download.DownloadOptions()
    store = store or storage.store_options({}, download._local(output_path) + "/objects")
    images = download.read_images(spark, images_path)
    manifest = spark.read.parquet(f"{output_path.rstrip('/')}/{download.MANIFEST}")
    failed = (manifest.where(F.col("status").isin(list(statuses)))
              .select("image_id", F.col("status").alias("failed_status"),
                      F.col("error").alias("failed_error")))
    # Only the loopback server is contacted: loopback allowed, everything else stays refused.
    standin_options = download.replace(options, allow_loopback=True, allow_private=False)
    run_id, started = download.new_run_id(), time.time()
    with StandinServer(photos) as server:
        rows = images.join(failed, "image_id").select(
            "image_id", "url", "imagenet_id",
            F.concat(F.lit(f"{server.base}/standin/"), F.col("image_id").cast("string"),
                     F.lit(".jpg")).alias("fetch_url"),
            F.lit("standin").alias("origin"),
            F.concat(F.lit("stand-in image; the web fetch failed: "), F.col("failed_status"),
                     F.lit(": "), F.coalesce(F.col("failed_error"), F.lit(""))).alias("note"))
        stats = download.fetch_rows(spark, rows, output_path, standin_options, store, run_id)
    manifest = download.consolidate(spark, images, output_path)
    summary = download.summarize(spark, images, manifest, stats, time.time() - started,
                                 0, run_id, store)
    return summary


def run_with_standins(spark, images_path: str, output_path: str,
                      options: download.DownloadOptions = None,
                      store: storage.StoreOptions = None, photos=None) -> dict:
    """The download, then stand-ins for what the web could not give; for demos on offline
    machines. The summary keeps the web results under ``web`` and says how many stand-ins."""
    web = download.run_download(spark, images_path, output_path, options, store)
    unreachable = sum(web["counts"].get(status, 0) for status in UNREACHABLE)
    if not unreachable:
        return web
    log.warning("%d of %d URLs could not be reached (no internet here?); their failures are "
                "in the manifest; serving stand-in images for them so later stages can run",
                unreachable, web["rows_in"])
    summary = fill_standins(spark, images_path, output_path, options, store, photos)
    summary["web"] = {"counts": web["counts"], "this_run": web["this_run"]}
    summary["note"] = (f"{summary['standins_used']} of {summary['rows_in']} images are "
                       "STAND-INS (upstream sample photos served from 127.0.0.1), not the real "
                       "images: their URLs could not be reached")
    log.warning("%s", summary["note"])
    runtime.write_summary(output_path, summary)
    return summary
