"""Images end to end: the ingress decodes and checks them, the VisionEncoder deployment batches
them, the engine merges the embeddings; parity with transformers; every bad image a 4xx naming it."""

from __future__ import annotations

import base64
import concurrent.futures
import http.server
import io
import threading

import httpx2 as httpx
import numpy as np
import openai
import pytest
from PIL import Image

from cluster.model.tokenizer import Tokenizer
from tests import openai_check
from tests.e2e.support import KEY, MAX_IMAGE_BYTES, MAX_IMAGES
from tests.reference import assert_matches_reference, pixel_inputs, reference_greedy
from tests.unit.test_images import png_claiming

NEW_TOKENS = 12
PART = "messages[0].content[1].image_url"


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def messages(*urls: str, text: str = "Describe the picture.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}]


def client(server) -> openai.OpenAI:
    return openai_check.client(server.url("/v1"), KEY, timeout=120)


def chat(server, msgs: list[dict], max_tokens: int = 2) -> httpx.Response:
    """The answer (its body checked if it is a 200)."""
    r = httpx.post(server.url("/v1/chat/completions"), headers=server.headers, timeout=120, json={
        "messages": msgs, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    if r.status_code == 200:
        openai_check.body(r)
    return r


def vision_stats(server, app: str = "main") -> dict:
    from ray import serve

    name = server.app(app).app_name
    return serve.get_deployment_handle("VisionEncoder", app_name=name).stats.remote().result(timeout_s=30)


def ingress_stats(server, app: str = "main") -> dict:
    from ray import serve

    return serve.get_app_handle(server.app(app).app_name).process_stats.remote().result(timeout_s=30)


def test_image_answer_matches_transformers(server):
    msgs = messages(data_url(png(60, 40, seed=1)))
    r = client(server).chat.completions.create(model="", messages=msgs, max_tokens=NEW_TOKENS, temperature=0,
                                               extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = r.choices[0].model_dump()
    encoded = Tokenizer.from_model_dir(server.model_dirs["main"]).encode_chat(msgs)
    assert choice["prompt_token_ids"] == encoded.token_ids  # the ingress's decode = mistral-common's own
    model_dir = server.model_dirs["main"]
    ref = reference_greedy(model_dir, encoded.token_ids, NEW_TOKENS, **pixel_inputs(encoded.images))
    assert_matches_reference(choice["token_ids"], ref, "image request")
    assert reference_greedy(model_dir, encoded.token_ids, NEW_TOKENS).tokens != ref.tokens  # the pixels matter


def test_two_concurrent_image_requests_share_one_encoder_batch(server):
    before = vision_stats(server)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda seed: chat(server, messages(data_url(png(48, 32, seed)))), (3, 4)))
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    after = vision_stats(server)
    assert after["batches"] == before["batches"] + 1, after["recent"][-3:]
    assert after["requests"] == before["requests"] + 2 and after["images"] == before["images"] + 2
    assert after["recent"][-1]["requests"] == 2
    assert after["tower_calls"] == before["tower_calls"] + 1


class _Images(http.server.BaseHTTPRequestHandler):
    body = png(32, 32, seed=9)

    def do_GET(self):  # noqa: N802
        if self.path == "/away":
            self.send_response(302)
            self.send_header("Location", "http://example.com/cat.png")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_image_from_an_allowed_host(server, image_host):
    r = chat(server, messages(f"{image_host}/cat.png"))
    assert r.status_code == 200, r.text
    data = chat(server, messages(data_url(_Images.body)))
    assert data.json()["usage"]["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]


def _bad_cases(image_host: str) -> list[tuple[str, list[dict], str, str]]:
    good = png(48, 32, seed=5)
    big = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    assert MAX_IMAGE_BYTES < len(buf.getvalue()) < 200_000
    return [
        ("truncated", messages(data_url(good[: len(good) // 2])), PART, "truncated or corrupt"),
        ("corrupt", messages(data_url(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)), PART, "corrupt"),
        ("not an image", messages(data_url(b"just some text, not pixels" * 8)), PART, "not a decodable image"),
        ("oversized bytes", messages(data_url(buf.getvalue())), PART, f"max_image_bytes is {MAX_IMAGE_BYTES}"),
        ("bomb", messages(data_url(png_claiming(20000, 20000))), PART, "refused before decoding"),
        ("too many", messages(*[data_url(good)] * (MAX_IMAGES + 1)), "messages",
         f"{MAX_IMAGES + 1} images; max_images_per_request is {MAX_IMAGES}"),
        ("host not allowed", messages("https://example.com/cat.png"), PART, "'example.com' (port 443) is not allowed"),
        ("metadata address", messages("http://169.254.169.254/latest/meta-data/"), PART, "cloud metadata address"),
        ("redirect away", messages(f"{image_host}/away"), PART, "redirected to another host"),
        ("file URL", messages("file:///etc/passwd"), PART, "scheme 'file' is not accepted"),
        ("raw image part", [{"role": "user", "content": [{"type": "text", "text": "x"},
                                                          {"type": "image", "image": "bm90IGFuIGltYWdl"}]}],
         "messages[0].content[1].image", "not a decodable image"),
    ]


def test_bad_images_are_4xx_naming_the_part(server, image_host):
    for name, msgs, param, words in _bad_cases(image_host):
        r = chat(server, msgs)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert error["param"] == param, (name, error)
        assert words in error["message"] and param in error["message"], (name, error["message"])
    r = chat(server, messages(data_url(png(48, 32, seed=6))))  # still serving
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_decompression_bomb_does_not_grow_the_ingress(server):
    bomb = messages(data_url(png_claiming(20000, 20000)))
    chat(server, bomb)  # warm the code path
    before = ingress_stats(server)
    for _ in range(3):
        r = chat(server, bomb)
        assert r.status_code == 400 and "max_image_pixels" in r.json()["error"]["message"]
    after = ingress_stats(server)
    # decoding it would take 20000 x 20000 x 3 bytes = 1.2 GB
    assert after["peak_rss_bytes"] - before["peak_rss_bytes"] < 32 * 2**20, (before, after)
    assert after["rss_bytes"] - before["rss_bytes"] < 32 * 2**20, (before, after)
    assert after["image_pixels_held"] == 0 and after["prompt_tokens_in_flight"] == 0
    assert chat(server, messages(data_url(png(48, 32, seed=7)))).status_code == 200


def test_images_refused_where_no_encoder_runs(server):
    r = httpx.post(server.url("/v1/chat/completions", "think"), headers=server.headers, timeout=60,
                   json={"messages": messages(data_url(png(32, 32))), "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == PART
    assert "takes no images" in r.json()["error"]["message"]
