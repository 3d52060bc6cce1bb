"""The pieces every one-line error is made of."""

from anexa_core.errors import choose_one_of, listed


def test_choose_one_of_names_the_closest_choice_when_one_is_close_then_all():
    choices = ["math", "sdpa", "triton"]
    assert choose_one_of("sdap", choices) == "did you mean 'sdpa'? choose one of math, sdpa, triton"
    assert choose_one_of("tritn", choices) == "did you mean 'triton'? choose one of math, sdpa, triton"
    assert choose_one_of("nope", choices) == "choose one of math, sdpa, triton"  # nothing close: no guess
    assert choose_one_of(3, ["1", "2"]) == "choose one of 1, 2"
    assert choose_one_of("x", []) == "none is installed"
    assert choose_one_of("x", iter(["x-ray"])) == "choose one of x-ray"  # any iterable, read once


def test_listed_shows_at_most_three_names_and_says_when_there_are_more():
    assert listed([]) == ""
    assert listed(["a"]) == "a"
    assert listed(["a", "b", "c"]) == "a, b, c"
    assert listed(["a", "b", "c", "d"]) == "a, b, c, …"
    assert listed(["a", "b", "c", "d"], most=1) == "a, …"
