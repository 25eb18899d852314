"""The offline o200k_harmony tokenizer (gptoss/tokenizer.py) against tiktoken's own encoding and openai-harmony."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiktoken
import tiktoken.registry

from gptoss import tokenizer as tok
from gptoss.errors import GptOssError

REPO_ROOT = Path(__file__).resolve().parents[1]
# The URL tiktoken_ext/openai_public.py downloads o200k_base from; tiktoken caches it under sha1(url).
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"

SAMPLES = [
    "Hello world",
    "",
    " ",
    "The quick brown fox jumps over the lazy dog.\n\n",
    "Ünïcödé: naïve café, Straße, 日本語のテキスト, русский текст, العربية",
    "emoji 🙂👍🏽🇫🇷 and a ZWJ family 👨‍👩‍👧",
    "def f(x):\n    return x ** 2  # square\n\tprint(f'{x=}')\r\n",
    "numbers 1234567890 3.14159 -42 1e-9 0x1F",
    "I'm sure they've said it's THEY'LL WE'D",
    "   leading and trailing spaces   \n\n\n",
    "<|start|> looks special but is plain text here",
]

SPECIALS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}


def _block_network(mp: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket.socket, "connect_ex", refuse)
    mp.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tiktoken.Encoding:
    """tiktoken's own o200k_harmony, served from a pre-populated cache dir so it never downloads."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    shutil.copyfile(tok.VOCAB_FILE, cache / hashlib.sha1(O200K_URL.encode()).hexdigest())
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        mp.setattr(tiktoken.registry, "ENCODINGS", {})  # no encoding cached from elsewhere in the process
        enc = tiktoken.get_encoding("o200k_harmony")
    return enc


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return tok.get_tokenizer()


def test_get_tokenizer_is_cached(enc):
    assert tok.get_tokenizer() is enc
    assert enc.name == "o200k_harmony"


def test_pattern_matches_tiktoken(enc, reference):
    assert enc._pat_str == reference._pat_str
    assert enc._special_tokens == reference._special_tokens
    assert enc.n_vocab == reference.n_vocab == 201088


def test_hand_known_ids(enc):
    assert enc.encode("Hello world") == [13225, 2375]
    assert enc.decode([13225, 2375]) == "Hello world"


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_matches_tiktoken(enc, reference, text):
    ids = enc.encode(text, disallowed_special=())  # special-looking text stays plain text
    assert ids == reference.encode(text, disallowed_special=())
    assert enc.decode(ids) == text
    assert all(0 <= i < 199998 for i in ids)  # plain text never yields special ids


def test_mixed_specials_match_tiktoken(enc, reference):
    text = "<|start|>user<|message|>What is 2+2? 🤔<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>"
    ids = enc.encode(text, allowed_special="all")
    assert ids == reference.encode(text, allowed_special="all")
    assert ids[:1] == [tok.START] and ids[-1] == tok.RETURN
    assert enc.decode(ids) == text
    with pytest.raises(ValueError):  # specials in untrusted text are refused by default
        enc.encode(text)


@pytest.mark.parametrize("name,idx", sorted(SPECIALS.items()))
def test_special_token_ids(enc, name, idx):
    assert enc.encode(name, allowed_special="all") == [idx]
    assert enc.decode([idx]) == name


def test_named_constants():
    assert (tok.STARTOFTEXT, tok.ENDOFTEXT, tok.RETURN, tok.CONSTRAIN, tok.CHANNEL) == (
        199998, 199999, 200002, 200003, 200005)
    assert (tok.START, tok.END, tok.MESSAGE, tok.CALL) == (200006, 200007, 200008, 200012)
    assert tok.STOP_TOKENS == (200002, 200012)
    assert tok.END not in tok.STOP_TOKENS


def test_all_special_ids_covered(enc, reference):
    specials = enc._special_tokens
    assert set(specials.values()) == set(range(199998, 201088))
    assert enc.n_vocab == enc.max_token_value + 1 == 201088
    named = set(SPECIALS.values())
    for i in range(200000, 201088):
        if i not in named:
            assert specials[f"<|reserved_{i}|>"] == i
            assert enc.encode(f"<|reserved_{i}|>", allowed_special="all") == [i]
    for i in range(199998, 201088):
        assert enc.decode_single_token_bytes(i) == reference.decode_single_token_bytes(i)
    # Every id below the specials is an ordinary BPE rank.
    assert len(enc._mergeable_ranks) == 199998
    assert set(enc._mergeable_ranks.values()) == set(range(199998))


def test_corrupted_vocab_raises(tmp_path):
    bad = tmp_path / "o200k_base.tiktoken"
    data = bytearray(tok.VOCAB_FILE.read_bytes())
    data[1000] ^= 0x01
    bad.write_bytes(bytes(data))
    with pytest.raises(GptOssError) as err:
        tok.load_encoding(bad)
    msg = str(err.value)
    assert str(bad) in msg and "sha256" in msg and "\n" not in msg


def test_missing_vocab_raises(tmp_path):
    missing = tmp_path / "nope.tiktoken"
    with pytest.raises(GptOssError, match="nope.tiktoken"):
        tok.load_encoding(missing)


def test_use_offline_encodings_respects_user_setting(monkeypatch, tmp_path):
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    tok.use_offline_encodings()
    tok.use_offline_encodings()
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(tok.DATA_DIR)
    assert (Path(os.environ["TIKTOKEN_ENCODINGS_BASE"]) / "o200k_base.tiktoken").is_file()

    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    tok.use_offline_encodings()
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(tmp_path)


# Runs in a fresh interpreter: no harmony encoding is cached yet, the network is blocked before anything is
# imported, TIKTOKEN_ENCODINGS_BASE is unset and the tiktoken-rs download cache points at an empty dir.
_HARMONY_SCRIPT = textwrap.dedent(
    """
    import os, socket, sys

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    assert "TIKTOKEN_ENCODINGS_BASE" not in os.environ

    from openai_harmony import Conversation, Message, Role, SystemContent
    from gptoss import tokenizer as tok

    harmony = tok.get_harmony_encoding()
    assert tok.get_harmony_encoding() is harmony
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(tok.DATA_DIR)
    conv = Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new()),
        Message.from_role_and_content(Role.USER, "What is 2+2? Answer in one word, 🙂"),
    ])
    ids = harmony.render_conversation_for_completion(conv, Role.ASSISTANT)
    text = harmony.decode(ids)
    assert ids[0] == tok.START == 200006, ids[:5]
    assert "<|start|>user<|message|>What is 2+2? Answer in one word, 🙂<|end|>" in text, text
    assert text.endswith("<|start|>assistant"), text
    enc = tok.get_tokenizer()
    assert enc.decode(ids) == text
    assert enc.encode(text, allowed_special="all") == list(ids)
    assert sorted(harmony.stop_tokens_for_assistant_actions()) == sorted(tok.STOP_TOKENS)
    print("OK", len(ids))
    """
)


def test_harmony_renders_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_ENCODINGS_BASE"}
    env["TIKTOKEN_RS_CACHE_DIR"] = str(tmp_path / "empty-rs-cache")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _HARMONY_SCRIPT], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK")


_HARMONY_BAD_SCRIPT = textwrap.dedent(
    """
    import socket
    from gptoss import tokenizer as tok
    from gptoss.errors import GptOssError

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    socket.socket.connect = refuse
    socket.create_connection = refuse
    try:
        tok.get_harmony_encoding()
    except GptOssError as e:
        print("ERR", e)
    else:
        print("LOADED")
    """
)


def test_harmony_bad_vocab_dir_raises_gptoss_error(tmp_path):
    data = bytearray(tok.VOCAB_FILE.read_bytes())
    data[1000] ^= 0x01
    (tmp_path / "o200k_base.tiktoken").write_bytes(bytes(data))
    env = dict(os.environ, TIKTOKEN_ENCODINGS_BASE=str(tmp_path),
               TIKTOKEN_RS_CACHE_DIR=str(tmp_path / "empty-rs-cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _HARMONY_BAD_SCRIPT], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.strip()
    assert out.startswith("ERR") and str(tmp_path) in out and "\n" not in out, out
