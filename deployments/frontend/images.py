"""Images at the ingress: every `image_url` (and raw `image`) part of a chat request is turned into
a decoded, checked PIL image before mistral-common sees it, so the tokenizer never fetches or
decodes anything itself (it resizes and normalizes by the Pixtral rules).

Order of checks, cheapest first, each refusal a 400 naming the part (`messages[0].content[1].image_url`):
1. count and placement: at most `max_images_per_request` image parts, only in user messages;
2. source: `data:` URLs (base64) always; `http(s)` URLs only for `allowed_hosts`. The host is
   resolved once and every address checked (loopback, private, link-local, metadata, reserved
   refused; `allowed_networks` may exempt loopback / private ranges, never link-local or metadata);
   the connection goes to the checked addresses only (no second lookup to rebind); redirects are
   followed only to the same host; no proxy from the environment; the byte cap is enforced on the
   declared length and again while streaming;
3. header: Pillow opens the bytes lazily (header only) among the accepted `formats`; width x
   height over `max_image_pixels` is refused before any pixel is decoded (Pillow's own
   MAX_IMAGE_PIXELS guard is set to the same value);
4. decode: the pixels, under a per-replica budget of decoded pixels (4 images at the pixel cap;
   requests wait for room), so many concurrent large images cannot exhaust the replica's memory;
   truncated or corrupt data is refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import ipaddress
import logging
import re
import socket
import time
import warnings
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from PIL import Image, UnidentifiedImageError

from deployments.errors import BadRequest
from deployments.settings import ImageSettings

logger = logging.getLogger("ray.serve")

FETCH_CHUNK = 64 * 1024
DECODE_BUDGET_IMAGES = 4  # decoded pixels held at once per replica: this many images at the cap
# Never reachable for image fetches, whatever `allowed_networks` says.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
    "169.254.170.2",  # AWS ECS task metadata
    "fd00:ec2::254",  # AWS IMDS over IPv6
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",  # Oracle Cloud
))
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: internal
# Magic bytes of formats a client may plausibly send that are not decoded here.
_SIGNATURES = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"8BPS", "PSD"), (b"%PDF", "PDF"),
               (b"\x00\x00\x01\x00", "ICO"), (b"<svg", "SVG"), (b"<?xml", "SVG/XML"),
               (b"\x00\x00\x00\x0cjP", "JPEG 2000"),
               (b"BM", "BMP"), (b"GIF8", "GIF"), (b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"RIFF", "WEBP"))


@dataclass(frozen=True)
class ImagePart:
    message: int
    part: int
    param: str  # e.g. messages[0].content[1].image_url
    source: str  # a data: URL, an http(s) URL, or raw base64 (an `image` part)
    kind: str  # "image_url" or "image"


# -- addresses and hosts -------------------------------------------------------------------------


def address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                    exempt: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()) -> str | None:
    """Why an image may not be fetched from `ip`, or None when it may."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if mapped is not None:
            ip = mapped
        elif ip in ipaddress.ip_network("64:ff9b::/96"):  # NAT64 of an IPv4 address
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_loopback:
        kind = "a loopback address"
    elif ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return "a reserved address"
    elif ip.is_private or (ip.version == 4 and ip in SHARED_ADDRESS_SPACE) or not ip.is_global:
        kind = "a private address"
    else:
        return None
    if any(ip.version == net.version and ip in net for net in exempt):
        return None
    return kind


def _split_host_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, int(port)
    return entry, None


def host_allowed(host: str, port: int, allowed: Sequence[str]) -> bool:
    for entry in allowed:
        name, want_port = _split_host_port(entry)
        if want_port is not None and want_port != port:
            continue
        if name.startswith("*."):
            if host.endswith(name[1:]) and host != name[2:]:
                return True
        elif host == name:
            return True
    return False


# -- sources ---------------------------------------------------------------------------------------


def find_image_parts(messages: Any, max_images: int) -> list[ImagePart]:
    """The image parts of a chat request in prompt order; refuses too many and misplaced ones.
    Anything else malformed is left to the tokenizer's validation."""
    parts: list[ImagePart] = []
    if not isinstance(messages, list):
        return parts
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("image_url", "image"):
                continue
            param = f"messages[{i}].content[{j}].{kind}"
            if msg.get("role") != "user":
                raise BadRequest(f"{param}: images are accepted in user messages only", param)
            value = part.get(kind)
            if kind == "image_url" and isinstance(value, dict):
                value = value.get("url")
            if not isinstance(value, str) or not value:
                raise BadRequest(f"{param}: expected a URL string" if kind == "image_url"
                                 else f"{param}: expected a base64 string", param)
            parts.append(ImagePart(i, j, param, value.strip(), kind))
    if len(parts) > max_images:
        raise BadRequest(f"messages: the request has {len(parts)} images; max_images_per_request is {max_images}",
                         "messages")
    return parts


def decode_base64_image(source: str, max_bytes: int, param: str) -> bytes:
    """The bytes of a `data:[image/*][;params];base64,` URL, or of a bare base64 string; the size is
    checked from the encoded length before anything is decoded."""
    payload = source
    if source[:5].lower() == "data:":
        header, sep, payload = source[5:].partition(",")
        if not sep:
            raise BadRequest(f"{param}: malformed data URL (no comma)", param)
        fields = [f.strip().lower() for f in header.split(";")]
        if "base64" not in fields[1:]:
            raise BadRequest(f"{param}: only base64 data URLs are accepted", param)
        if fields[0] and not fields[0].startswith("image/"):
            raise BadRequest(f"{param}: data URL media type {fields[0]!r} is not an image type", param)
    payload = "".join(payload.split())  # tolerate line breaks
    estimate = len(payload) * 3 // 4 - payload[-2:].count("=")
    if estimate > max_bytes:
        raise BadRequest(f"{param}: image is {estimate} bytes; max_image_bytes is {max_bytes}", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{param}: image data is not valid base64", param) from None


# -- fetching --------------------------------------------------------------------------------------


class _PinnedResolver:
    """An aiohttp resolver that answers only with addresses already checked."""

    def __init__(self, answers: dict[str, list[dict[str, Any]]]) -> None:
        self._answers = answers

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        if host not in self._answers:  # pragma: no cover - every host is resolved before connecting
            raise OSError(f"host {host} was not checked")
        return [{**a, "port": port} for a in self._answers[host]]

    async def close(self) -> None:
        return None


class ImageFetcher:
    """Fetches image URLs under the settings' allow-list, address rules and byte cap."""

    def __init__(self, settings: ImageSettings) -> None:
        self.settings = settings
        self.exempt = [ipaddress.ip_network(n, strict=False) for n in settings.allowed_networks]

    def _parse(self, url: str, param: str) -> tuple[str, str, int]:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise BadRequest(f"{param}: malformed URL: {exc}", param) from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise BadRequest(f"{param}: URL scheme {scheme or '(none)'!r} is not accepted; use a data: URL or an "
                             "http(s) URL of an allowed host", param)
        if parts.username is not None or parts.password is not None:
            raise BadRequest(f"{param}: credentials in image URLs are not accepted", param)
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise BadRequest(f"{param}: URL has no host", param)
        try:
            host = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise BadRequest(f"{param}: URL host is not a valid name", param) from None
        return scheme, host, port or (443 if scheme == "https" else 80)

    def _target(self, url: str, param: str) -> tuple[str, str, int]:
        scheme, host, port = self._parse(url, param)
        if not host_allowed(host, port, self.settings.allowed_hosts):
            allowed = ", ".join(self.settings.allowed_hosts) or "none: only data: URLs"
            raise BadRequest(f"{param}: image URL host {host!r} (port {port}) is not allowed (allowed hosts: "
                             f"{allowed})", param)
        return scheme, host, port

    async def _resolve(self, host: str, port: int, param: str) -> list[dict[str, Any]]:
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            infos = [(socket.AF_INET6 if literal.version == 6 else socket.AF_INET, str(literal))]
        else:
            try:
                found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as exc:
                raise BadRequest(f"{param}: cannot resolve image URL host {host!r}: {exc}", param) from None
            infos = list(dict.fromkeys((family, str(sockaddr[0]).split("%")[0]) for family, _, _, _, sockaddr in found))
        if not infos:
            raise BadRequest(f"{param}: image URL host {host!r} has no address", param)
        for _, addr in infos:  # every address: a name with one bad answer is refused as a whole
            problem = address_problem(ipaddress.ip_address(addr), self.exempt)
            if problem is not None:
                raise BadRequest(f"{param}: image URL host {host!r} resolves to {addr}, {problem}; refused", param)
        return [{"hostname": host, "host": addr, "port": port, "family": family, "proto": 0,
                 "flags": socket.AI_NUMERICHOST} for family, addr in infos]

    async def fetch(self, url: str, param: str) -> bytes:
        try:
            return await asyncio.wait_for(self._fetch(url, param), self.settings.fetch_timeout_s)
        except asyncio.TimeoutError:
            raise BadRequest(f"{param}: fetching the image URL took longer than {self.settings.fetch_timeout_s:g} s",
                             param) from None

    async def _fetch(self, url: str, param: str) -> bytes:
        import aiohttp

        scheme, host, port = self._target(url, param)
        cap = self.settings.max_image_bytes
        for hop in range(self.settings.max_redirects + 1):
            answers = {host: await self._resolve(host, port, param)}
            # _PinnedResolver is an AbstractResolver by its methods only, so aiohttp loads just when a URL is fetched
            resolver = _PinnedResolver(answers)
            connector = aiohttp.TCPConnector(resolver=resolver,  # type: ignore[arg-type]  # duck-typed, as above
                                             use_dns_cache=False, force_close=True)
            async with aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=False) as session:
                try:
                    async with session.get(url, allow_redirects=False, headers={
                            "Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "moe-cluster"}) as resp:
                        if resp.status in (301, 302, 303, 307, 308):
                            location = resp.headers.get("Location")
                            if not location:
                                raise BadRequest(f"{param}: image URL redirected without a Location", param)
                            target = urljoin(url, location)
                            new_scheme, new_host, new_port = self._parse(target, param)
                            same = new_host == host and (new_port == port or (scheme, new_scheme) == ("http", "https"))
                            if not same or (scheme == "https" and new_scheme != "https"):
                                raise BadRequest(f"{param}: image URL redirected to another host or scheme "
                                                 f"({new_scheme}://{new_host}:{new_port}); refused", param)
                            self._target(target, param)  # and still on the allow-list (its port too)
                            if hop == self.settings.max_redirects:
                                raise BadRequest(f"{param}: image URL redirected more than "
                                                 f"{self.settings.max_redirects} times", param)
                            url, scheme, port = target, new_scheme, new_port
                            continue
                        if resp.status != 200:
                            raise BadRequest(f"{param}: fetching the image URL answered HTTP {resp.status}", param)
                        declared = resp.content_length
                        if declared is not None and declared > cap:
                            raise BadRequest(f"{param}: image is {declared} bytes; max_image_bytes is {cap}", param)
                        data = bytearray()
                        async for chunk in resp.content.iter_chunked(FETCH_CHUNK):
                            data += chunk
                            if len(data) > cap:
                                raise BadRequest(f"{param}: image is more than {cap} bytes (max_image_bytes); "
                                                 "download stopped", param)
                        return bytes(data)
                except aiohttp.ClientError as exc:
                    raise BadRequest(f"{param}: fetching the image URL failed: {type(exc).__name__}: {exc}",
                                     param) from None
        raise AssertionError("unreachable")


# -- decoding --------------------------------------------------------------------------------------


def sniff_format(data: bytes) -> str | None:
    head = data[:16].lstrip()
    if head.startswith(b"RIFF") and data[8:12] != b"WEBP":
        return None
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


def open_header(data: bytes, settings: ImageSettings, param: str) -> Image.Image:
    """Reads only the header: format among the accepted ones, dimensions within the pixel cap."""
    if len(data) > settings.max_image_bytes:
        raise BadRequest(f"{param}: image is {len(data)} bytes; max_image_bytes is {settings.max_image_bytes}", param)
    if not data:
        raise BadRequest(f"{param}: image is empty", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below decides
            image = Image.open(io.BytesIO(data), formats=list(settings.formats))
    except Image.DecompressionBombError as exc:  # Pillow's guard: past twice max_image_pixels
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        raise BadRequest(f"{param}: image is {claimed.group(1) if claimed else 'too many'} pixels; max_image_pixels "
                         f"is {settings.max_image_pixels} (refused before decoding)", param) from None
    except UnidentifiedImageError:
        sniffed = sniff_format(data)
        if sniffed is not None and sniffed not in settings.formats:
            raise BadRequest(f"{param}: image format {sniffed} is not supported (accepted: "
                             f"{', '.join(settings.formats)})", param) from None
        raise BadRequest(f"{param}: not a decodable image: corrupt, truncated, or not one of "
                         f"{', '.join(settings.formats)}", param) from None
    except Exception as exc:  # noqa: BLE001 - any plugin failure on a hostile header is the client's
        raise BadRequest(f"{param}: corrupt image header ({type(exc).__name__}: {exc})", param) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise BadRequest(f"{param}: image has no pixels ({width}x{height})", param)
    if width * height > settings.max_image_pixels:
        raise BadRequest(f"{param}: image is {width}x{height} = {width * height} pixels; max_image_pixels is "
                         f"{settings.max_image_pixels} (refused before decoding)", param)
    return image


def decode_pixels(image: Image.Image, param: str) -> Image.Image:
    """Decodes the (first frame's) pixels of a header-checked image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Exception as exc:  # noqa: BLE001 - OSError (truncated), SyntaxError (bad chunk), zlib errors...
        raise BadRequest(f"{param}: image data is truncated or corrupt ({type(exc).__name__}: {exc})",
                         param) from None
    return image


class PixelBudget:
    """Decoded pixels held at once by this replica's requests; a request waits for room (one
    that needs more than the whole budget runs alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond: asyncio.Condition | None = None

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            await self._cond.wait_for(lambda: self.used == 0 or self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            async with self._cond:
                self.used -= pixels
                self._cond.notify_all()


class ImagePipeline:
    """One per ingress replica: turns a request's image parts into decoded PIL images."""

    def __init__(self, settings: ImageSettings, metrics: Any = None) -> None:
        self.settings = settings
        self.fetcher = ImageFetcher(settings)
        self.budget = PixelBudget(DECODE_BUDGET_IMAGES * settings.max_image_pixels)
        self._metrics = metrics
        # Pillow's own guard: warns past this, refuses past twice this, in every decode of the process.
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels

    async def _load_header(self, part: ImagePart) -> Image.Image:
        if part.kind == "image_url" and part.source[:5].lower() != "data:":
            data = await self.fetcher.fetch(part.source, part.param)
        else:
            data = decode_base64_image(part.source, self.settings.max_image_bytes, part.param)
        return await asyncio.to_thread(open_header, data, self.settings, part.param)

    @contextlib.asynccontextmanager
    async def decoded(self, messages: Any, no_vision: str | None = None) -> AsyncIterator[tuple[Any, int]]:
        """`messages` with every image part replaced by `{"type": "image", "image": <PIL image>}`,
        and the number of images; the decoded pixels count against the budget until the block ends
        (mistral-common has resized them by then). `no_vision`: the model's name when it takes no
        images (any image part is then refused before anything is fetched)."""
        parts = find_image_parts(messages, self.settings.max_images_per_request)
        if not parts:
            yield messages, 0
            return
        if no_vision is not None:
            raise BadRequest(f"{parts[0].param}: {no_vision} takes no images", parts[0].param)
        started = time.perf_counter()
        headers = await _all([self._load_header(p) for p in parts])
        pixels = sum(im.size[0] * im.size[1] for im in headers)
        async with self.budget.hold(pixels):
            images = await _all([asyncio.to_thread(decode_pixels, im, p.param)
                                 for im, p in zip(headers, parts, strict=True)])
            out = [dict(m) if isinstance(m, dict) else m for m in messages]
            for part, image in zip(parts, images, strict=True):
                content = list(out[part.message]["content"])
                content[part.part] = {"type": "image", "image": image}
                out[part.message]["content"] = content
            try:
                yield out, len(parts)
                # fetch, check, decode, and the caller's resize (mistral-common), per image
                self._observe((time.perf_counter() - started) / len(parts), len(parts))
            finally:
                for image in images:
                    image.close()

    def _observe(self, seconds_each: float, count: int) -> None:
        if self._metrics is None:
            return
        try:
            for _ in range(count):
                self._metrics.observe_preprocess(seconds_each)
        except Exception:  # noqa: BLE001 - metrics never fail a request
            logger.debug("image metrics failed", exc_info=True)


async def _all(coros: list[Any]) -> list[Any]:
    """Runs the coroutines together; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def memory_stats() -> dict[str, int]:
    """This process's resident and peak resident memory, in bytes (Linux /proc)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out["rss_bytes" if key == "VmRSS" else "peak_rss_bytes"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out
