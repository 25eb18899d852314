"""The o200k_harmony tokenizer (gpt-oss), loaded offline from the vocab file shipped in gptoss/data.

`get_tokenizer()` builds a `tiktoken.Encoding` identical to tiktoken's own "o200k_harmony" without downloading
anything. `get_harmony_encoding()` loads openai-harmony's renderer/parser, pointed at the same shipped file through
the TIKTOKEN_ENCODINGS_BASE environment variable. Nothing here touches the network.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from pathlib import Path

import tiktoken

from gptoss.errors import GptOssError

DATA_DIR = Path(__file__).parent / "data"
VOCAB_FILE = DATA_DIR / "o200k_base.tiktoken"
# The digest tiktoken itself checks for o200k_base.tiktoken (tiktoken_ext/openai_public.py).
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

# o200k_base's pre-tokenization regex, exactly as tiktoken_ext/openai_public.py writes it.
O200K_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

STARTOFTEXT = 199998
ENDOFTEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012
N_VOCAB = 201088

# Generation stops on these; <|end|> only closes a message (the final answer follows the analysis).
STOP_TOKENS = (RETURN, CALL)

_NAMED_SPECIALS = {
    "<|startoftext|>": STARTOFTEXT,
    "<|endoftext|>": ENDOFTEXT,
    "<|return|>": RETURN,
    "<|constrain|>": CONSTRAIN,
    "<|channel|>": CHANNEL,
    "<|start|>": START,
    "<|end|>": END,
    "<|message|>": MESSAGE,
    "<|call|>": CALL,
}


def _special_tokens() -> dict[str, int]:
    """The o200k_harmony specials, matching tiktoken's o200k_harmony exactly.

    Every id in 199998..201087 without a name above is `<|reserved_N|>`. Like tiktoken (and OpenAI's gpt-oss
    reference), o200k_base's own `<|endofprompt|>` is kept as an alias of id 200018.
    """
    named_ids = set(_NAMED_SPECIALS.values())
    reserved = {f"<|reserved_{i}|>": i for i in range(200000, N_VOCAB) if i not in named_ids}
    return {"<|endofprompt|>": 200018, **_NAMED_SPECIALS, **reserved}


def _read_ranks(path: Path, expected_sha256: str | None) -> dict[bytes, int]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GptOssError(f"cannot read tokenizer vocab file {path}: {e.strerror or e}") from e
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise GptOssError(
                f"tokenizer vocab file {path} is corrupted: sha256 {actual}, expected {expected_sha256}"
            )
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise GptOssError(f"tokenizer vocab file {path}: malformed line {lineno}") from e
    return ranks


def load_encoding(path: str | os.PathLike | None = None,
                  expected_sha256: str | None = VOCAB_SHA256) -> tiktoken.Encoding:
    """Build the o200k_harmony Encoding from a local o200k_base.tiktoken file (default: the shipped one).

    Raises GptOssError if the file is missing, malformed or its sha256 differs from `expected_sha256`.
    """
    path = VOCAB_FILE if path is None else Path(path)
    return tiktoken.Encoding(
        name="o200k_harmony",
        pat_str=O200K_PAT_STR,
        mergeable_ranks=_read_ranks(path, expected_sha256),
        special_tokens=_special_tokens(),
    )


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The o200k_harmony tokenizer built from the shipped vocab (cached)."""
    return load_encoding()


def use_offline_encodings() -> None:
    """Point tiktoken-style loaders (openai-harmony) at the shipped vocab directory.

    Sets TIKTOKEN_ENCODINGS_BASE to gptoss/data unless the user has already set it. Idempotent.
    """
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(DATA_DIR))


@functools.lru_cache(maxsize=1)
def get_harmony_encoding():
    """openai-harmony's HARMONY_GPT_OSS encoding, loaded from local files only (cached)."""
    use_offline_encodings()
    try:
        from openai_harmony import HarmonyEncodingName, load_harmony_encoding

        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as e:  # ImportError, HarmonyError (missing file, hash mismatch, ...)
        base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
        where = Path(base) / "o200k_base.tiktoken" if base else "(TIKTOKEN_ENCODINGS_BASE unset)"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GptOssError(f"cannot load the harmony encoding from {where}: {msg}") from e
