"""The start-up self-test on the engine's backend boundary (the real-model path is covered by
tests/inference/test_cpu_portability.py, which starts `llamafleet serve`)."""

from __future__ import annotations

import pytest
from llamafleet.inference.selftest import SELF_TEST_TOKENS, SelfTestFailed, self_test

from tests.support.fake_backend import FakeBackend


def test_self_test_decodes_one_row_at_a_time_and_leaves_the_sequence_empty() -> None:
    b = FakeBackend()
    result = self_test(b, [5, 6, 7])
    assert result.tokens == (8, 9, 10, 11)
    assert len(b.batches) == SELF_TEST_TOKENS
    assert b.batches[0] == ([5, 6, 7], [0, 1, 2], [0, 0, 0], [False, False, True])
    assert b.batches[1] == ([8], [3], [0], [True])
    assert b.cleared == [0] and b.samplers == {}


def test_nonfinite_logits_fail_with_a_clear_message() -> None:
    b = FakeBackend()
    b.nonfinite_logits = 262144
    with pytest.raises(SelfTestFailed, match="262144 of the model's logits are NaN or infinite"):
        self_test(b, [1])
    assert b.cleared == [0] and b.samplers == {}


def test_a_decode_error_fails_the_self_test() -> None:
    b = FakeBackend()
    b.decode_error = RuntimeError("llama_decode returned -3")
    with pytest.raises(SelfTestFailed, match="llama_decode failed: llama_decode returned -3"):
        self_test(b, [1])


def test_an_empty_prompt_is_refused() -> None:
    with pytest.raises(SelfTestFailed, match="tokenised to nothing"):
        self_test(FakeBackend(), [])
