"""Truecasing repairs shouted and lowercase-typed turns and leaves code, URLs, acronyms and proper nouns alone."""

from __future__ import annotations

import pytest

from pipeline.stages.generate.truecase import case_vocabulary, truecase


@pytest.mark.parametrize(("text", "expected"), [
    ("how do i install numpy? i tried `pip install NumPy` and got an HTTP 404.",
     "How do I install numpy? I tried `pip install NumPy` and got an HTTP 404."),
    ("explain lists vs tuples. also, what does `x = [i for i in range(3)]` do?",
     "Explain lists vs tuples. Also, what does `x = [i for i in range(3)]` do?"),
    ("use os.path.join, not string concatenation. e.g. os.path.join(a, b) works on windows.",
     "Use os.path.join, not string concatenation. e.g. os.path.join(a, b) works on windows."),
    ("see https://example.com/Docs/Page. it explains i/o in python", "See https://example.com/Docs/Page. It explains i/o in python"),
    ("WHY DOES MY CODE THROW A KeyError IN my_dict[\"x\"]?", "Why does my code throw a KeyError in my_dict[\"x\"]?"),
    ("MY GPU RUNS OUT OF RAM WHEN I TRAIN ON COVID DATA FROM THE USA",
     "My GPU runs out of RAM when I train on COVID data from the USA"),
    ("i met NASA engineers in Houston. they use ```\nSELECT * FROM t\n``` daily",
     "I met NASA engineers in Houston. They use ```\nSELECT * FROM t\n``` daily"),
])
def test_truecasing_repairs_case_and_keeps_code_urls_and_acronyms(text, expected):
    assert truecase(text) == expected


@pytest.mark.parametrize("text", [
    "I visited Paris with my friend from the UK.", "What is 3 + 4?", "Use `git rebase -i HEAD~3` to squash.",
    "The iPhone and eBay launched in different decades.", "3 + 4 = ?",
])
def test_well_cased_text_is_left_alone(text):
    assert truecase(text) == text


def test_proper_nouns_of_a_shouted_turn_come_back_from_the_rest_of_the_dialogue():
    context = ["Lisbon is the capital of Portugal; the Tagus river runs through it.",
               "You can take the train from Lisbon to Porto in about three hours."]
    known = case_vocabulary(context)
    assert known["lisbon"] == "Lisbon" and known["porto"] == "Porto" and "the" not in known
    assert truecase("HOW LONG IS THE TRAIN FROM LISBON TO PORTO?", known) == \
        "How long is the train from Lisbon to Porto?"
