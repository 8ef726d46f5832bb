"""The instruction filter (self-instruct / self-prompting) at scale: time for 20 000 and 100 000 synthetic
instructions, and agreement of its keep/drop decisions with brute-force ROUGE-L on a 2 000-instruction sample.

    python benchmarks/instruction_filter.py [--small 20000] [--large 100000] [--sample 2000] [--seed 0] [--tiny]

The instructions are templated the way self-instruct output is: a few dozen phrasings that share their
vocabulary, slots filled from shared word lists, optional trailing constraints; so near-duplicates exist
and most pairs share common words. Ends with `ratio 100k/20k: X.XX  agreement: 0.YYY` (the sizes as run).
`--tiny` runs 1 000 / 2 000 / 200 instructions, to check the script.
"""

from __future__ import annotations

import argparse
import itertools
import random
import time

from datasketch import MinHash, MinHashLSH

from pipeline.core.recipe import InstructionFilterConfig
from pipeline.stages.generate.instruction_filter import Candidate, InstructionFilter
from pipeline.stages.generate.textsim import rouge_l, words

TEMPLATES = [
    "Write a {length} {form} about {topic} for {audience}.",
    "Write a {form} that explains {topic} to {audience}.",
    "Explain the difference between {thing} and {thing2} in {field}.",
    "Explain how {thing} works, as if to {audience}.",
    "Give me {n} tips for {activity} {context}.",
    "Give {n} reasons why {audience} should care about {topic}.",
    "Summarize the main arguments for and against {topic} in {n} sentences.",
    "How do I {task} in {tool}?",
    "How can I {task} with {tool} without {problem}?",
    "What are the pros and cons of {thing} compared to {thing2}?",
    "What is the best way to {task} when {context2}?",
    "Create a {n}-day plan for {activity} {context}.",
    "Create a {form} for {audience} about {topic}.",
    "Suggest {n} names for a {business} that sells {product}.",
    "Suggest a {length} {form} title about {topic}.",
    "Rewrite the following sentence to sound more {tone}: {sentence}",
    "Translate into {language}: {sentence}",
    "Compare {thing} and {thing2} for {audience}, in a table with {n} rows.",
    "List {n} common mistakes people make when {activity}.",
    "Describe a typical day of {person} {context}.",
    "Draft an email to {person} asking about {topic}.",
    "Draft a {tone} reply to a customer who complains about {problem}.",
    "Why does {thing} matter for {field}?",
    "Is it a good idea to {task} {context}? Explain your reasoning.",
    "Outline a {length} presentation on {topic} for {audience}.",
    "Propose {n} interview questions for {person} about {topic}.",
    "Classify the following review as positive, negative or neutral: {sentence}",
    "Solve this problem step by step: {math}",
    "Write a Python function that {code_task}.",
    "Write a SQL query that {sql_task}.",
    "Debug this code and explain the bug: {snippet}",
    "Plan a {length} trip to {place} on a {tone} budget for {audience}.",
    "Recommend {n} books about {topic} for {audience}.",
    "Turn these notes into a {form}: {sentence}",
    "Tell me a {length} story about {person} who {story}.",
    "Argue {stance} the claim that {claim}.",
]
WORDS = {
    "length": ["short", "long", "brief", "detailed", "two-paragraph", "one-page", "concise", "five-minute"],
    "form": ["poem", "essay", "blog post", "song", "speech", "newsletter", "limerick", "report", "guide", "story",
             "cover letter", "product description", "tweet thread", "lesson plan", "haiku", "FAQ"],
    "topic": [f"{a} {b}" for a in ("climate", "urban", "remote", "renewable", "ancient", "digital", "public",
                                   "mental", "space", "ocean", "food", "financial", "early", "open", "rural",
                                   "medieval", "global", "local", "modern", "sustainable", "military", "tropical",
                                   "arctic", "nuclear", "civic", "consumer", "youth", "coastal")
              for b in ("policy", "history", "health", "education", "transport", "energy", "privacy", "art",
                        "farming", "exploration", "markets", "literacy", "science", "work", "housing", "trade",
                        "music", "sport", "fashion", "tourism", "water", "forests", "law", "medicine")],
    "audience": ["children", "beginners", "teenagers", "retirees", "engineers", "nurses", "teachers", "investors",
                 "tourists", "new managers", "students", "small business owners", "parents", "doctors"],
    "thing": ["a mortgage", "a lease", "TCP", "UDP", "mitosis", "meiosis", "inflation", "deflation", "a virus",
              "a bacterium", "stocks", "bonds", "weather", "climate", "a list", "a tuple", "RAM", "storage",
              "a will", "a trust", "baking soda", "baking powder", "latitude", "longitude", "a comet", "a meteor",
              "machine learning", "statistics", "GDP", "GNP", "a sonnet", "a ballad", "an atom", "a molecule"],
    "field": ["biology", "finance", "law", "physics", "cooking", "programming", "economics", "music", "history"],
    "activity": ["learning a language", "running a marathon", "saving money", "public speaking", "gardening",
                 "studying for exams", "cooking for a crowd", "moving house", "starting a podcast", "hiking",
                 "negotiating a salary", "writing a thesis", "training a puppy", "learning chess"],
    "context": ["on a tight budget", "in winter", "with little time", "as a beginner", "while working full time",
                "in a small apartment", "with kids", "after an injury", "in a new city", "for the first time"],
    "context2": ["you are short on time", "the data is messy", "the team is remote", "money is tight",
                 "the deadline moved up", "nobody agrees", "the weather is bad"],
    "task": ["merge two dictionaries", "reverse a linked list", "center a div", "remove duplicates from a list",
             "read a CSV file", "schedule a cron job", "undo a git commit", "resize an image", "parse JSON",
             "sort a table by two columns", "back up a database", "write unit tests", "profile slow code",
             "set up a virtual environment", "compress a folder", "rename many files", "split a string"],
    "tool": ["Python", "Excel", "JavaScript", "Bash", "Git", "SQL", "Rust", "Go", "R", "Java", "Docker", "Linux"],
    "problem": ["late deliveries", "a broken product", "rude staff", "hidden fees", "losing data", "slow loading",
                "a wrong invoice", "missing parts", "memory leaks", "merge conflicts"],
    "n": ["three", "four", "five", "six", "seven", "ten", "2", "3", "5", "7"],
    "business": ["bakery", "bookshop", "bike shop", "startup", "cafe", "flower shop", "toy store", "law firm"],
    "product": ["sourdough bread", "used books", "electric bikes", "vegan snacks", "handmade soap", "board games",
                "coffee beans", "running shoes", "houseplants", "vintage clothes"],
    "tone": ["formal", "friendly", "persuasive", "polite", "casual", "confident", "empathetic", "tight",
             "modest", "generous"],
    "sentence": [f"the {a} {b} {c}" for a in ("meeting", "report", "movie", "hotel", "delivery", "app", "course")
                 for b in ("was", "seemed", "felt", "turned out")
                 for c in ("too long and boring", "better than expected", "late but useful", "cheap and noisy",
                           "great for families", "confusing at first")],
    "language": ["French", "Spanish", "German", "Japanese", "Italian", "Portuguese", "Korean", "Hindi"],
    "person": ["a nurse", "a farmer", "a pilot", "an astronaut", "a chef", "a judge", "a librarian",
               "a software engineer", "a firefighter", "a teacher", "a fisherman", "a street musician"],
    "place": ["Lisbon", "Kyoto", "Iceland", "the Alps", "Mexico City", "Cape Town", "Vancouver", "Morocco"],
    "math": [f"{a} {op} {b} {op2} {c}" for a in (12, 37, 48, 125) for op in ("+", "*", "-") for b in (7, 19, 64)
             for op2 in ("/", "+") for c in (3, 4)],
    "code_task": ["checks whether a string is a palindrome", "counts the words in a file",
                  "returns the n-th Fibonacci number", "merges two sorted lists", "validates an email address",
                  "flattens a nested list", "computes a moving average", "finds the longest common prefix"],
    "sql_task": ["finds the top five customers by revenue", "counts orders per month",
                 "lists employees without a manager", "deletes duplicate rows", "joins orders with customers"],
    "snippet": ["for i in range(len(xs)): xs.remove(xs[i])", "if x = 5: print(x)", "total =+ price",
                "while True: pass", "return a.sort()", "print(undefined_name)"],
    "story": ["finds a lost map", "learns to fly", "opens a bakery", "meets a talking cat", "misses a train"],
    "stance": ["for", "against"],
    "claim": ["homework should be banned", "cities should ban cars", "everyone should learn to code",
              "social media does more harm than good", "college should be free", "remote work is here to stay"],
}
PREFIXES = ["", "", "", "Please ", "Could you ", "I need you to ", "Quick question: ", "For my class, ",
            "My boss asked me this. ", "Help me out: "]
SUFFIXES = ["", "", "", " Keep it under 200 words.", " Use simple language.", " Include an example.",
            " Use bullet points.", " Be specific.", " Avoid jargon.", " Add a short summary at the end.",
            " Mention {place} somewhere.", " Make it suitable for {audience}.", " Write it in {language}.",
            " End with a question for {person}.", " Refer to {thing} at least once."]


def synthetic_instructions(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        template = rng.choice(TEMPLATES)
        slots = {k: rng.choice(v) for k, v in WORDS.items()}
        slots["thing2"] = rng.choice(WORDS["thing"])
        text = template.format(**slots) + rng.choice(SUFFIXES).format(**slots)
        prefix = rng.choice(PREFIXES)
        out.append(prefix + text[0].lower() + text[1:] if prefix else text)
    return out


class BruteForce:
    """ROUGE-L against every kept instruction: the reference the index must agree with."""

    def __init__(self, threshold: float):
        self.threshold, self.kept, self.pairs = threshold, [], 0

    def too_similar(self, toks: list[str]) -> bool:
        for other in self.kept:
            self.pairs += 1
            if rouge_l(toks, other) > self.threshold:
                return True
        return False

    def add(self, toks: list[str]) -> None:
        self.kept.append(toks)


class MinHashCandidates:
    """The alternative: datasketch MinHash LSH over words (counted with repeats) retrieves
    candidates, exact ROUGE-L checks them. F > 0.7 implies a multiset Jaccard > 0.7/1.3, so LSH is tuned
    for 0.5; it is approximate, the inverted index is not."""

    def __init__(self, threshold: float, lsh_threshold: float = 0.5, num_perm: int = 128):
        self.threshold, self.num_perm = threshold, num_perm
        self.lsh = MinHashLSH(threshold=lsh_threshold, num_perm=num_perm)
        template = MinHash(num_perm=num_perm)
        self.perm, self.scheme, self.kept = template.permutations, template.scheme, []

    def _sig(self, toks: list[str]) -> MinHash:
        seen: dict[str, int] = {}
        feats = []
        for t in toks:
            seen[t] = seen.get(t, 0) + 1
            feats.append(f"{t}#{seen[t]}".encode())
        sig = MinHash(num_perm=self.num_perm, permutations=self.perm, scheme=self.scheme)
        sig.update_batch(feats)
        return sig

    def too_similar(self, toks: list[str]) -> bool:
        return any(rouge_l(toks, self.kept[i]) > self.threshold for i in self.lsh.query(self._sig(toks)))

    def add(self, toks: list[str]) -> None:
        self.lsh.insert(len(self.kept), self._sig(toks))
        self.kept.append(toks)


def run_filter(texts: list[str], brute: bool = False, lsh: bool = False) -> tuple[list[bool], float, int]:
    """Keep/drop decisions, CPU seconds, and the pairs compared (brute force only)."""
    filt = InstructionFilter(InstructionFilterConfig(), [])
    if brute:
        filt.index = BruteForce(filt.cfg.rouge_threshold)
    if lsh:
        filt.index = MinHashCandidates(filt.cfg.rouge_threshold)
    t0 = time.process_time()
    decisions = [filt.offer(Candidate(t)) for t in texts]
    return decisions, time.process_time() - t0, getattr(filt.index, "pairs", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lsh", action="store_true", help="also measure datasketch MinHash LSH candidates")
    parser.add_argument("--tiny", action="store_true", help="a few thousand instructions: checks the script")
    args = parser.parse_args()
    if args.tiny:
        args.small, args.large, args.sample = 1_000, 2_000, 200
    texts = synthetic_instructions(args.large, args.seed)
    print(f"{len(texts)} synthetic instructions, {len(set(texts))} distinct, "
          f"mean {sum(len(words(t)) for t in texts) / len(texts):.1f} words")
    small, t_small, _ = run_filter(texts[:args.small])
    print(f"index  {args.small:>7} instructions: {t_small:7.2f} s  ({t_small / args.small * 1e6:6.1f} µs each), "
          f"kept {sum(small)}")
    large, t_large, _ = run_filter(texts)
    print(f"index  {args.large:>7} instructions: {t_large:7.2f} s  ({t_large / args.large * 1e6:6.1f} µs each), "
          f"kept {sum(large)}")
    sample = random.Random(args.seed + 1).sample(texts, args.sample)  # its own kept set, starting empty
    fast, t_fast, _ = run_filter(sample)
    slow, t_slow, pairs = run_filter(sample, brute=True)
    agree = sum(a == b for a, b in zip(fast, slow, strict=True)) / len(sample)
    if args.lsh:
        approx, t_lsh, _ = run_filter(sample, lsh=True)
        _, t_lsh_small, _ = run_filter(texts[:args.small], lsh=True)
        lsh_agree = sum(a == b for a, b in zip(approx, slow, strict=True)) / len(sample)
        print(f"minhash-lsh candidates: sample agreement {lsh_agree:.3f}, "
              f"{args.small} instructions in {t_lsh_small:.2f} s (index: {t_small:.2f} s)")
    print(f"sample {args.sample:>7} instructions: index {t_fast:.2f} s, brute force {t_slow:.2f} s, "
          f"kept {sum(fast)} vs {sum(slow)}")
    kept_so_far = sum(itertools.accumulate(large))  # brute force compares each candidate with every kept one
    print(f"brute force at {args.large}: ~{kept_so_far * t_slow / max(1, pairs) / 60:.0f} min "
          f"({t_slow / max(1, pairs) * 1e6:.1f} µs a pair, up to {kept_so_far:.2e} pairs)")
    print(f"ratio {_thousands(args.large)}/{_thousands(args.small)}: {t_large / t_small:.2f}  agreement: {agree:.3f}")


def _thousands(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


if __name__ == "__main__":
    main()
