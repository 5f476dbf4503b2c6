"""Download stage parts without Spark: address guard, fetcher, image check, object stores.

The fetcher talks to a real HTTP server on 127.0.0.1; S3 is moto's server on 127.0.0.1. A
guard on ``socket.connect`` fails any test that would open a connection beyond loopback.
"""
import hashlib
import io
import os
import socket

import pytest
from http_fixtures import ImageServer, huge_png
from PIL import Image

from mlimages import fetch, imagecheck, netguard, storage

LOOPBACK = netguard.Policy(allow_loopback=True)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Refuses, in this process, any connection to an address outside loopback."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            assert netguard._literal(host).is_loopback, f"test tried to connect to {host}"
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(scope="module")
def server(sample_photos):
    with ImageServer(sample_photos) as running:
        yield running


def fetcher(**overrides) -> fetch.Fetcher:
    values = dict(allow_loopback=True, connect_timeout=2, read_timeout=2, deadline=5,
                  backoff=0.01, backoff_max=0.05, retry_after_max=0.3, max_attempts=3)
    values.update(overrides)
    return fetch.Fetcher(fetch.FetchOptions(**values))


# --- the address guard, checked without connecting anywhere --------------------------------

@pytest.mark.parametrize("address,kind", [
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.20", "private"),
    ("100.64.0.1", "private"), ("fc00::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("127.0.0.1", "loopback"), ("127.9.9.9", "loopback"), ("::1", "loopback"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"),
    ("::ffff:10.0.0.1", "private"), ("::ffff:169.254.169.254", "link-local"),
])
def test_refused_addresses(address, kind):
    assert kind in netguard.address_problem(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "151.101.1.69", "2606:4700:4700::1111"])
def test_public_addresses_allowed(address):
    assert netguard.address_problem(address) == ""


def test_allow_loopback_allows_only_loopback():
    assert netguard.address_problem("127.0.0.1", LOOPBACK) == ""
    assert netguard.address_problem("::1", LOOPBACK) == ""
    assert "private" in netguard.address_problem("10.0.0.1", LOOPBACK)
    assert "link-local" in netguard.address_problem("169.254.169.254", LOOPBACK)
    assert netguard.address_problem("10.1.2.3", netguard.Policy(allow_private=True)) == ""


@pytest.mark.parametrize("url,reason", [
    ("ftp://example.com/a.jpg", "scheme"), ("file:///etc/passwd", "scheme"),
    ("gopher://example.com/", "scheme"), ("http:///a.jpg", "no host"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[::1]:8080/a.jpg", "loopback"), ("http://localhost/a.jpg", "loopback"),
    ("http://10.0.0.1/a.jpg", "private"), ("http://example.com:99999/a.jpg", "malformed"),
])
def test_check_url_refuses(url, reason):
    with pytest.raises(netguard.Blocked, match=reason):
        netguard.check_url(url)


def test_every_resolved_address_is_checked(monkeypatch):
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80)),
               (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 80))]
    monkeypatch.setattr(netguard.socket, "getaddrinfo", lambda *a, **k: answers)
    with pytest.raises(netguard.Blocked, match="mixed.example resolves to a private"):
        netguard.resolve_checked("mixed.example", 80)
    # Through the fetcher: refused before any connection (the autouse guard would fail it).
    result = fetcher(allow_loopback=False).fetch("http://mixed.example/a.jpg")
    assert (result.status, result.attempts) == ("blocked", 1)


def test_offline_mode_neither_resolves_nor_connects(monkeypatch):
    def no_dns(*args, **kwargs):
        raise AssertionError("offline mode resolved a name")

    monkeypatch.setattr(netguard.socket, "getaddrinfo", no_dns)
    result = fetcher(offline=True).fetch("https://farm2.staticflickr.com/1/2_o.jpg")
    assert result.status == "offline"
    assert "no connection attempted" in result.error


def test_redact_url():
    url = ("https://user:hunter2@bucket.s3.amazonaws.com/a.jpg?X-Amz-Credential=AKIAXX"
           "&X-Amz-Signature=deadbeef&size=large")
    redacted = netguard.redact_url(url)
    for secret in ("hunter2", "user", "AKIAXX", "deadbeef"):
        assert secret not in redacted
    assert "size=large" in redacted and redacted.startswith("https://REDACTED@bucket")
    assert netguard.redact_url("http://a.example/x.jpg") == "http://a.example/x.jpg"


# --- the fetcher against the loopback server -------------------------------------------------

@pytest.mark.parametrize("name", ["a.jpg", "b.png", "c.gif", "anim.gif", "d.webp",
                                  "webp-as.jpg", "photo0.jpg", "photo3.jpg"])
def test_fetches_real_images(server, name):
    result = fetcher().fetch(server.url(f"img/{name}"))
    assert (result.status, result.http_status, result.attempts) == ("ok", 200, 1)
    assert result.body == server.images[name][0]


@pytest.mark.parametrize("code", [403, 404, 410])
def test_no_retry_on_permanent_errors(server, code):
    result = fetcher().fetch(server.url(f"status/{code}"))
    assert (result.status, result.http_status, result.attempts) == ("http_error", code, 1)
    assert server.count(f"/status/{code}") == 1


def test_retries_500_then_succeeds(server):
    result = fetcher().fetch(server.url("flaky/one?fail=1"))
    assert (result.status, result.attempts) == ("ok", 2)
    assert server.count("/flaky/one") == 2


def test_gives_up_after_max_attempts(server):
    result = fetcher(max_attempts=3).fetch(server.url("flaky/always?fail=99"))
    assert (result.status, result.http_status, result.attempts) == ("http_error", 500, 3)
    assert server.count("/flaky/always") == 3


def test_honours_retry_after_up_to_bound(server, monkeypatch):
    waits = []
    monkeypatch.setattr(fetch.time, "sleep", waits.append)
    result = fetcher().fetch(server.url("ratelimit/short?after=0"))
    assert (result.status, result.attempts, waits) == ("ok", 2, [0.0])
    result = fetcher(retry_after_max=0.3).fetch(server.url("ratelimit/long?after=3600"))
    assert (result.status, result.attempts) == ("ok", 2)
    assert waits[-1] == 0.3


def test_backoff_grows_with_jitter():
    one = fetcher(backoff=1.0, backoff_max=100)
    first = [one._delay(1, None) for _ in range(50)]
    third = [one._delay(3, None) for _ in range(50)]
    assert all(0.5 <= d <= 1.0 for d in first) and all(2.0 <= d <= 4.0 for d in third)
    assert len(set(first)) > 1  # jittered
    assert fetcher(backoff=1.0, backoff_max=3)._delay(10, None) <= 3


def test_slow_body_hits_the_deadline(server):
    result = fetcher(deadline=0.5, max_attempts=1).fetch(server.url("drip/x?every=0.05"))
    assert result.status == "timeout" and "deadline" in result.error


def test_stalled_body_hits_the_read_timeout(server):
    result = fetcher(read_timeout=0.3, max_attempts=2).fetch(server.url("stall/x?seconds=2"))
    assert (result.status, result.attempts) == ("timeout", 2)


def test_connection_reset_is_retried(server):
    result = fetcher().fetch(server.url("reset/x?fail=1"))
    assert (result.status, result.attempts) == ("ok", 2)


def test_refused_connection():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = fetcher().fetch(f"http://127.0.0.1:{port}/a.jpg")
    assert result.status == "connection_error"


def test_dns_failure(monkeypatch):
    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(netguard.socket, "getaddrinfo", fail)
    result = fetcher().fetch("http://no-such-host.example/a.jpg")
    assert (result.status, result.attempts) == ("dns_error", 1)


def test_redirects(server):
    assert fetcher().fetch(server.url("redirect/x?hops=2")).status == "ok"
    result = fetcher(max_redirects=3).fetch(server.url("loop/a"))
    assert result.status == "too_many_redirects"
    assert server.count("/loop/a") + server.count("/loop/b") == 4


@pytest.mark.parametrize("target,reason", [
    ("http://169.254.169.254/latest/meta-data/iam/", "link-local"),
    ("http://10.0.0.1/admin", "private"), ("http://[::ffff:192.168.0.1]/", "private"),
    ("file:///etc/passwd", "scheme"),
])
def test_redirect_to_forbidden_address_is_blocked(server, target, reason):
    result = fetcher().fetch(server.url(f"redirect/x?to={target}"))
    assert result.status == "blocked" and reason in result.error


def test_loopback_refused_unless_allowed(server):
    before = server.count("/img/a.jpg")
    result = fetcher(allow_loopback=False).fetch(server.url("img/a.jpg"))
    assert result.status == "blocked" and "loopback" in result.error
    assert server.count("/img/a.jpg") == before  # refused before connecting


def test_redirect_to_loopback_refused_when_loopback_disallowed(server, monkeypatch):
    """A public-looking name that redirects to loopback: the guard stops the second hop."""
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        if host == "public.example":  # stands for a public host; served by the loopback server
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", server.port))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(netguard.socket, "getaddrinfo", resolve)
    monkeypatch.setattr(netguard, "address_problem",
                        lambda address, policy: "" if address == "127.0.0.1"
                        else "loopback address " + address)
    before = server.count("/img/a.jpg")
    target = f"http://127.0.0.2:{server.port}/img/a.jpg"
    result = fetcher(allow_loopback=False).fetch(
        f"http://public.example:{server.port}/redirect/x?to={target}")
    assert result.status == "blocked" and "127.0.0.2" in result.error
    assert server.count("/img/a.jpg") == before


def test_opt_out_header(server):
    assert fetcher().fetch(server.url("optout.jpg")).status == "opted_out"
    assert fetcher(optout_directives=()).fetch(server.url("optout.jpg")).status == "ok"
    assert fetcher().fetch(server.url("other-bot.jpg")).status == "ok"


def test_body_size_limit(server):
    result = fetcher(max_bytes=100_000).fetch(server.url("big.jpg"))
    assert result.status == "too_large"


def test_secrets_not_in_errors(server):
    result = fetcher().fetch(server.url("status/404?X-Amz-Signature=s3cr3t"))
    assert result.status == "http_error" and "s3cr3t" not in (result.error or "")


# --- validation ------------------------------------------------------------------------------

def test_image_facts_from_the_bytes(server):
    for name, (body, _, expected) in server.images.items():
        facts = imagecheck.inspect_image(body, 100_000_000)
        assert facts.status == "ok", name
        assert (facts.format, facts.width, facts.height, facts.animated) == expected, name


def test_truncated_jpeg_passes_verify_but_is_corrupt(server):
    with Image.open(io.BytesIO(server.truncated)) as image:
        image.verify()  # the structural check alone would accept it
    assert imagecheck.inspect_image(server.truncated, 10**8).status == "corrupt"


@pytest.mark.parametrize("body,status", [
    (b"", "not_an_image"), (b"<!DOCTYPE html><html>gone</html>", "not_an_image"),
    (b"  <html><body>captcha", "not_an_image"), (os.urandom(2000), "not_an_image"),
    (huge_png(), "too_large"),
])
def test_rejected_bodies(body, status):
    assert imagecheck.inspect_image(body, 100_000_000).status == status


def test_pixel_limit(server):
    facts = imagecheck.inspect_image(server.images["a.jpg"][0], 64 * 48 - 1)
    assert facts.status == "too_large" and (facts.width, facts.height) == (64, 48)


# --- object stores: the same tests on a local folder and on S3 (moto server) ---------------

@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    yield f"http://{host}:{port}"
    moto.stop()


def s3_options(endpoint: str, bucket: str) -> storage.StoreOptions:
    import boto3

    options = storage.StoreOptions(backend="s3", bucket=bucket, endpoint_url=endpoint,
                                   region="us-east-1", access_key_id="testing",
                                   secret_access_key="testing", prefix="imgs")
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing"
                 ).create_bucket(Bucket=bucket)
    return options


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, moto_endpoint):
    if request.param == "local":
        return storage.open_store(storage.StoreOptions(root=str(tmp_path / "objects")))
    return storage.open_store(s3_options(moto_endpoint, f"t-{os.urandom(4).hex()}"), 8)


def test_store_put_get_once(store, server):
    body = server.images["a.jpg"][0]
    digest = hashlib.sha256(body).hexdigest()
    key = store.key_for(digest, "jpg")
    assert key == f"{store.options.prefix}/{digest[:2]}/{digest[2:4]}/{digest}.jpg"
    assert not store.exists(key)
    assert store.put(key, body, "image/jpeg") is True
    assert store.put(key, body, "image/jpeg") is False  # same bytes: stored once
    assert store.exists(key) and store.get(key) == body


def test_local_store_leaves_no_temporary_files(tmp_path):
    local = storage.open_store(storage.StoreOptions(root=str(tmp_path)))
    for i in range(5):
        local.put(local.key_for(hashlib.sha256(bytes([i])).hexdigest(), "bin"), bytes([i]))
    names = [f for _, _, files in os.walk(tmp_path) for f in files]
    assert len(names) == 5 and not any(".tmp-" in n for n in names)
    with pytest.raises(storage.StoreError):
        local.put("../escape.jpg", b"x")


def test_store_options_never_expose_credentials(moto_endpoint):
    options = s3_options(moto_endpoint, "creds")
    assert "testing" not in repr(options)
    assert "access_key_id" not in options.public()
    # One client per process and options, with a pool as large as the threads.
    opened = storage.open_store(options, min_connections=100)
    assert opened.client.meta.config.max_pool_connections == 100
    assert opened.client.meta.config.retries["mode"] == "adaptive"
    assert storage.open_store(options, 100).client is opened.client
