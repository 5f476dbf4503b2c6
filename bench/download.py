"""Benchmark: the download job against img2dataset, same URLs, same loopback server.

A server process on 127.0.0.1 serves N distinct multi-megapixel JPEGs (each a few hundred KB,
made from the upstream sample photos, made unique by a JPEG comment) after a fixed latency, as
a far-away host would. The download job runs on Spark local[2]; the baseline is img2dataset,
installed by this script into its own virtual environment under bench/out/, run with 2
processes, the same thread count and no resizing (our stage keeps originals). Prints images/s,
peak memory (RSS of each process tree) and the ratio; results go to bench/out/download.json.

  python bench/download.py --small          # 300 images, about 2 minutes here
  python bench/download.py --images 3000    # the issue's size
"""
import argparse
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mlimages import download, sources, spark  # noqa: E402

OUT = os.path.join(ROOT, "bench", "out")
I2D_VENV = os.path.join(OUT, "img2dataset-venv")
I2D_VERSION = "1.47.0"
BASE_SIZES = ((2400, 1800), (2048, 1536), (3000, 2000), (1600, 1200))  # Flickr-original-like


def base_jpegs() -> list:
    """A few multi-megapixel JPEG bodies cut and scaled from the sample photos."""
    from PIL import Image

    bodies = []
    for name, size in zip(sources.SAMPLE_PHOTOS, BASE_SIZES, strict=True):
        with Image.open(sources.sample_file(name)) as photo:
            out = io.BytesIO()
            photo.convert("RGB").resize(size).save(out, "JPEG", quality=85)
            bodies.append(out.getvalue())
    return bodies


def unique_jpeg(bodies: list, index: int) -> bytes:
    """A JPEG that differs from every other index by a comment segment after SOI."""
    body = bodies[index % len(bodies)]
    comment = f"mlimages bench image {index}".encode()
    return body[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + body[2:]


def serve(port_file: str, latency: float) -> None:
    """Server process: /img/<i>.jpg after ``latency`` seconds; writes its port to a file."""
    bodies = base_jpegs()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            time.sleep(latency)
            index = int(self.path.rsplit("/", 1)[-1].split(".")[0])
            body = unique_jpeg(bodies, index)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.request_queue_size = 1024
    with open(port_file + ".tmp", "w") as handle:
        handle.write(str(server.server_address[1]))
    os.replace(port_file + ".tmp", port_file)
    server.serve_forever()


class PeakRss:
    """Samples the summed RSS of a process and its descendants every 0.2 s."""

    def __init__(self, pid: int):
        import psutil

        self.process, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                for proc in [self.process] + self.process.children(recursive=True):
                    total += proc.memory_info().rss
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def start_server(latency: float):
    port_file = os.path.join(OUT, "server.port")
    if os.path.exists(port_file):
        os.unlink(port_file)
    proc = subprocess.Popen([sys.executable, __file__, "--serve", port_file,
                             "--latency", str(latency)])
    for _ in range(300):
        if os.path.exists(port_file):
            return proc, int(open(port_file).read())
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("bench server did not start")


def write_inputs(base: str, count: int, work: str) -> tuple:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"{base}/img/{i}.jpg" for i in range(count)]
    table = pa.table({
        "image_id": pa.array(range(count), pa.int64()), "key": urls, "url": urls,
        "imagenet_id": pa.array([None] * count, pa.string()),
        "source": ["openimages"] * count, "split": ["train"] * count,
        "file": ["bench"] * count, "line_number": pa.array(range(1, count + 1), pa.int64()),
        "merged_rows": pa.array([0] * count, pa.int32())})
    images = os.path.join(work, "images")
    os.makedirs(images)
    pq.write_table(table, os.path.join(images, "part-0.parquet"))
    url_list = os.path.join(work, "urls.txt")
    with open(url_list, "w") as handle:
        handle.write("\n".join(urls) + "\n")
    return images, url_list


def run_ours(images: str, work: str, count: int, threads: int) -> dict:
    options = download.DownloadOptions(
        threads=threads, task_rows=max(1, count // 4),
        fetch={"allow_loopback": True, "per_host": threads})
    session = spark.build_session("bench-download", "local[2]", {
        "spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4",
        "spark.driver.memory": "2g"})
    try:
        with PeakRss(os.getpid()) as rss:
            started = time.time()
            summary = download.run_download(session, images, os.path.join(work, "ours"), options)
            seconds = time.time() - started
    finally:
        session.stop()
    ok = summary["ok"]
    return {"ok": ok, "seconds": round(seconds, 2), "images_per_s": round(ok / seconds, 1),
            "fetch_stage_images_per_s": summary["this_run"]["images_per_s"],
            "peak_rss_mb": round(rss.peak / 2**20), "counts": summary["counts"]}


def install_img2dataset() -> str:
    python = os.path.join(I2D_VENV, "bin", "python")
    if not os.path.exists(os.path.join(I2D_VENV, "bin", "img2dataset")):
        subprocess.run([sys.executable, "-m", "venv", I2D_VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", f"img2dataset=={I2D_VERSION}"],
                       check=True)
    return os.path.join(I2D_VENV, "bin", "img2dataset")


def run_img2dataset(url_list: str, work: str, threads: int) -> dict:
    command = [install_img2dataset(), "--url_list", url_list, "--input_format", "txt",
               "--output_folder", os.path.join(work, "i2d"), "--output_format", "files",
               "--processes_count", "2", "--thread_count", str(threads),
               "--resize_mode", "no", "--timeout", "20", "--retries", "0",
               "--number_sample_per_shard", "1000", "--disallowed_header_directives", "[]"]
    started = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with PeakRss(proc.pid) as rss:
        _, err = proc.communicate()
    seconds = time.time() - started
    if proc.returncode:
        raise RuntimeError(f"img2dataset failed: {err.decode()[-2000:]}")
    ok = sum(json.load(open(os.path.join(work, "i2d", f)))["successes"]
             for f in os.listdir(os.path.join(work, "i2d")) if f.endswith("_stats.json"))
    return {"ok": ok, "seconds": round(seconds, 2), "images_per_s": round(ok / seconds, 1),
            "peak_rss_mb": round(rss.peak / 2**20)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="300 images")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--latency", type=float, default=0.1, help="server latency, seconds")
    parser.add_argument("--threads", type=int, default=32, help="threads per task / process")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.latency)
        return 0
    count = 300 if args.small else args.images
    os.makedirs(OUT, exist_ok=True)
    work = os.path.join(OUT, "download-work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    server, port = start_server(args.latency)
    try:
        images, url_list = write_inputs(f"http://127.0.0.1:{port}", count, work)
        baseline = run_img2dataset(url_list, work, args.threads)
        ours = run_ours(images, work, count, args.threads)
    finally:
        server.terminate()
        server.wait()
    ratio = round(ours["images_per_s"] / baseline["images_per_s"], 2)
    result = {"images": count, "latency_s": args.latency, "threads": args.threads,
              "mean_image_kb": round(sum(map(len, base_jpegs())) / 4 / 1024),
              "ours": ours, "img2dataset": baseline, "ratio_ours_over_img2dataset": ratio}
    with open(os.path.join(OUT, "download.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"{count} JPEGs of ~{result['mean_image_kb']} KB, {args.latency * 1000:.0f} ms latency")
    print(f"mlimages download (Spark local[2]): {ours['images_per_s']} images/s end to end "
          f"({ours['fetch_stage_images_per_s']} in the fetch stage), "
          f"peak RSS {ours['peak_rss_mb']} MB")
    print(f"img2dataset {I2D_VERSION} (2 processes): {baseline['images_per_s']} images/s, "
          f"peak RSS {baseline['peak_rss_mb']} MB")
    print(f"ratio (ours / img2dataset): {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
