import threading

import pytest

from mgrpo.answers import answers_equivalent, extract_boxed_answer, group_equivalent_answers


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{42}", "42"),
    ("first \\boxed{1} then \\boxed{2}", "2"),                       # the last one counts
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                        # nested braces
    ("\\boxed{\\sqrt{\\frac{a}{b}}} done.", "\\sqrt{\\frac{a}{b}}"),
    ("\\boxed {7}", "7"),                                            # space before the brace
    ("\\fbox{9}", "9"),
    ("no answer here", None),
    ("cut off \\boxed{12", None),                                    # unclosed: no final answer
    ("\\boxed{}", None),                                             # empty
    ("\\boxed{3} and a cut \\boxed{4", None),                        # the last box is unclosed
])
def test_extract_boxed_answer(text, expected):
    assert extract_boxed_answer(text) == expected


def test_equivalence_fraction_forms():
    assert answers_equivalent("\\frac12", "\\frac{1}{2}")
    assert answers_equivalent("\\frac{1}{2}", "0.5")
    assert answers_equivalent("0.5", "\\frac12")
    assert not answers_equivalent("\\frac{1}{3}", "0.5")
    assert not answers_equivalent(None, "1")
    assert not answers_equivalent(None, None)


def test_equivalence_off_main_thread():
    """math-verify's alarms only work on the main thread: a worker thread must still get correct answers."""
    results = {}

    def worker():
        results["same"] = answers_equivalent("\\frac{2}{4}", "0.5")
        results["different"] = answers_equivalent("\\frac{2}{3}", "0.5")

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    assert results == {"same": True, "different": False}


def test_grouping_numbers_clusters_in_order_of_appearance():
    ids = group_equivalent_answers(["\\frac12", "7", None, "0.5", "7.0", "\\frac{1}{2}", "x"])
    assert ids == [0, 1, None, 0, 1, 0, 2]


@pytest.mark.parametrize("text,boxed,math_verify", [
    ("The answer is 6.", None, "6"),                                  # what an unprompted chat model writes
    ("so x = \\frac{1}{2}, the final answer is $\\frac12$", None, "\\frac{1}{2}"),
    ("8 - 9 = -1. -1 + 7 = 6. \\boxed{6}", "6", "6"),                 # a box is found by both rules
    ("nothing numeric here", None, None),
])
def test_answer_formats(text, boxed, math_verify):
    from mgrpo.answers import extract_answer
    assert extract_answer(text) == boxed == extract_answer(text, "boxed")
    assert extract_answer(text, "math_verify") == math_verify
    with pytest.raises(ValueError, match="answer format"):
        extract_answer(text, "regex")


def test_answer_format_setting_is_checked():
    from mgrpo.config import ConfigError, load_config
    assert load_config(None, ["data.answer_format=math_verify"]).data.answer_format == "math_verify"
    with pytest.raises(ConfigError, match="data.answer_format"):
        load_config(None, ["data.answer_format=last_number"])
