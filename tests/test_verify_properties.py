"""Property tests (hypothesis) for answer extraction and grading: any text, never an exception."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgsd.verify import FAILURE_KINDS, extract_boxed, grade

# Text built from the characters that matter to a brace matcher, plus box commands and think tags.
pieces = st.sampled_from(["\\boxed{", "\\fbox{", "{", "}", "\\{", "\\}", "</think>", "<think>", "\\", "x", "12",
                          " ", "\n", "\\frac{1}{2}", "$", "\\boxed", "boxed{"])
texts = st.lists(pieces, max_size=40).map("".join) | st.text(max_size=200)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts, st.booleans())
def test_extraction_never_raises_and_is_typed(text, after_think):
    answer, failure = extract_boxed(text, after_think=after_think)
    assert failure is None or failure in FAILURE_KINDS
    if answer:  # a non-empty answer is (whitespace-trimmed) box content taken from the text
        assert answer in text and answer == answer.strip()
        assert failure is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts, st.sampled_from(["25", "025", "\\frac{1}{2}", "x^2+1", "(0,1]"]))
def test_grading_never_raises(text, gold):
    result = grade(text, gold, timeout_s=5.0)
    assert isinstance(result.correct, bool)
    assert result.failure is None or result.failure in FAILURE_KINDS
    if result.correct:
        assert result.failure is None and result.extracted is not None
