"""Object storage for image bytes: a local folder (the embedded default) or S3 through boto3.

Keys are content addressed, ``<prefix>/<h0h1>/<h2h3>/<sha256>.<ext>``: the same bytes fetched from
two URLs are stored once, and the leading hash characters spread keys evenly over S3's
partitions, so no prefix is hot. No partially written object is ever visible: local writes go to
a temporary name that is renamed into place, and an S3 PUT is atomic.

The download stage writes; the dataset stage reads back with :func:`open_store` and
:meth:`ObjectStore.get`, or with :func:`open_run_store` given the download output folder.
"""
import dataclasses
import json
import logging
import os
import threading
import uuid

log = logging.getLogger(__name__)

BACKENDS = ("local", "s3")
STORE_FILE = "_store.json"
CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "gif": "image/gif",
                 "webp": "image/webp", "bmp": "image/bmp", "tif": "image/tiff"}


class StoreError(Exception):
    """The object store refused or failed an operation after its own retries."""


@dataclasses.dataclass(frozen=True)
class StoreOptions:
    """Where images go. Credentials default to the standard AWS chain (env, files, roles)."""

    backend: str = "local"
    root: str = None  # local backend: folder; None means <download output>/objects
    bucket: str = None  # s3 backend
    prefix: str = "images"
    endpoint_url: str = None  # MinIO, Ceph, moto
    region: str = None
    max_pool_connections: int = 64  # raised to the fetch thread count when lower
    max_attempts: int = 5  # botocore adaptive retries
    # Only when the AWS chain cannot be used; never logged (repr=False) nor written out.
    access_key_id: str = dataclasses.field(default=None, repr=False)
    secret_access_key: str = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"store backend {self.backend!r}: expected one of {BACKENDS}")
        if self.backend == "s3" and not self.bucket:
            raise ValueError("store backend s3 needs a bucket")

    def public(self) -> dict:
        """The options without credentials: safe for logs, summaries and the run folder."""
        values = dataclasses.asdict(self)
        values.pop("access_key_id")
        values.pop("secret_access_key")
        if values["backend"] == "local" and values["root"] and "://" not in values["root"]:
            # Absolute, so later stages find the objects whatever their working directory.
            values["root"] = os.path.abspath(values["root"])
        return values


def content_key(sha256: str, extension: str, prefix: str = "") -> str:
    """The object key for bytes with this SHA-256, fanned out by the leading hash characters."""
    key = f"{sha256[:2]}/{sha256[2:4]}/{sha256}.{extension}"
    prefix = (prefix or "").strip("/")
    return f"{prefix}/{key}" if prefix else key


class ObjectStore:
    """put / get / exists by key; ``put`` returns False when the object was already there."""

    options: StoreOptions

    def put(self, key: str, data: bytes, content_type: str = None) -> bool:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def key_for(self, sha256: str, extension: str) -> str:
        return content_key(sha256, extension, self.options.prefix)


class LocalStore(ObjectStore):
    def __init__(self, options: StoreOptions):
        if not options.root:
            raise ValueError("local store needs a root folder")
        self.options = options
        self.root = options.root.removeprefix("file://")

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"key {key!r} leaves the store")
        return os.path.join(self.root, key)

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def put(self, key: str, data: bytes, content_type: str = None) -> bool:
        path = self._path(key)
        if os.path.exists(path):
            return False
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # The temporary name is unique per writer, so two tasks storing the same bytes at once
        # each rename a complete file over the same name; readers never see a partial file.
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except OSError as err:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise StoreError(f"local put {key}: {err}") from None
        return True

    def get(self, key: str) -> bytes:
        with open(self._path(key), "rb") as handle:
            return handle.read()


class S3Store(ObjectStore):
    def __init__(self, options: StoreOptions):
        self.options = options
        self.client = _s3_client(options)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.options.bucket, Key=key)
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StoreError(f"s3 head {key}: {_client_error(err)}") from None

    def put(self, key: str, data: bytes, content_type: str = None) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        if self.exists(key):  # content addressed: an existing key holds these very bytes
            return False
        extra = {"ContentType": content_type} if content_type else {}
        try:
            self.client.put_object(Bucket=self.options.bucket, Key=key, Body=data, **extra)
        except ClientError as err:
            raise StoreError(f"s3 put {key}: {_client_error(err)}") from None
        except BotoCoreError as err:
            raise StoreError(f"s3 put {key}: {type(err).__name__}") from None
        return True

    def get(self, key: str) -> bytes:
        response = self.client.get_object(Bucket=self.options.bucket, Key=key)
        return response["Body"].read()


def _client_error(err) -> str:
    error = err.response.get("Error", {})
    return f"{error.get('Code')}: {error.get('Message')}"


_clients = {}
_clients_lock = threading.Lock()


def _s3_client(options: StoreOptions):
    """One client per process and options: boto3 clients are thread safe, creating one is not."""
    with _clients_lock:
        client = _clients.get(options)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                max_pool_connections=options.max_pool_connections,
                retries={"mode": "adaptive", "max_attempts": options.max_attempts},
                region_name=options.region)
            session = boto3.session.Session(
                aws_access_key_id=options.access_key_id,
                aws_secret_access_key=options.secret_access_key)
            client = session.client("s3", endpoint_url=options.endpoint_url, config=config)
            _clients[options] = client
            log.info("s3 client for bucket %s at %s", options.bucket,
                     options.endpoint_url or "AWS")
        return client


def open_store(options: StoreOptions, min_connections: int = 0) -> ObjectStore:
    """The store described by ``options``; S3 pools get at least ``min_connections``."""
    if options.max_pool_connections < min_connections:
        options = dataclasses.replace(options, max_pool_connections=min_connections)
    if options.backend == "local":
        return LocalStore(options)
    return S3Store(options)


def store_options(values, default_root: str = None) -> StoreOptions:
    """Builds :class:`StoreOptions` from a mapping (a profile section), filling the local root."""
    values = dict(values or {})
    fields = {f.name for f in dataclasses.fields(StoreOptions)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown store option(s) {unknown}; allowed: {sorted(fields)}")
    if values.get("backend", "local") == "local" and not values.get("root"):
        values["root"] = default_root
    return StoreOptions(**values)


def record_store(folder: str, options: StoreOptions) -> None:
    """Writes the store description (no credentials) into a run folder for later stages."""
    folder = folder.removeprefix("file://")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, STORE_FILE), "w", encoding="utf-8") as handle:
        json.dump(options.public(), handle, indent=2, sort_keys=True)


def open_run_store(download_output: str, **overrides) -> ObjectStore:
    """The store a download run wrote to, from its ``_store.json``; credentials from the chain
    unless given in ``overrides``."""
    path = os.path.join(download_output.removeprefix("file://"), STORE_FILE)
    with open(path, encoding="utf-8") as handle:
        values = json.load(handle)
    values.update(overrides)
    return open_store(StoreOptions(**values))
