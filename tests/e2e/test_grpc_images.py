"""Images over gRPC: `ChatMessage.parts` (text, image bytes, image URL) go through the HTTP API's
image checks and give the same answer as the same chat over HTTP; a bad image is INVALID_ARGUMENT
naming the part; a plain-string `content` still works."""

from __future__ import annotations

import grpc
import httpx2 as httpx
import pytest

from deployments.protos import moe_cluster_pb2 as pb
from deployments.protos import moe_cluster_pb2_grpc as pb_grpc
from tests import openai_check
from tests.e2e.test_images import _Images, data_url, image_host, messages, png  # noqa: F401 - image_host: fixture

NEW_TOKENS = 8
TEXT = "Describe the picture."


@pytest.fixture(scope="module")
def stub(server):
    channel = server.channel()
    yield pb_grpc.MoeClusterStub(channel)
    channel.close()


def _grpc(server, stub, image: pb.ImagePart) -> pb.ChatResponse:
    req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", parts=[pb.ContentPart(text=TEXT),
                                                                      pb.ContentPart(image=image)])],
                         sampling=pb.SamplingOptions(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    return stub.Chat(req, metadata=server.metadata(), timeout=120)


def _http(server, url: str) -> dict:
    return openai_check.body(httpx.post(server.url("/v1/chat/completions"), headers=server.headers, timeout=120,
                                        json={"messages": messages(url, text=TEXT), "max_tokens": NEW_TOKENS,
                                              "temperature": 0, "ignore_eos": True}))


def test_image_bytes_and_urls_answer_as_http_does(server, stub, image_host):  # noqa: F811 - the fixture
    picture = png(48, 32, seed=11)
    http = _http(server, data_url(picture))
    answer = http["choices"][0]["message"]["content"]
    by_bytes = _grpc(server, stub, pb.ImagePart(data=picture))
    assert by_bytes.content == answer and by_bytes.usage.prompt_tokens == http["usage"]["prompt_tokens"]
    by_data_url = _grpc(server, stub, pb.ImagePart(url=data_url(picture)))
    assert by_data_url.content == answer
    hosted = _grpc(server, stub, pb.ImagePart(url=f"{image_host}/cat.png"))
    assert hosted.content == _http(server, data_url(_Images.body))["choices"][0]["message"]["content"]
    other = _grpc(server, stub, pb.ImagePart(data=png(48, 32, seed=12)))
    assert other.usage.prompt_tokens == by_bytes.usage.prompt_tokens  # same size: the pixels alone differ


@pytest.mark.parametrize(("image", "needle"), [
    (pb.ImagePart(data=png(48, 32, seed=5)[:len(png(48, 32, seed=5)) // 2]), "truncated or corrupt"),
    (pb.ImagePart(data=b"just some text, not pixels" * 8), "not a decodable image"),
    (pb.ImagePart(url="http://169.254.169.254/latest/meta-data"), "messages[0].content[1].image_url"),
])
def test_a_bad_image_is_invalid_argument_naming_the_part(server, stub, image, needle):
    with pytest.raises(grpc.RpcError) as err:
        _grpc(server, stub, image)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "messages[0].content[1].image" in err.value.details() and needle in err.value.details()


def test_plain_string_content_still_works_and_parts_are_not_mixed_with_it(server, stub):
    plain = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=TEXT)],
                           sampling=pb.SamplingOptions(max_tokens=4, temperature=0, ignore_eos=True))
    as_parts = pb.ChatRequest(messages=[pb.ChatMessage(role="user", parts=[pb.ContentPart(text=TEXT)])],
                              sampling=pb.SamplingOptions(max_tokens=4, temperature=0, ignore_eos=True))
    one, two = (stub.Chat(r, metadata=server.metadata(), timeout=60) for r in (plain, as_parts))
    assert one.finish_reason == "length" and one.content == two.content
    both = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=TEXT, parts=[pb.ContentPart(text=TEXT)])])
    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(both, metadata=server.metadata(), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages[0]" in err.value.details()
