"""Which URLs the download stage may fetch, and to which addresses it may connect.

A URL list is untrusted input. On an executor inside a cloud network, an unchecked fetcher is a
proxy into that network (the metadata service at 169.254.169.254, internal admin pages), so every
address a host name resolves to is checked before any connection, and again after each redirect.
The check is done at connection time on the addresses actually used (see
:func:`connect_checked`), so a name that changes its answer between a check and the connect
(DNS rebinding) cannot slip through.
"""
import dataclasses
import ipaddress
import logging
import re
import socket
import urllib.parse

log = logging.getLogger(__name__)

SCHEMES = ("http", "https")
# Query parameters that carry credentials or signatures (S3, GCS, Azure, OAuth, generic).
SECRET_PARAMS = re.compile(
    r"^(x-amz-(signature|credential|security-token)|x-goog-(signature|credential)|signature|sig|"
    r"token|access_token|auth|key|api_key|apikey|awsaccesskeyid|password|pass|secret)$",
    re.IGNORECASE)
REDACTED = "REDACTED"


class Blocked(Exception):
    """The URL or one of its addresses is refused; the message says which rule refused it."""


class Offline(Exception):
    """Offline mode: the URL needs the network beyond loopback, so it is not fetched."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """What may be reached. The default refuses everything but public unicast addresses."""

    allow_loopback: bool = False  # tests, and a mirror on the same machine
    allow_private: bool = False  # intranet mirrors: RFC 1918, unique-local, CGNAT
    offline: bool = False  # refuse every non-loopback host without even resolving it


def address_problem(address: str, policy: Policy = Policy()) -> str:
    """Why ``address`` (an IP literal) may not be reached, or ``""`` when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    if ip.is_loopback:
        return "" if policy.allow_loopback else f"loopback address {ip}"
    if policy.offline:
        return f"offline mode: {ip} is not loopback"
    if ip.is_unspecified:
        return f"unspecified address {ip}"
    if ip.is_link_local:
        return f"link-local address {ip}"  # includes the cloud metadata service
    if ip.is_multicast:
        return f"multicast address {ip}"
    if ip.is_reserved:
        return f"reserved address {ip}"
    private = ip.is_private or (isinstance(ip, ipaddress.IPv4Address)
                                and ip in ipaddress.ip_network("100.64.0.0/10"))
    if private:
        return "" if policy.allow_private else f"private address {ip}"
    if not ip.is_global:
        return f"non-global address {ip}"
    return ""


def _literal(host: str):
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def is_loopback_host(host: str) -> bool:
    literal = _literal(host)
    return literal.is_loopback if literal else host.lower().rstrip(".") == "localhost"


def check_url(url: str, policy: Policy = Policy()) -> urllib.parse.SplitResult:
    """Checks scheme, host and (for IP literals) the address, without any network access.

    Raises :class:`Blocked` or :class:`Offline`; names are checked later, when they resolve.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as err:
        raise Blocked(f"malformed URL: {err}") from None
    if parts.scheme.lower() not in SCHEMES:
        raise Blocked(f"scheme {parts.scheme or '(none)'!r} is not http or https")
    host = parts.hostname
    if not host:
        raise Blocked("URL has no host")
    if policy.offline and not is_loopback_host(host):
        raise Offline(f"offline mode: {host} is not on loopback; no connection attempted")
    literal = _literal(host)
    if literal is not None:
        problem = address_problem(str(literal), policy)
        if problem:
            raise Blocked(problem)
    elif host.lower().rstrip(".") == "localhost" and not policy.allow_loopback:
        raise Blocked("loopback host localhost")
    return parts


def resolve_checked(host: str, port: int, policy: Policy = Policy()) -> list:
    """Every address ``host`` resolves to, as getaddrinfo tuples; Blocked if ANY is refused.

    Refusing when any answer is bad (not only the first) stops a name that mixes a public and a
    private address from reaching the private one on a later connection.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for info in infos:
        problem = address_problem(info[4][0], policy)
        if problem:
            raise Blocked(f"{host} resolves to a {problem}")
    return infos


def connect_checked(host: str, port: int, timeout, policy: Policy, socket_options=None):
    """Resolves, checks every address, then connects to the checked addresses only."""
    last_error = None
    for family, kind, proto, _, address in resolve_checked(host, port, policy):
        sock = socket.socket(family, kind, proto)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            if timeout is not None:
                sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as err:
            last_error = err
            sock.close()
    raise last_error or OSError(f"no address for {host}")


def redact_url(url) -> str:
    """The URL without user:password and with credential-like query values replaced.

    Used for everything that is logged or written to the manifest.
    """
    if not url:
        return url
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "(malformed URL)"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if "@" in parts.netloc:
        netloc = f"{REDACTED}@{netloc}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(SECRET_PARAMS.match(k) for k, _ in pairs):
            query = urllib.parse.urlencode(
                [(k, REDACTED if SECRET_PARAMS.match(k) else v) for k, v in pairs], safe="/:")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
