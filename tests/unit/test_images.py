"""deployments/images.py without Ray: sources, address rules, fetch limits, header checks before
decoding, and the decoded-pixel budget."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import ipaddress
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

from deployments.errors import BadRequest
from deployments.frontend.images import (
    ImageFetcher,
    ImagePipeline,
    PixelBudget,
    address_problem,
    decode_base64_image,
    decode_pixels,
    find_image_parts,
    host_allowed,
    open_header,
)
from deployments.settings import ImageSettings

PARAM = "messages[0].content[1].image_url"


def png_bytes(width: int = 40, height: int = 30, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def chat(*parts: dict, role: str = "user") -> list[dict]:
    return [{"role": role, "content": [{"type": "text", "text": "look"}, *parts]}]


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# -- parts and data URLs -------------------------------------------------------------------------


def test_parts_are_found_in_order_and_named():
    msgs = chat(image_part("data:image/png;base64,AAAA"), {"type": "image", "image": "AAAA"},
                {"type": "image_url", "image_url": "https://x/y.png"})
    parts = find_image_parts(msgs, 8)
    assert [p.param for p in parts] == ["messages[0].content[1].image_url", "messages[0].content[2].image",
                                        "messages[0].content[3].image_url"]
    assert [p.source for p in parts] == ["data:image/png;base64,AAAA", "AAAA", "https://x/y.png"]


def test_too_many_images_and_misplaced_images_are_refused():
    with pytest.raises(BadRequest, match="3 images; max_images_per_request is 2") as err:
        find_image_parts(chat(*[image_part("data:,") for _ in range(3)]), 2)
    assert err.value.param == "messages"
    with pytest.raises(BadRequest, match=r"messages\[0\].content\[1\].image_url: images are accepted in user"):
        find_image_parts(chat(image_part("data:,"), role="assistant"), 8)
    with pytest.raises(BadRequest, match="expected a URL string"):
        find_image_parts(chat({"type": "image_url", "image_url": {"url": 3}}), 8)


def test_data_urls():
    png = png_bytes()
    assert decode_base64_image(data_url(png), 10**6, PARAM) == png
    assert decode_base64_image(base64.b64encode(png).decode(), 10**6, PARAM) == png  # a raw `image` part
    with pytest.raises(BadRequest, match=r"image is \d+ bytes; max_image_bytes is 100") as err:
        decode_base64_image(data_url(png), 100, PARAM)
    assert err.value.param == PARAM
    with pytest.raises(BadRequest, match="only base64 data URLs"):
        decode_base64_image("data:image/png,rawbytes", 10**6, PARAM)
    with pytest.raises(BadRequest, match="not an image type"):
        decode_base64_image("data:text/html;base64,AAAA", 10**6, PARAM)
    with pytest.raises(BadRequest, match="not valid base64"):
        decode_base64_image("data:image/png;base64,@@@@", 10**6, PARAM)


# -- headers before pixels -------------------------------------------------------------------------


def test_bomb_header_is_refused_before_decoding():
    settings = ImageSettings()
    bomb = png_claiming(20000, 20000)
    assert len(bomb) < 200
    started = time.perf_counter()
    with pytest.raises(BadRequest, match=r"400000000 pixels; max_image_pixels is 25000000 "
                                         r"\(refused before decoding\)") as err:
        open_header(bomb, settings, PARAM)
    with pytest.raises(BadRequest, match=r"image is 6000x6000 = 36000000 pixels; max_image_pixels is 25000000"):
        open_header(png_claiming(6000, 6000), settings, PARAM)  # under Pillow's 2x: our own check
    assert time.perf_counter() - started < 0.5 and err.value.param == PARAM
    # Past twice the cap, Pillow's own guard (set to the same cap) refuses it too.
    ImagePipeline(settings)
    assert Image.MAX_IMAGE_PIXELS == settings.max_image_pixels
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))


def test_truncated_corrupt_and_unsupported_images():
    settings = ImageSettings()
    png = png_bytes(64, 64)
    image = open_header(png, settings, PARAM)
    assert image.size == (64, 64) and decode_pixels(image, PARAM).getpixel((0, 0)) == (200, 30, 30)

    truncated = png[: len(png) // 2]
    with pytest.raises(BadRequest, match="truncated or corrupt"):
        decode_pixels(open_header(truncated, settings, PARAM), PARAM)
    with pytest.raises(BadRequest, match="corrupt image header"):
        open_header(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, settings, PARAM)
    with pytest.raises(BadRequest, match="not a decodable image"):
        open_header(b"hello, world" * 10, settings, PARAM)
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    with pytest.raises(BadRequest, match=r"image format TIFF is not supported \(accepted: PNG, JPEG"):
        open_header(tiff.getvalue(), settings, PARAM)
    with pytest.raises(BadRequest, match="image is empty"):
        open_header(b"", settings, PARAM)


def test_pipeline_replaces_parts_with_decoded_images():
    pipeline = ImagePipeline(ImageSettings())
    msgs = chat(image_part(data_url(png_bytes(40, 30))))

    async def run():
        async with pipeline.decoded(msgs) as (out, count):
            assert count == 1 and pipeline.budget.used == 40 * 30
            part = out[0]["content"][1]
            assert part["type"] == "image" and part["image"].size == (40, 30)
        assert pipeline.budget.used == 0
        assert msgs[0]["content"][1]["type"] == "image_url"  # the request body is left alone
        with pytest.raises(BadRequest, match=r"content\[1\].image_url: model-x takes no images"):
            async with pipeline.decoded(msgs, "model-x"):
                pass

    asyncio.run(run())


def test_pixel_budget_makes_requests_wait_for_room():
    async def run():
        budget = PixelBudget(100)
        order = []
        waiting = {"b": asyncio.Event(), "c": asyncio.Event()}

        async def hold(name: str, pixels: int, until: tuple[str, ...] = ()):
            if name in waiting:
                waiting[name].set()  # no await between this and the wait for room in hold()
            async with budget.hold(pixels):
                order.append(f"{name}+")
                for other in until:  # a holds its pixels until b and c wait for room
                    await waiting[other].wait()
                order.append(f"{name}-")

        await asyncio.gather(hold("a", 80, until=("b", "c")), hold("b", 80), hold("c", 500))
        # b waited for a; c (over the whole budget) ran alone
        assert order == ["a+", "a-", "b+", "b-", "c+", "c-"]
        assert budget.used == 0

    asyncio.run(run())


# -- addresses and hosts -----------------------------------------------------------------------------


@pytest.mark.parametrize(("addr", "problem"), [
    ("8.8.8.8", None), ("2606:4700::1111", None),
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("127.1.2.3", "loopback"),
    ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("172.16.5.4", "private"), ("fc00::1", "private"),
    ("100.64.1.1", "private"), ("169.254.169.254", "metadata"), ("fd00:ec2::254", "metadata"),
    ("100.100.100.200", "metadata"), ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("0.0.0.0", "reserved"), ("224.0.0.1", "reserved"), ("64:ff9b::7f00:1", "loopback"),
])
def test_address_rules(addr, problem):
    got = address_problem(ipaddress.ip_address(addr))
    assert (got is None) if problem is None else (problem in got), (addr, got)


def test_exempt_networks_cover_loopback_and_private_only():
    exempt = [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("169.254.0.0/16"),
              ipaddress.ip_network("10.0.0.0/8")]
    assert address_problem(ipaddress.ip_address("127.0.0.1"), exempt) is None
    assert address_problem(ipaddress.ip_address("10.9.9.9"), exempt) is None
    assert "loopback" in address_problem(ipaddress.ip_address("127.0.0.2"), exempt)
    assert "metadata" in address_problem(ipaddress.ip_address("169.254.169.254"), exempt)
    assert "link-local" in address_problem(ipaddress.ip_address("169.254.3.3"), exempt)


def test_host_allow_list():
    allowed = ("images.example.com", "*.cdn.example.org", "127.0.0.1:8080", "[::1]")
    assert host_allowed("images.example.com", 443, allowed)
    assert not host_allowed("evil.images.example.com", 443, allowed)
    assert host_allowed("a.b.cdn.example.org", 80, allowed) and not host_allowed("cdn.example.org", 80, allowed)
    assert host_allowed("127.0.0.1", 8080, allowed) and not host_allowed("127.0.0.1", 8081, allowed)
    assert host_allowed("::1", 80, allowed)


# -- fetching from a local server --------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802
        kind, value = self.routes.get(self.path, ("status", 404))
        if kind == "status":
            self.send_response(value)
            self.end_headers()
        elif kind == "redirect":
            self.send_response(302)
            self.send_header("Location", value)
            self.end_headers()
        elif kind == "chunked":  # no Content-Length: only the streaming cap can stop it
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for _ in range(value):
                    block = b"\x00" * 65536
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
        else:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(value)))
            self.end_headers()
            self.wfile.write(value)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.protocol_version = "HTTP/1.1"
    port = server.server_address[1]
    _Handler.routes = {
        "/cat.png": ("body", png_bytes(20, 10)),
        "/big.png": ("body", b"\x89PNG" + b"\x00" * 300_000),
        "/endless": ("chunked", 100),
        "/same-host": ("redirect", "/cat.png"),
        "/other-host": ("redirect", "http://example.com/cat.png"),
        "/loop": ("redirect", "/loop"),
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port
    server.shutdown()


def _fetch(settings: ImageSettings, url: str) -> bytes:
    return asyncio.run(ImageFetcher(settings).fetch(url, PARAM))


def test_fetch_allowed_host_and_limits(image_server):
    port = image_server
    ok = ImageSettings(allowed_hosts=("127.0.0.1",), allowed_networks=("127.0.0.1/32",), max_image_bytes=200_000)
    assert _fetch(ok, f"http://127.0.0.1:{port}/cat.png") == png_bytes(20, 10)
    assert _fetch(ok, f"http://127.0.0.1:{port}/same-host") == png_bytes(20, 10)
    with pytest.raises(BadRequest, match="is 300004 bytes; max_image_bytes is 200000"):  # declared length
        _fetch(ok, f"http://127.0.0.1:{port}/big.png")
    with pytest.raises(BadRequest, match="more than 200000 bytes .* download stopped"):  # while streaming
        _fetch(ok, f"http://127.0.0.1:{port}/endless")
    with pytest.raises(BadRequest, match="another host"):
        _fetch(ok, f"http://127.0.0.1:{port}/other-host")
    with pytest.raises(BadRequest, match="redirected more than 3 times"):
        _fetch(ok, f"http://127.0.0.1:{port}/loop")
    with pytest.raises(BadRequest, match="answered HTTP 404"):
        _fetch(ok, f"http://127.0.0.1:{port}/missing.png")


def test_fetch_refusals(image_server):
    port = image_server
    listed_only = ImageSettings(allowed_hosts=("127.0.0.1", "localhost", "169.254.169.254"))
    with pytest.raises(BadRequest, match=r"resolves to 127.0.0.1, a loopback address; refused") as err:
        _fetch(listed_only, f"http://127.0.0.1:{port}/cat.png")  # listed, but loopback is not exempt
    assert err.value.param == PARAM
    with pytest.raises(BadRequest, match="loopback address; refused"):
        _fetch(listed_only, f"http://localhost:{port}/cat.png")
    with pytest.raises(BadRequest, match="169.254.169.254, a cloud metadata address"):
        _fetch(ImageSettings(allowed_hosts=("169.254.169.254",), allowed_networks=("169.254.0.0/16",)),
               "http://169.254.169.254/latest/meta-data/")
    with pytest.raises(BadRequest, match=r"host 'example.com' \(port 80\) is not allowed"):
        _fetch(listed_only, "http://example.com/cat.png")
    with pytest.raises(BadRequest, match="scheme 'file' is not accepted"):
        _fetch(listed_only, "file:///etc/passwd")
    with pytest.raises(BadRequest, match="credentials"):
        _fetch(listed_only, f"http://user:pw@127.0.0.1:{port}/cat.png")
    with pytest.raises(BadRequest, match="not allowed"):  # an empty allow-list: data: URLs only
        _fetch(ImageSettings(), "https://images.example.com/cat.png")
