"""Server parts without HTTP. TextStream: the text is the tokenizer's decoding of the output, cut
exactly before the first stop string, and what a stream sends adds up to it (nothing sent is ever
taken back), with either incremental decoder (``DecodeStream``, the sliding window). EngineWorker:
a failing step fails only the requests in flight."""

from __future__ import annotations

import random

import pytest

from specdecode.demo import load_demo
from specdecode.server import text
from specdecode.server.text import TextStream


@pytest.fixture(scope="module")
def tokenizer():
    return load_demo().tokenizer


@pytest.fixture(params=["DecodeStream", "window"])
def decoder(request, monkeypatch, tokenizer):
    """Each text test runs with both incremental decoders."""
    kind = text._Stream if request.param == "DecodeStream" else text._Window
    monkeypatch.setattr(text, "incremental_decoder", lambda tok, skip=True: kind(tok, skip))
    assert isinstance(TextStream(tokenizer).decoder, kind)
    return request.param


SAMPLES = ["Hello world, this is a test. ü 日本語 and emoji 🙂 end.",
           "def f(x):\n    return x + 1\n\nprint(f(2))  # three",
           "The the the the cat sat on the mat. The cat sat."]


def _run(tokenizer, text: str, stop: list[str], rng: random.Random) -> tuple[TextStream, str]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop)
    sent = []
    i = 0
    while i < len(ids) and not stream.stopped:
        k = rng.randint(1, 4)  # steps emit several tokens at once
        stream.add(ids[i:i + k])
        i += k
        sent.append(stream.pending())
    sent.append(stream.pending(final=True))
    return stream, "".join(sent)


@pytest.mark.parametrize("sample", SAMPLES)
def test_stream_adds_up_and_stops_exactly(tokenizer, sample, decoder):
    rng = random.Random(0)
    full = tokenizer.decode(tokenizer(sample, add_special_tokens=False)["input_ids"])
    for trial in range(40):
        a = rng.randrange(len(full))
        stop = [full[a:a + rng.randint(1, 6)]] if trial % 4 else ["never-appears"]
        stream, sent = _run(tokenizer, sample, stop, rng)
        at = full.find(stop[0])
        expected = full if at < 0 else full[:at]
        assert stream.text == expected and sent == expected, (stop, sent)
        assert stream.stopped == (at >= 0)
        if at >= 0:  # the fewest tokens whose text shows the stop string
            ids = stream.ids
            assert stop[0] in tokenizer.decode(ids)
            assert stop[0] not in tokenizer.decode(ids[:-1])


def test_unfinished_characters_wait(tokenizer, decoder):
    ids = tokenizer("日本", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    chunks = []
    for t in ids:
        stream.add([t])
        chunks.append(stream.pending())
    assert all("\ufffd" not in c for c in chunks) and "".join(chunks) == "日本"
    cut = TextStream(tokenizer)  # output ends inside a character: as decode, U+FFFD at the end
    cut.add(ids[:-1])
    assert cut.pending() + cut.pending(final=True) == tokenizer.decode(ids[:-1])


def test_decoding_is_incremental(tokenizer, decoder, monkeypatch):
    """Each new token decodes a few tokens, never the whole output."""
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 20,
                    add_special_tokens=False)["input_ids"]
    longest = []
    real = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda t, **kw: longest.append(len(t)) or real(t, **kw))
    stream = TextStream(tokenizer)
    for t in ids:
        stream.add([t])
    assert stream.pending(final=True) == real(ids)
    assert max(longest, default=0) <= text.WINDOW + 2


def test_a_possible_stop_prefix_is_held_back(tokenizer, decoder):
    stream = TextStream(tokenizer, ["STOP"])
    stream.add(tokenizer("hello ST", add_special_tokens=False)["input_ids"])
    assert stream.pending() == "hello "
    stream.add(tokenizer("ART", add_special_tokens=False)["input_ids"])
    assert not stream.stopped and stream.pending().endswith("ART")


def test_engine_failure_fails_requests_in_flight_and_keeps_serving():
    """A step that raises fails only the requests in flight (each gets a Failure) and the engine
    goes on with a fresh batch: the next request is served and equals generate."""
    import queue as queue_mod

    from helpers import tiny_model

    import specdecode as sd
    from specdecode.scheduler import Scheduler
    from specdecode.server.metrics import ServerMetrics
    from specdecode.server.worker import EngineWorker, Failure

    model = tiny_model("llama")
    made = []

    def make():
        made.append(Scheduler(model, max_batch_size=4))
        if len(made) == 1:
            def broken():
                raise RuntimeError("boom")
            made[0].step = broken
        return made[-1]

    worker = EngineWorker(make, ServerMetrics("t"))
    worker.start()
    try:
        got: queue_mod.Queue = queue_mod.Queue()
        worker.submit([1, 2, 3], {"drafter": "ngram", "max_new_tokens": 8}, got.put).result(10)
        failure = got.get(timeout=10)
        assert isinstance(failure, Failure) and "boom" in failure.message
        assert len(made) == 2 and worker.thread.is_alive()
        worker.submit([1, 2, 3], {"drafter": "ngram", "max_new_tokens": 8}, got.put).result(10)
        tokens = []
        while True:
            event = got.get(timeout=30)
            tokens += event.tokens
            if event.finished:
                break
        assert tokens == sd.generate(model, [1, 2, 3], drafter="none", max_new_tokens=8).token_ids
    finally:
        worker.close()
