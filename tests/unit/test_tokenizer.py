import base64
import io
import math
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster.errors import CheckpointError, RequestError
from cluster.model.tokenizer import (
    IncrementalDecoder,
    InvalidChatRequestError,
    Tokenizer,
    TokenizerFormatError,
    TokenizerNotFoundError,
    write_tekken_v15,
)

PATCH, MERGE, MAX_SIZE = 14, 2, 1540
USER_HI = [{"role": "user", "content": "hi"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("model")
    write_tekken_v15(
        d / "tekken.json",
        image_patch_size=PATCH,
        spatial_merge_size=MERGE,
        max_image_size=MAX_SIZE,
    )
    return d


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_model_dir(model_dir)


def _png_data_url(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_v15_file_loads(tok: Tokenizer) -> None:
    assert tok.vocab_size == 131072
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 11)
    assert tok.think_id == tok.special_id("[THINK]") == 25
    for attr in (
        "end_think_id",
        "tool_calls_id",
        "args_id",
        "img_id",
        "img_break_id",
        "img_end_id",
    ):
        assert isinstance(getattr(tok, attr), int)
    assert tok.is_special(25) and tok.is_special(999) and not tok.is_special(1000)
    with pytest.raises(KeyError):
        tok.special_id("[NOT_A_TOKEN]")


def test_think_round_trip(tok: Tokenizer) -> None:
    ids = [tok.think_id, *tok.encode_text("reasoning", bos=False), tok.end_think_id]
    assert tok.decode(ids, skip_special=False) == "[THINK]reasoning[/THINK]"
    assert tok.decode(ids) == "reasoning"
    # Special-token strings in user text must not turn into control tokens.
    assert tok.think_id not in tok.encode_text("[THINK]")


def test_reasoning_effort_high(tok: Tokenizer) -> None:
    ids = tok.encode_chat(USER_HI, reasoning_effort="high").token_ids
    text = tok.decode(ids, skip_special=False)
    assert text == '<s>[MODEL_SETTINGS]{"reasoning_effort": "high"}[/MODEL_SETTINGS][INST]hi[/INST]'
    assert ids[0] == tok.bos_id and ids[1] == tok.special_id("[MODEL_SETTINGS]")


def test_reasoning_effort_default_is_none_setting(tok: Tokenizer) -> None:
    text = tok.decode(tok.encode_chat(USER_HI).token_ids, skip_special=False)
    assert '[MODEL_SETTINGS]{"reasoning_effort": "none"}[/MODEL_SETTINGS]' in text


@pytest.mark.parametrize("effort", ["bogus", "medium"])
def test_reasoning_effort_invalid(tok: Tokenizer, effort: str) -> None:
    with pytest.raises(InvalidChatRequestError, match="reasoning_effort") as exc:
        tok.encode_chat(USER_HI, reasoning_effort=effort)
    assert exc.value.field == "reasoning_effort"


def test_tools_encoded(tok: Tokenizer) -> None:
    ids = tok.encode_chat([{"role": "user", "content": "weather in Paris?"}], tools=[WEATHER_TOOL]).token_ids
    assert tok.special_id("[AVAILABLE_TOOLS]") in ids
    assert tok.special_id("[/AVAILABLE_TOOLS]") in ids
    assert '"name": "get_weather"' in tok.decode(ids)


def test_tool_call_history(tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "abcDEF123",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris"}',
                    },
                },
            ],
        },
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "sunny"},
    ]
    ids = tok.encode_chat(messages, tools=[WEATHER_TOOL]).token_ids
    assert tok.tool_calls_id in ids and tok.args_id in ids


@pytest.mark.parametrize(
    ("messages", "tools", "field"),
    [
        ([{"role": "wizard", "content": "x"}], None, "messages[0].role"),
        ([{"role": "user", "content": "x"}, "nope"], None, "messages[1]"),
        ([{"role": "user", "content": [{"type": "video"}]}], None, "messages[0]"),
        ([], None, "messages"),
        (
            USER_HI,
            [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "bogus"}},
                }
            ],
            "tools",
        ),
        (USER_HI, [{"type": "function"}], "tools[0]"),
        ([{"role": "user", "content": [{"type": "image", "image": "not base64!"}]}], None, "messages[0]"),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}],
                }
            ],
            None,
            "messages[0].content[0].image_url",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": "http://10.0.0.1/x.png"}]}],
            None,
            "messages[0].content[0].image_url",
        ),
        (
            USER_HI,
            [{"type": "function", "function": {"name": "bad name!", "parameters": {}}}],
            "tools",
        ),
    ],
)
def test_invalid_requests(tok: Tokenizer, messages: list, tools: list | None, field: str) -> None:
    with pytest.raises(InvalidChatRequestError) as exc:
        tok.encode_chat(messages, tools=tools)
    assert exc.value.field.startswith(field)
    assert isinstance(exc.value, RequestError)
    assert str(exc.value).startswith(field)


@pytest.mark.parametrize(("width", "height"), [(100, 70), (3000, 500)])
def test_image_layout(tok: Tokenizer, width: int, height: int) -> None:
    pytest.importorskip("cv2", reason="mistral-common image preprocessing needs opencv")
    content = [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": _png_data_url(width, height)}},
    ]
    enc = tok.encode_chat([{"role": "user", "content": content}])

    scale = min(1.0, MAX_SIZE / max(width, height))
    cols = math.ceil(round(width * scale) / (PATCH * MERGE))
    rows = math.ceil(round(height * scale) / (PATCH * MERGE))
    ids = enc.token_ids
    first, last = ids.index(tok.img_id), ids.index(tok.img_end_id)
    block = ids[first : last + 1]
    expected = ([tok.img_id] * cols + [tok.img_break_id]) * rows
    expected[-1] = tok.img_end_id
    assert block == expected
    assert ids.count(tok.img_id) == cols * rows

    assert len(enc.images) == 1
    image = enc.images[0]
    assert isinstance(image, np.ndarray) and image.dtype == np.float32
    assert image.shape == (3, rows * PATCH * MERGE, cols * PATCH * MERGE)


def test_image_part_type_image(tok: Tokenizer) -> None:
    pytest.importorskip("cv2", reason="mistral-common image preprocessing needs opencv")
    url = _png_data_url(56, 56)
    pil = Image.new("RGB", (56, 56))
    for part in ({"type": "image", "image": url}, {"type": "image", "image": pil}):
        enc = tok.encode_chat([{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}])
        assert enc.token_ids.count(tok.img_id) == 4 and len(enc.images) == 1


def test_text_round_trip(tok: Tokenizer) -> None:
    text = "Grüße, мир! 日本語 🙂 ∑x²"
    ids = tok.encode_text(text)
    assert ids[0] == tok.bos_id
    assert tok.encode_text(text, bos=False) == ids[1:]
    assert tok.decode(ids) == text


def test_incremental_decoder(tok: Tokenizer) -> None:
    text = "héllo 世界 🙂 done"
    ids = [tok.think_id, *tok.encode_text(text, bos=True), tok.eos_id]
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    # Feeding byte-level tokens of one emoji: nothing is emitted until the character is complete.
    dec = IncrementalDecoder(tok)
    emoji_bytes = [1000 + b for b in "🙂".encode()]
    assert [dec.push(i) for i in emoji_bytes] == ["", "", "", "🙂"]


def test_missing_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(TokenizerNotFoundError, match=re.escape(str(tmp_path))) as exc:
        Tokenizer.from_model_dir(tmp_path)
    assert isinstance(exc.value, CheckpointError)


def test_hf_tokenizer_json_rejected(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    with pytest.raises(TokenizerFormatError):
        Tokenizer.from_model_dir(tmp_path)


def test_tekken_format_tokenizer_json_fallback(tmp_path: Path, model_dir: Path, tok: Tokenizer) -> None:
    shutil.copy(model_dir / "tekken.json", tmp_path / "tokenizer.json")
    other = Tokenizer.from_model_dir(tmp_path)
    assert other.think_id == 25
    assert other.encode_chat(USER_HI, tools=[WEATHER_TOOL], reasoning_effort="high") == tok.encode_chat(
        USER_HI, tools=[WEATHER_TOOL], reasoning_effort="high"
    )


def test_pickle_reloads_from_dir(tok: Tokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode_text("abc") == tok.encode_text("abc")


def test_write_tekken_v15_deterministic(tmp_path: Path) -> None:
    a = write_tekken_v15(tmp_path / "a" / "tekken.json", PATCH, MERGE, MAX_SIZE)
    (tmp_path / "b").mkdir()
    b = write_tekken_v15(tmp_path / "b", PATCH, MERGE, MAX_SIZE)
    assert b == tmp_path / "b" / "tekken.json"
    assert a.read_bytes() == b.read_bytes()
    assert write_tekken_v15(a, PATCH, MERGE, MAX_SIZE).read_bytes() == b.read_bytes()


def test_write_tekken_v15_image_config(tmp_path: Path) -> None:
    write_tekken_v15(tmp_path, 16, 1, 1024)
    mt = Tokenizer.from_model_dir(tmp_path)._tekken
    assert mt.image is not None
    assert (
        mt.image.image_patch_size,
        mt.image.spatial_merge_size,
        mt.image.max_image_size,
    ) == (16, 1, 1024)
    with pytest.raises(ValueError, match="spatial_merge_size"):
        write_tekken_v15(tmp_path, 16, 0, 1024)
