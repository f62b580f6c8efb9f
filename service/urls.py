"""Fetching an image named by URL (`image_url` in a request), for hosts the operator has allow-listed.

`fetch_image_url(url, settings, transport=None) -> bytes` returns the body or raises `ApiError`:

| refusal                                                         | status | code                        |
|-----------------------------------------------------------------|--------|-----------------------------|
| image URLs are off (`QZOOM_IMAGE_URLS` false, the default)      | 403    | `image_urls_disabled`       |
| not an absolute http:// or https:// URL                         | 422    | `invalid_image_url`         |
| the host (or a redirect's host) is not in `QZOOM_IMAGE_URL_HOSTS` | 403  | `image_url_host_not_allowed` |
| the host resolves to a non-public address (below)               | 403    | `image_url_address_refused` |
| the host does not resolve                                       | 422    | `image_url_fetch_failed`    |
| more than `MAX_REDIRECTS` redirects, a redirect without Location | 422    | `image_url_fetch_failed`    |
| the server answered non-2xx, or could not be reached            | 422    | `image_url_fetch_failed`    |
| the whole fetch took longer than `QZOOM_IMAGE_URL_TIMEOUT_S`    | 422    | `image_url_timeout`         |
| the body is larger than `QZOOM_IMAGE_URL_MAX_MB`                | 413    | `image_url_too_large`       |

Redirects are followed by hand, one hop at a time, and every hop's URL is checked like the first: an allow-listed
host cannot bounce the server to one that is not. The byte cap is enforced on the declared Content-Length and again
while streaming, so a lying or chunked response is cut off at the cap. The timeout covers the whole fetch (connect,
every redirect, every byte): a server dripping one byte at a time cannot hold a request open. Proxy variables are
ignored (`trust_env=False`): the allow-list names the hosts the server itself connects to.

An allow-list entry is a host name or IP literal (any port) or `host:port` (that port only), compared
case-insensitively; IPv6 literals are written in brackets, `[::1]:8080`.

Names are checked by address, too (SSRF, DNS rebinding): each hop's host is resolved once, every address it resolves
to must be public (not loopback, link-local, private, shared, multicast, reserved or unspecified; IPv4-mapped, 6to4
and Teredo IPv6 forms are checked as the IPv4 address they carry), and the connection goes to the checked address
itself (the URL's host becomes that IP; the `Host` header and TLS SNI and certificate check keep the name), so a
second lookup that answers otherwise is never made. `QZOOM_IMAGE_URL_PRIVATE` lifts the address rule (not the
allow-list) for an operator whose image host is on a private network. `resolver` is the seam tests use to answer
lookups.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable

import httpx

from qzoom.cache import MiB
from qzoom.settings import Settings

from .errors import ApiError

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)

# (host, port) -> the addresses it resolves to, as strings.
Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


async def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's answer (getaddrinfo), each address once, in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def refused_kind(ip: IPAddress) -> str | None:
    """Why `ip` is not a public address a server may fetch from (None when it is)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return refused_kind(embedded)
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:
        return "non-global"  # shared address space (100.64/10), documentation ranges, ...
    return None


def _host_entry(url: httpx.URL) -> tuple[str, str]:
    """(host, host:port) as an allow-list entry would write them."""
    host = url.host.lower()
    shown = f"[{host}]" if ":" in host else host
    port = url.port or (443 if url.scheme == "https" else 80)
    return shown, f"{shown}:{port}"


def check_url(url: httpx.URL, settings: Settings, *, hop: str = "") -> None:
    """Refuse a URL whose scheme is not http(s) or whose host is not allow-listed (see the module docstring)."""
    if url.scheme not in ("http", "https") or not url.host:
        raise ApiError(
            422, "invalid_image_url", f"image_url{hop}: {str(url)[:200]!r} is not an absolute http:// or https:// URL"
        )
    allowed = {h.lower() for h in settings.image_url_hosts}
    host, host_port = _host_entry(url)
    if host not in allowed and host_port not in allowed:
        listed = ", ".join(settings.image_url_hosts) or "none"
        raise ApiError(
            403,
            "image_url_host_not_allowed",
            f"image_url{hop}: host {host_port} is not allowed; allowed hosts (QZOOM_IMAGE_URL_HOSTS): {listed}",
        )


async def _addresses(host: str, port: int, resolver: Resolver, hop: str) -> list[IPAddress]:
    """The host itself when it is an IP literal, else what it resolves to (one lookup)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass  # a name
    try:
        answers = await resolver(host, port)
        addresses = [ipaddress.ip_address(a.split("%")[0]) for a in answers]  # "%scope" of link-local IPv6
    except (OSError, ValueError) as err:
        raise ApiError(422, "image_url_fetch_failed", f"image_url{hop}: host {host} does not resolve: {err}") from None
    if not addresses:
        raise ApiError(422, "image_url_fetch_failed", f"image_url{hop}: host {host} does not resolve")
    return addresses


async def pinned_request(
    url: httpx.URL, settings: Settings, resolver: Resolver, *, hop: str = ""
) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
    """(the URL to connect to, its headers, its extensions): `url` with its host replaced by the one address the
    host resolved to and was checked, the name kept for `Host` and TLS (see the module docstring)."""
    host = url.host
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = await _addresses(host, port, resolver, hop)
    if not settings.image_url_private:
        for ip in addresses:
            kind = refused_kind(ip)
            if kind is not None:
                raise ApiError(
                    403,
                    "image_url_address_refused",
                    f"image_url{hop}: host {host} resolves to {ip}, a {kind} address; only public addresses are "
                    "fetched (QZOOM_IMAGE_URL_PRIVATE allows private ones)",
                )
    ip = addresses[0]
    pinned = url.copy_with(host=str(ip))
    headers = {"Host": url.netloc.decode("ascii")}
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    return pinned, headers, extensions


async def _get(client: httpx.AsyncClient, url: httpx.URL, settings: Settings, resolver: Resolver) -> bytes:
    cap = int(settings.image_url_max_mb * MiB)
    too_large = ApiError(
        413, "image_url_too_large", f"the image at image_url is larger than {cap} bytes (QZOOM_IMAGE_URL_MAX_MB)"
    )
    for hops in range(MAX_REDIRECTS + 1):
        target, headers, extensions = await pinned_request(
            url, settings, resolver, hop=f" (redirect {hops})" * bool(hops)
        )
        async with client.stream("GET", target, headers=headers, extensions=extensions) as response:
            if response.status_code in _REDIRECTS:
                location = response.headers.get("location")
                if not location:
                    raise ApiError(422, "image_url_fetch_failed", f"image_url: {url} redirected without a Location")
                try:
                    url = url.join(location)
                except httpx.InvalidURL as err:
                    raise ApiError(422, "invalid_image_url", f"image_url: bad redirect Location: {err}") from err
                check_url(url, settings, hop=f" (redirect {hops + 1})")
                continue
            if not 200 <= response.status_code < 300:
                raise ApiError(422, "image_url_fetch_failed", f"image_url: {url} answered HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cap:
                raise too_large
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > cap:
                    raise too_large
            return bytes(body)
    raise ApiError(422, "image_url_fetch_failed", f"image_url: more than {MAX_REDIRECTS} redirects")


async def fetch_image_url(
    raw_url: str,
    settings: Settings,
    transport: httpx.AsyncBaseTransport | None = None,
    resolver: Resolver | None = None,
) -> bytes:
    """The bytes at `raw_url`, fetched under the allow-list, address rule, byte cap and timeout of `settings`."""
    if not settings.image_urls:
        raise ApiError(
            403,
            "image_urls_disabled",
            "image_url is not accepted by this server (QZOOM_IMAGE_URLS is off); "
            "send the image as a file, as base64 / a data URL, or upload it and pass image_id",
        )
    try:
        url = httpx.URL(raw_url.strip())
    except (httpx.InvalidURL, TypeError, ValueError) as err:
        raise ApiError(422, "invalid_image_url", f"image_url: not a valid URL: {err}") from err
    check_url(url, settings)
    timeout = settings.image_url_timeout_s
    try:
        async with (
            httpx.AsyncClient(
                transport=transport, follow_redirects=False, trust_env=False, timeout=httpx.Timeout(timeout)
            ) as client,
            asyncio.timeout(timeout),
        ):
            return await _get(client, url, settings, resolver or system_resolver)
    except TimeoutError as err:
        raise ApiError(
            422, "image_url_timeout", f"image_url: fetching took longer than {timeout:g} s (QZOOM_IMAGE_URL_TIMEOUT_S)"
        ) from err
    except httpx.TimeoutException as err:
        raise ApiError(
            422, "image_url_timeout", f"image_url: fetching took longer than {timeout:g} s (QZOOM_IMAGE_URL_TIMEOUT_S)"
        ) from err
    except httpx.HTTPError as err:
        raise ApiError(422, "image_url_fetch_failed", f"image_url: {url} could not be fetched: {err}") from err
