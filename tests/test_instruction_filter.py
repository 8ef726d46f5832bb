"""The instruction filter's ROUGE-L index decides exactly as brute force; whole dialogues are deduplicated in
input order, whatever order they finished in."""

from __future__ import annotations

import random

from pipeline.core.recipe import InstructionFilterConfig
from pipeline.core.store import RunStore
from pipeline.stages.generate.dedup import DialogueDedup, find_duplicates, remove_duplicate_dialogues
from pipeline.stages.generate.instruction_filter import Candidate, InstructionFilter, RougeIndex
from pipeline.stages.generate.textsim import rouge_l, words

VERBS = ["Write", "Explain", "Describe", "Summarize", "List", "Compare", "Give me", "Suggest"]
THINGS = ["a poem", "three tips", "a short story", "the history", "a recipe", "five facts", "an email", "a plan"]
TOPICS = ["the sea", "remote work", "black holes", "sourdough bread", "the French revolution", "chess openings",
          "city cycling", "saving money", "the immune system", "jazz piano", "volcanoes", "public speaking"]
TAILS = ["", " for children", " in two sentences", " with an example", " for a beginner", " and keep it short",
         " in the style of a newspaper", " using simple words"]


def _instructions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(VERBS)} {rng.choice(THINGS)} about {rng.choice(TOPICS)}{rng.choice(TAILS)}"
            f"{rng.choice(TAILS)}." for _ in range(n)]


def test_rouge_index_keeps_and_drops_exactly_what_brute_force_rouge_l_does():
    for threshold in (0.5, 0.7, 0.9):
        index, kept, agree = RougeIndex(threshold), [], 0
        texts = _instructions(1500, seed=int(threshold * 10))
        for text in texts:
            toks = words(text)
            brute = any(rouge_l(toks, other) > threshold for other in kept)
            agree += index.too_similar(toks) == brute
            if not brute:
                kept.append(toks)
                index.add(toks)
        assert agree == len(texts), threshold
        assert 20 < len(kept) < len(texts) - 100  # the data has near-duplicates and distinct ones


def test_instruction_filter_reasons():
    filt = InstructionFilter(InstructionFilterConfig(), ["Write a poem about the sea and the sky at night"])
    assert not filt.offer(Candidate("Write a poem about the sea and the sky at dawn"))
    assert filt.offer(Candidate("Explain how tides follow the moon's position"))
    assert not filt.offer(Candidate("Explain how the tides follow the moon's position"))
    assert not filt.offer(Candidate("Draw a map of the old town for tourists"))
    assert dict(filt.rejected) == {"too_similar": 2, "unsuitable": 1}


def _dialogue(pid: str, question: str, answer: str) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"prompt_id": pid, "dialogue_sha": str(hash((question, answer))), "messages": messages}


def test_duplicate_dialogues_are_removed_in_input_order_and_ledgered(tmp_path):
    answer = ("Sourdough needs a lively starter, a long cold proof in the fridge overnight, and a very hot oven "
              "with steam for the first twenty minutes so the crust can expand before it sets.")
    records = [_dialogue("a", "How do I bake sourdough bread at home?", answer),
               _dialogue("b", "How do I bake sourdough bread at home?", answer),  # an exact copy
               _dialogue("c", "How can I bake sourdough bread at home?", answer),  # a near copy
               _dialogue("d", "What is a good first houseplant?", "A pothos: it forgives missed waterings.")]
    rank = {"c": 0, "a": 1, "b": 2, "d": 3}  # input order: c came first, so c is kept
    expected = {"a": ("near_duplicate_dialogue", "c"), "b": ("near_duplicate_dialogue", "c")}
    for order in (records, list(reversed(records)), [records[2], records[0], records[3], records[1]]):
        assert find_duplicates(order, rank, threshold=0.6) == expected

    store = RunStore(tmp_path, "dedup")
    with store.shard_writer("generate", shard_size=2) as writer:
        writer.extend(records)
    assert remove_duplicate_dialogues(store, "generate", rank, threshold=0.6) == 2
    assert sorted(r["prompt_id"] for r in store.read_records("generate")) == ["c", "d"]
    dropped = store.ledger("generate", "dropped").latest()
    assert set(dropped) == {"a", "b"} and dropped["a"].detail == {"kept": "c"}
    assert remove_duplicate_dialogues(store, "generate", rank, threshold=0.6) == 0  # a rerun changes nothing

    # as generate does it: dialogues added as they are written, a killed attempt's found in the shards only
    resumed = RunStore(tmp_path, "dedup-resumed")
    with resumed.shard_writer("generate", shard_size=2) as writer:
        writer.extend(records)
    with DialogueDedup(rank, threshold=0.6) as dedup:
        for r in (records[3], records[0], records[0]):  # one added twice counts once
            dedup.add(r)
        assert remove_duplicate_dialogues(resumed, "generate", rank, threshold=0.6, dedup=dedup) == 2
    assert sorted(r["prompt_id"] for r in resumed.read_records("generate")) == ["c", "d"]
    assert resumed.ledger("generate", "dropped").latest()["b"].detail == {"kept": "c"}
