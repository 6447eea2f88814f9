"""Metric functions against hand-computed values."""

import math

import pytest

from lorachain.metrics import exact_match, normalize_answer, perplexity, rouge_l, token_f1, top_k_accuracy


def test_normalize_and_exact_match():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("an Apple.", "apple") == 1.0
    assert exact_match("apples", "apple") == 0.0


def test_token_f1():
    # pred {cat, sat, mat} vs ref {cat, sat}: p = 2/3, r = 1, f1 = 0.8
    assert token_f1("the cat sat mat", "cat sat") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_rouge_l():
    # LCS("a b c d", "a c d e") = 3 -> p = r = 3/4
    assert rouge_l("x b c d", "x c d e") == pytest.approx(0.75)
    assert rouge_l("police killed the gunman", "the gunman police killed") == pytest.approx(2 / 3)
    assert rouge_l("abc", "xyz") == 0.0


def test_perplexity_and_top_k():
    assert perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
    ranked = [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert top_k_accuracy(ranked, ["a", "a", "a"], 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(ranked, ["a", "a", "a"], 2) == pytest.approx(2 / 3)


def test_best_over_references_and_binary_f1():
    from lorachain.metrics import best_over, binary_f1

    assert best_over(exact_match, "Bhutto", ["Benazir Bhutto", "bhutto"]) == 1.0
    assert best_over(token_f1, "benazir", ["Benazir Bhutto", "x"]) == pytest.approx(2 / 3)
    # tp = 2, fp = 1, fn = 1 -> 4 / 6
    assert binary_f1([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx(2 / 3)
    assert binary_f1([0, 0], [0, 0]) == 0.0
