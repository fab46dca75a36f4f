"""Streaming text: whole characters only, stop strings cut and never leaked."""

from __future__ import annotations

import pytest

from inference.demo_models import train_tokenizer
from inference.engine.detokenize import REPLACEMENT_CHAR, IncrementalDetokenizer, StopMatcher, TextStream


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def test_detokenizer_never_emits_broken_utf8(tokenizer) -> None:
    text = " Naïve résumé: 日本語 🚀🛰 and the ledger."
    ids = tokenizer(text).input_ids
    assert len(ids) > len(text.encode()) // 4, "non-ASCII characters should span several byte tokens"
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer("<|im_start|>assistant\n").input_ids)
    deltas = [detokenizer.push(token) for token in ids]
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)
    assert "".join(deltas) + detokenizer.flush() == text


def test_detokenizer_releases_invalid_bytes_at_the_end(tokenizer) -> None:
    lone_byte = tokenizer.convert_tokens_to_ids("Ã")  # byte 0xC3: a UTF-8 lead byte with no continuation
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=[])
    assert detokenizer.push(lone_byte) == ""
    assert detokenizer.flush() == REPLACEMENT_CHAR


class WindowOnly:
    """The demo tokenizer without its Rust backend, so the detokenizer decodes windows."""

    def __init__(self, tokenizer) -> None:
        self.decode = tokenizer.decode


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_rust_stream_and_the_window_decoder_give_the_same_deltas(tokenizer, seed: int) -> None:
    import random

    rng = random.Random(seed)
    ids = [rng.randrange(len(tokenizer)) for _ in range(200)]  # byte tokens, specials, whole words
    ids += tokenizer(" Naïve résumé: 日本語 🚀🛰 and the ledger.").input_ids
    prompt = tokenizer("<|im_start|>assistant\n").input_ids
    streamed, windowed = IncrementalDetokenizer(tokenizer, prompt), IncrementalDetokenizer(WindowOnly(tokenizer), prompt)
    assert streamed._stream is not None and windowed._stream is None
    for token in ids:
        assert streamed.push(token) == windowed.push(token)
    assert streamed.flush() == windowed.flush()


def test_stop_matcher_holds_back_a_possible_stop_start() -> None:
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("hello ST") == ("hello ", False)
    assert matcher.feed("AR") == ("STAR", False)
    assert matcher.feed(" then ST") == (" then ", False)
    assert matcher.feed("OP and more") == ("", True)


def test_stop_matcher_cuts_at_the_earliest_stop() -> None:
    matcher = StopMatcher(("b", "abc"))
    assert matcher.feed("xxabc") == ("xx", True)


def test_unfinished_stop_prefix_is_released_at_the_end() -> None:
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("the end S") == ("the end ", False)
    assert matcher.flush() == "S"


def test_text_stream_cuts_a_stop_string_spanning_tokens(tokenizer) -> None:
    ids = tokenizer(" the ledger is signed at every checkpoint").input_ids
    stream = TextStream(tokenizer, prompt_ids=[], stops=("er is sig",))
    out, stopped = "", False
    for token in ids:
        delta, stopped = stream.push(token)
        out += delta
        if stopped:
            break
    assert (out, stopped) == (" the ledg", True)
