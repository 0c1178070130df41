"""Image prompts against transformers' Mistral3ForConditionalGeneration on the same checkpoint
and the same mistral-common pixel values; the vision encoder's batching; the image errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.engine.sampling_params import SamplingParams
from cluster.errors import RequestError
from cluster.llm import LLM
from cluster.model.vision import (
    ImageLimits,
    ImageTokenMismatchError,
    ImageTooLargeError,
    InvalidImageError,
    TooManyImagesError,
    VisionEncoder,
    image_rows,
)
from tests.reference import assert_matches_reference, load_reference, pixel_inputs, reference_greedy

NEW_TOKENS = 32
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def _data_url(width: int, height: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(text: str, *sizes: tuple[int, int], seed: int = 0) -> dict:
    """A chat prompt with one random image per (width, height) in `sizes`."""
    parts = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": _data_url(w, h, seed + i)}} for i, (w, h) in enumerate(sizes)]
    return {"messages": [{"role": "user", "content": parts}]}


def _assert_clean(llm: LLM) -> None:
    llm.engine.check_integrity()
    assert not llm.engine.has_unfinished()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    # A 20-token budget splits image prompts into prefill chunks that cut through [IMG] runs.
    engine_llm = LLM(tiny_ckpt, max_num_batched_tokens=20)
    yield engine_llm
    engine_llm.engine.close()


@pytest.fixture(scope="module")
def encoder(tiny_ckpt) -> VisionEncoder:
    return VisionEncoder.from_model_dir(tiny_ckpt)


def _check_image_request(llm: LLM, tiny_ckpt, prompt: dict, num_images: int) -> None:
    chat = llm.tokenizer.encode_chat(prompt["messages"])
    assert len(chat.images) == num_images
    assert chat.token_ids.count(llm.tokenizer.img_id) > 0
    calls = llm.vision.calls
    [out] = llm.generate(prompt, GREEDY, use_tqdm=False)
    assert llm.vision.calls == calls + 1
    assert list(out.prompt_token_ids) == chat.token_ids
    ref = reference_greedy(tiny_ckpt, chat.token_ids, NEW_TOKENS, **pixel_inputs(chat.images))
    assert_matches_reference(out.token_ids, ref, f"{num_images}-image request")
    # the pixels must matter, or this parity would hold with the images ignored
    assert reference_greedy(tiny_ckpt, chat.token_ids, NEW_TOKENS).tokens != ref.tokens
    _assert_clean(llm)


def test_encoder_matches_transformers_image_features(tiny_ckpt, encoder):
    rng = np.random.default_rng(1)
    images = [rng.standard_normal((3, 64, 96)).astype(np.float32), rng.standard_normal((3, 128, 32)).astype(np.float32)]
    got = encoder.encode(images)
    ref = load_reference(str(tiny_ckpt))
    with torch.no_grad():
        want = ref.model.get_image_features(**pixel_inputs(images)).pooler_output
    assert [tuple(g.shape) for g in got] == [(6, encoder.hidden_size), (4, encoder.hidden_size)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_encoder_batches_several_images_in_one_call(encoder):
    rng = np.random.default_rng(2)
    images = [rng.standard_normal(shape).astype(np.float32) for shape in ((3, 32, 32), (3, 96, 64), (3, 64, 128))]
    calls = encoder.calls
    batched = encoder.encode(images)
    assert encoder.calls == calls + 1
    assert [e.shape[0] for e in batched] == [1, 6, 8]
    for image, emb in zip(images, batched, strict=True):
        torch.testing.assert_close(emb, encoder.encode([torch.from_numpy(image)])[0], rtol=0, atol=1e-5)
    assert encoder.calls == calls + 4
    assert encoder.encode([]) == [] and encoder.calls == calls + 4


def test_one_image_parity(llm, tiny_ckpt):
    _check_image_request(llm, tiny_ckpt, _chat("Describe this image.", (60, 40)), 1)


def test_two_images_of_different_sizes_parity(llm, tiny_ckpt):
    _check_image_request(llm, tiny_ckpt, _chat("Compare these images.", (60, 40), (100, 70), seed=3), 2)


def test_image_request_batched_with_text_requests(llm, tiny_ckpt):
    tok = llm.tokenizer
    image_prompt = _chat("What is in the picture?", (100, 70), seed=7)
    chat = tok.encode_chat(image_prompt["messages"])
    two = _chat("And these two?", (40, 60), (70, 100), seed=9)
    two_chat = tok.encode_chat(two["messages"])
    text_chat = {"messages": [{"role": "user", "content": "Tell me a story about a lighthouse."}]}
    prompts = [
        "The quick brown fox",
        image_prompt,
        list(range(1000, 1040)),
        text_chat,
        {"prompt_token_ids": two_chat.token_ids, "images": two_chat.images},
    ]
    calls = llm.vision.calls
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.vision.calls == calls + 1  # three images of two requests, one encoder call
    refs = [
        reference_greedy(tiny_ckpt, tok.encode_text(prompts[0]), NEW_TOKENS),
        reference_greedy(tiny_ckpt, chat.token_ids, NEW_TOKENS, **pixel_inputs(chat.images)),
        reference_greedy(tiny_ckpt, prompts[2], NEW_TOKENS),
        reference_greedy(tiny_ckpt, tok.encode_chat(text_chat["messages"]).token_ids, NEW_TOKENS),
        reference_greedy(tiny_ckpt, two_chat.token_ids, NEW_TOKENS, **pixel_inputs(two_chat.images)),
    ]
    for i, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        assert_matches_reference(out.token_ids, ref, f"request {i}")
    _assert_clean(llm)


def test_too_many_images(llm):
    llm.image_limits = ImageLimits(max_images_per_request=1)
    try:
        with pytest.raises(TooManyImagesError, match="2 images; max_images_per_request is 1") as err:
            llm.generate(["text first", _chat("two", (40, 40), (40, 40))], GREEDY, use_tqdm=False)
    finally:
        llm.image_limits = ImageLimits()
    assert err.value.limit == "max_images_per_request"
    _assert_clean(llm)  # nothing of the call was admitted


def test_too_many_pixels(llm):
    llm.image_limits = ImageLimits(max_image_pixels=64 * 64)
    try:
        with pytest.raises(ImageTooLargeError, match=r"image 1 is 96x128 = 12288 pixels; max_image_pixels is 4096"):
            llm.generate(_chat("big", (60, 40), (100, 70)), GREEDY, use_tqdm=False)
    finally:
        llm.image_limits = ImageLimits()
    _assert_clean(llm)
    with pytest.raises(ImageTooLargeError) as err:
        ImageLimits(max_image_pixels=100).check([np.zeros((3, 32, 32), np.float32)])
    assert (err.value.index, err.value.limit) == (0, "max_image_pixels")


def test_image_token_count_mismatch(llm):
    chat = llm.tokenizer.encode_chat(_chat("one", (60, 40))["messages"])
    extra = np.zeros((3, 32, 32), np.float32)
    with pytest.raises(ImageTokenMismatchError, match="4 image tokens .* give 5 embedding rows"):
        llm.generate({"prompt_token_ids": chat.token_ids, "images": [*chat.images, extra]}, GREEDY, use_tqdm=False)
    with pytest.raises(ImageTokenMismatchError, match="0 image tokens"):
        llm.generate({"prompt_token_ids": [1, 1000, 1001], "images": chat.images}, GREEDY, use_tqdm=False)
    _assert_clean(llm)
    with pytest.raises(ImageTokenMismatchError, match="3 image tokens .* give 2 embedding rows"):
        image_rows([1, 10, 10, 10, 2], [torch.zeros(2, 4)], 10)
    # the right total, split the wrong way between two images: caught per image by [IMG_END]
    with pytest.raises(ImageTokenMismatchError, match="image 0 has 1 image tokens in the prompt but 2") as err:
        image_rows([1, 10, 13, 10, 10, 13], [torch.zeros(2, 4), torch.zeros(1, 4)], 10, 13)
    assert err.value.index == 0
    rows = image_rows([1, 10, 13, 10, 10, 13], [torch.ones(1, 4), torch.full((2, 4), 2.0)], 10, 13)
    assert rows.positions.tolist() == [1, 3, 4]
    assert rows.embeds[:, 0].tolist() == [1.0, 2.0, 2.0]


def test_malformed_images_are_named(llm, encoder):
    chat = llm.tokenizer.encode_chat(_chat("two", (60, 40), (100, 70))["messages"])
    bad = chat.images[1][:, :50]  # 50 rows: not a multiple of patch x merge
    with pytest.raises(InvalidImageError, match=r"image 1 has shape \(3, 50, 128\)") as err:
        llm.generate({"prompt_token_ids": chat.token_ids, "images": [chat.images[0], bad]}, GREEDY, use_tqdm=False)
    assert err.value.index == 1
    nan = chat.images[0].copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(InvalidImageError, match="image 0 has non-finite"):
        encoder.encode([nan])
    with pytest.raises(InvalidImageError, match="image 0 is a str"):
        encoder.encode(["not an image"])
    with pytest.raises(InvalidImageError, match="image 1 is a ndarray of dtype uint8"):
        encoder.encode([chat.images[0], np.zeros((3, 32, 32), np.uint8)])
    with pytest.raises(RequestError, match="got keys"):
        llm.generate({"prompt_token_ids": [1, 2], "image": []}, GREEDY, use_tqdm=False)
    _assert_clean(llm)
    [out] = llm.generate(_chat("still serving", (60, 40)), GREEDY, use_tqdm=False)
    assert len(out.token_ids) == NEW_TOKENS
    _assert_clean(llm)
