"""The ROUGE-L near-duplicate index against rouge-score, on a Self-Instruct-like corpus.

The corpus imitates bootstrap output: a few hundred task templates with slots, asked again and
again with small rewordings (synonyms, polite prefixes, inserted or dropped words, a clause moved
to the front, punctuation and case), plus a share of tasks that are only asked once. Word salad
would make the filter look better than it is: here many texts share most of their tokens.

    python bench/dedup.py [--n 50000] [--check 2000] [--queries 20] [--threshold 0.7] [--seed 0]

(a) A novel instruction (no early exit) against a pool of n: ``near_duplicate`` and the exact
    full scan ``most_similar`` against ``RougeScorer.score`` on the same pairs (the reference is
    timed on a subsample and scaled linearly). Target: near_duplicate >= 1000x.
(b) Incremental dedup of all n with ``add_if_new``. Target: <= 60 s. Then the reference loop on the
    first --check instructions must make the same accept/reject decisions.
Exits non-zero if a target is missed or a decision differs.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from itertools import accumulate

from rouge_score import rouge_scorer

from factory.dedup import RougeIndex, rouge_l_f1

# -- the corpus ---------------------------------------------------------------------------------

TOPICS = """the water cycle|compound interest|photosynthesis|black holes|supply and demand|the immune system|
machine learning|plate tectonics|the printing press|climate change|volcanoes|the human heart|the French revolution|
how vaccines work|the stock market|electric cars|the Roman empire|quantum computing|honey bees|the moon landing|
inflation|coral reefs|the internet|jazz music|the Olympic games|renewable energy|sleep|meditation|the Silk Road|
dinosaurs|recycling|the periodic table|gravity|the Great Wall of China|social media|chess|coffee|rainforests|
the Renaissance|blockchain|earthquakes|the solar system|antibiotics|the ancient Egyptians|urban gardening|
remote work|the Cold War|the theory of evolution|artificial intelligence|the Amazon river|cryptography|
public libraries|volunteering|the Industrial Revolution|tides|rainbows|bread baking|marathon training|
the history of tea|solar panels|lighthouses|migratory birds|the human brain|credit scores|tornadoes|origami|
the Moon|Mars exploration|the Titanic|video game design|minimalism|electric guitars|the metric system|glaciers|
time zones|wind turbines|the Eiffel Tower|first aid|budgeting|fermentation|deep sea creatures|the Byzantine empire|
public speaking|the printing of money|wildfires|cloud computing|the Beatles|the pyramids|nuclear fusion|
the human genome|street food|sign language|electric scooters|the Arctic|microplastics|3D printing|opera|
the camera obscura|penguins|the Nile|desert ecosystems|cybersecurity|the welfare state|vaccination campaigns|
the Spanish flu|tea ceremonies|hydroponics|poker strategy|the Mona Lisa|carbon taxes|open source software|
the Hubble telescope|sourdough|octopuses|the Apollo program|board games|urban planning|bamboo|the Magna Carta|
the speed of light|bird watching|kombucha|the Ottoman empire|rock climbing|microfinance|the Dead Sea|
smartphone addiction|the Great Depression|honey|sharks|the Aurora Borealis|standardized testing""".replace("\n", "")
TOPICS = TOPICS.split("|")
AUDIENCES = ["a five-year-old", "high school students", "a busy executive", "retired engineers", "new parents",
             "a non-native speaker", "college freshmen", "a curious teenager", "software developers", "nurses",
             "a history teacher", "small business owners", "a group of tourists", "farmers", "grandparents",
             "first-time voters", "art students", "a skeptical scientist", "sports fans", "job seekers"]
FORMS = ["poem", "short story", "haiku", "limerick", "blog post", "news article", "tweet", "essay", "song",
         "dialogue", "speech", "product description", "letter", "riddle", "joke", "fable", "movie pitch",
         "podcast intro", "recipe", "motivational quote"]
LENGTHS = ["two sentences", "one paragraph", "50 words", "three bullet points", "under 100 words",
           "five sentences", "a single sentence", "three short paragraphs", "ten lines", "200 words"]
TONES = ["humorous", "formal", "friendly", "sarcastic", "optimistic", "serious", "poetic", "persuasive",
         "neutral", "enthusiastic"]
NUMBERS = ["three", "five", "seven", "ten", "four", "six", "two", "eight"]
THINGS = ["tips", "ideas", "facts", "questions", "reasons", "examples", "mistakes to avoid", "fun activities",
          "interview questions", "book titles", "names", "slogans"]
LANGUAGES = ["French", "Spanish", "German", "Japanese", "Italian", "Portuguese", "Korean", "Dutch", "Swahili",
             "Turkish"]
CODE = ["reverses a string", "checks whether a number is prime", "merges two sorted lists",
        "counts the vowels in a sentence", "finds the longest word in a text", "removes duplicates from a list",
        "converts Celsius to Fahrenheit", "computes the factorial of a number", "validates an email address",
        "flattens a nested list", "returns the nth Fibonacci number", "sorts a dictionary by value",
        "checks whether a string is a palindrome", "finds the median of a list", "parses a CSV line",
        "computes the greatest common divisor", "capitalizes every word", "detects a cycle in a linked list",
        "rotates a matrix by 90 degrees", "counts word frequencies"]
LANGS = ["Python", "JavaScript", "Rust", "Go", "Java", "C", "Ruby", "SQL"]
ITEMS = ["movie review", "tweet", "product review", "email", "news headline", "customer complaint",
         "restaurant review", "sentence", "song lyric", "support ticket"]
LABELS = ["positive or negative", "spam or not spam", "formal or informal", "fact or opinion",
          "urgent or not urgent", "sports, politics or technology", "happy, sad or angry", "true or false"]
ACTIVITIES = ["learning a new language", "saving money", "staying focused", "planning a trip", "cooking for a crowd",
              "starting a garden", "running a meeting", "writing a resume", "training a puppy", "moving house",
              "studying for exams", "making friends in a new city", "reducing stress", "buying a used car",
              "hosting a dinner party", "learning to code", "getting better sleep", "negotiating a salary"]
SLOTS = {"topic": TOPICS, "topic2": TOPICS, "audience": AUDIENCES, "form": FORMS, "length": LENGTHS,
         "tone": TONES, "number": NUMBERS, "things": THINGS, "language": LANGUAGES, "code": CODE, "lang": LANGS,
         "item": ITEMS, "labels": LABELS, "activity": ACTIVITIES}

# Task families, each phrased several ways; optional clauses follow " | " and may be dropped or moved.
FAMILIES = [
    ["Write a {form} about {topic} | for {audience} | in a {tone} tone",
     "Compose a {form} on the subject of {topic} | for {audience} | in a {tone} tone",
     "Create a {form} that describes {topic} | for {audience} | with a {tone} voice",
     "Draft a {form} about {topic} | aimed at {audience} | in a {tone} style",
     "Generate a {tone} {form} about {topic} | for {audience}"],
    ["Explain {topic} | to {audience} | in {length}",
     "Describe how {topic} works | to {audience} | in {length}",
     "Give a simple explanation of {topic} | for {audience} | in {length}",
     "What is {topic}? Explain it | to {audience} | in {length}",
     "Help me understand {topic} | as if I were {audience} | in {length}",
     "Break down the concept of {topic} | for {audience} | using {length}"],
    ["Summarize the main ideas of {topic} | in {length} | for {audience}",
     "Provide a summary of {topic} | in {length}",
     "Give me a short overview of {topic} | in {length} | for {audience}",
     "Condense what is known about {topic} | into {length}"],
    ["List {number} {things} about {topic}", "Give {number} {things} related to {topic} | for {audience}",
     "Come up with {number} {things} about {topic}", "Brainstorm {number} {things} connected to {topic}",
     "Name {number} {things} that involve {topic} | for {audience}"],
    ["Give {number} tips for {activity} | for {audience}", "What are {number} good ways of {activity}?",
     "Suggest {number} strategies for {activity} | in {length}", "Offer advice on {activity} | for {audience}",
     "How can someone get better at {activity}? Give {number} tips",
     "Make a step by step plan for {activity} | for {audience}"],
    ["Compare {topic} and {topic2} | in {length}", "What are the differences between {topic} and {topic2}?",
     "Contrast {topic} with {topic2} | for {audience}", "Explain how {topic} is similar to {topic2}",
     "Write a short comparison of {topic} and {topic2} | in a {tone} tone"],
    ["Write a {lang} function that {code}", "Implement a function in {lang} that {code}",
     "Create a {lang} program that {code}", "Write code in {lang} which {code} | with comments",
     "Show me a {lang} snippet that {code}", "Give an efficient {lang} solution that {code}"],
    ["Classify the following {item} as {labels}", "Is this {item} {labels}? Answer with one word",
     "Label the given {item} as {labels}", "Decide whether the {item} below is {labels}",
     "Read the {item} and tell me if it is {labels}"],
    ["Translate the following sentence about {topic} into {language}",
     "Translate this paragraph on {topic} to {language}", "Render the text below in {language}",
     "How would you say this in {language}? The sentence is about {topic}"],
    ["Rewrite the following paragraph about {topic} to sound more {tone}",
     "Rephrase this text about {topic} in a {tone} way | for {audience}",
     "Edit the passage on {topic} so it reads as {tone}", "Make this description of {topic} more {tone}"],
    ["Write {number} quiz questions about {topic} | for {audience}",
     "Create a multiple choice quiz on {topic} with {number} questions",
     "Prepare {number} exam questions about {topic} | with answers",
     "Design a short test about {topic} | for {audience}"],
    ["Argue for or against {topic} | in {length}", "Write a persuasive paragraph about {topic} | for {audience}",
     "Give the pros and cons of {topic}", "What are the advantages and disadvantages of {topic}?",
     "Debate whether {topic} is good for society | in {length}"],
    ["Tell me a fun fact about {topic}", "Share an interesting fact about {topic} | for {audience}",
     "What is a surprising thing most people do not know about {topic}?",
     "Give one little-known fact about {topic}"],
    ["Write an email to {audience} about {topic} | in a {tone} tone",
     "Draft a message inviting {audience} to a talk on {topic}",
     "Compose a newsletter paragraph on {topic} | for {audience}",
     "Write a short announcement about {topic} | for {audience} | in a {tone} tone"],
    ["Plan a lesson about {topic} | for {audience}", "Design a one hour workshop on {topic} | for {audience}",
     "Outline a course module that teaches {topic} | to {audience}",
     "Suggest a classroom activity about {topic} | for {audience}"],
    ["Give a historical timeline of {topic} | in {length}", "When and how did {topic} begin?",
     "Describe the history of {topic} | for {audience}", "Trace the origins of {topic} | in {length}"],
]

SYNONYMS = {"write": ["compose", "create", "draft", "produce"], "explain": ["describe", "clarify", "outline"],
            "give": ["provide", "offer", "share", "list"], "list": ["enumerate", "name", "give"],
            "short": ["brief", "concise", "quick"], "simple": ["easy", "plain", "basic"],
            "create": ["make", "build", "design"], "about": ["on", "regarding", "concerning"],
            "following": ["given", "below"], "tips": ["suggestions", "pointers", "hints"],
            "ideas": ["suggestions", "concepts"], "help": ["assist"], "show": ["give", "display"],
            "function": ["method", "routine"], "program": ["script", "tool"], "describe": ["explain", "portray"],
            "ways": ["methods", "approaches"], "make": ["create", "produce"], "text": ["passage", "paragraph"],
            "good": ["great", "useful", "effective"], "interesting": ["fascinating", "intriguing"],
            "quiz": ["test"], "email": ["message", "note"], "plan": ["schedule", "outline"]}
PREFIXES = ["Please", "Can you", "Could you", "I would like you to", "Kindly", "I need you to", "Would you",
            "Your task is to", "Go ahead and", "Help me"]
SUFFIXES = ["Keep it brief.", "Use simple words.", "Thanks!", "Be creative.", "Make it engaging.",
            "Avoid jargon.", "Be specific.", "Please be concise."]
FILLERS = ["really", "very", "also", "just", "quickly", "carefully", "clearly", "briefly", "nice", "detailed"]


def _fill(template: str, rng: random.Random) -> tuple[str, list[str]]:
    """A template with its slots filled: the main sentence and its optional clauses (a random subset)."""
    values = {k: rng.choice(v) for k, v in SLOTS.items()}
    if values["topic2"] == values["topic"]:
        values["topic2"] = TOPICS[(TOPICS.index(values["topic"]) + 1) % len(TOPICS)]
    main, *clauses = [part.strip().format(**values) for part in template.split("|")]
    return main, [c for c in clauses if rng.random() < 0.6]


def _mutate(main: str, clauses: list[str], rng: random.Random) -> str:
    """One rewording of a task, the way a model asked again rewords it."""
    clauses = list(clauses)
    if clauses and rng.random() < 0.3:
        clauses.pop(rng.randrange(len(clauses)))
    words = " ".join([main, *clauses]).split()
    suffixes = []
    for _ in range(rng.choice([1, 1, 2, 2, 3])):
        op = rng.random()
        if op < 0.35:  # synonym swap
            spots = [i for i, w in enumerate(words) if w.lower() in SYNONYMS]
            if spots:
                i = rng.choice(spots)
                words[i] = rng.choice(SYNONYMS[words[i].lower()])
        elif op < 0.55:
            words.insert(rng.randrange(len(words) + 1), rng.choice(FILLERS))
        elif op < 0.7 and len(words) > 4:
            words.pop(rng.randrange(len(words)))
        elif op < 0.85 and clauses:  # move a clause to the front: "For nurses, explain ..."
            c, text = rng.choice(clauses), " ".join(words)
            if " " + c in text:
                rest = text.replace(" " + c, "")
                words = (c[0].upper() + c[1:] + ", " + rest[0].lower() + rest[1:]).split()
        else:
            suffixes.append(rng.choice(SUFFIXES))
    text = " ".join(words)
    if rng.random() < 0.35:
        text = rng.choice(PREFIXES) + " " + text[0].lower() + text[1:]
    end = rng.choice([".", ".", "", "?", "!", " ."])
    text = " ".join([text.rstrip(".?!") + end, *suffixes])
    if rng.random() < 0.1:
        text = text.lower()
    return text


def make_corpus(n: int, seed: int = 0, popular: int = 3000, fresh_share: float = 0.3) -> list[str]:
    """n instructions: a share of tasks asked once, the rest rewordings of `popular` base tasks
    drawn Zipf-like (a few tasks come back very often, as they do from a bootstrapping model)."""
    rng = random.Random(seed)
    templates = [t for family in FAMILIES for t in family]
    base = [_fill(rng.choice(templates), rng) for _ in range(popular)]
    cum_weights = list(accumulate(1 / (i + 1) ** 0.8 for i in range(popular)))
    out = []
    for _ in range(n):
        if rng.random() < fresh_share:
            out.append(_mutate(*_fill(rng.choice(templates), rng), rng))
        else:
            out.append(_mutate(*rng.choices(base, cum_weights=cum_weights)[0], rng))
    return out


# -- the measurements -----------------------------------------------------------------------------

def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def novel_queries(index: RougeIndex, count: int, seed: int) -> list[str]:
    """Fresh template instructions that have no near-duplicate in the pool (so nothing stops early)."""
    rng = random.Random(seed)
    templates = [t for family in FAMILIES for t in family]
    out = []
    while len(out) < count:
        text = _mutate(*_fill(rng.choice(templates), rng), rng)
        top, _ = index.most_similar(text, 1)
        if top and top[0][1] <= index.threshold:
            out.append(text)
    return out


def single_query(corpus: list[str], args, scorer) -> bool:
    print(f"(a) one novel candidate against a pool of {len(corpus):,}")
    t0 = time.perf_counter()
    pool = RougeIndex(args.threshold)
    for text in corpus:
        pool.add(text)
    print(f"    indexing the pool with add(): {time.perf_counter() - t0:.1f} s")
    queries = novel_queries(pool, args.queries, args.seed + 1)
    closest = [pool.most_similar(q, 1)[0][0][1] for q in queries]
    print(f"    {len(queries)} novel candidates, closest pool F1 {min(closest):.3f}..{max(closest):.3f} "
          f"(threshold {args.threshold}); e.g. {queries[0]!r}")

    rng = random.Random(args.seed + 2)
    per_query = max(1, args.ref_pairs // len(queries))
    pairs = [(corpus[i], q) for q in queries for i in rng.sample(range(len(corpus)), per_query)]
    ref_pair = best_of(lambda: [scorer.score(a, b) for a, b in pairs], 2) / len(pairs)
    ref = ref_pair * len(corpus)
    near = best_of(lambda: [pool.near_duplicate(q) for q in queries], 3) / len(queries)
    full = best_of(lambda: [pool.most_similar(q) for q in queries], 3) / len(queries)
    assert all(pool.near_duplicate(q) is None for q in queries)
    # what the filters leave to verify (a private method, read here for the figure only)
    verified = sum(len(pool._candidates(*pool._query(q)[1:])) for q in queries) / len(queries)
    print(f"    rouge-score RougeScorer.score: {ref_pair * 1e6:.1f} us/pair, measured on {len(pairs):,} pairs "
          f"and scaled to {len(corpus):,}: {ref * 1e3:.0f} ms per candidate")
    print(f"    near_duplicate (pruned, exact):  {near * 1e3:8.3f} ms per candidate  {ref / near:8.0f}x"
          f"   ({verified:.0f} of {len(corpus):,} pairs left to verify by LCS)")
    print(f"    most_similar (full exact scan):  {full * 1e3:8.3f} ms per candidate  {ref / full:8.0f}x")
    ok = ref / near >= 1000
    print(f"    target near_duplicate >= 1000x: {'PASS' if ok else 'FAIL'}")
    return ok


def full_dedup(corpus: list[str], args, scorer) -> bool:
    print(f"(b) incremental dedup of {len(corpus):,} instructions with add_if_new")
    index = RougeIndex(args.threshold)
    t0 = time.perf_counter()
    decisions = [index.add_if_new(text)[0] for text in corpus]
    wall = time.perf_counter() - t0
    kept = sum(decisions)
    print(f"    wall time {wall:.1f} s; kept {kept:,}, rejected {len(corpus) - kept:,} "
          f"({(len(corpus) - kept) / len(corpus):.1%} near-duplicates)")
    ok_time = wall <= 60
    print(f"    target <= 60 s: {'PASS' if ok_time else 'FAIL'}")

    # The reference loop as Self-Instruct's bootstrap runs it: rouge-score's tokenizer once per
    # text, rouge_scorer._score_lcs against every kept instruction, stopping at the first above.
    s = min(args.check, len(corpus))
    t0 = time.perf_counter()
    tok = scorer._tokenizer.tokenize
    kept_tokens, ref_decisions, on_threshold = [], [], 0
    for text in corpus[:s]:
        tokens = tok(text)
        new = True
        for old in kept_tokens:
            f = rouge_scorer._score_lcs(tokens, old).fmeasure
            on_threshold += f == args.threshold
            if f > args.threshold:
                new = False
                break
        ref_decisions.append(new)
        if new:
            kept_tokens.append(tokens)
    same = ref_decisions == decisions[:s]
    print(f"    reference loop on the first {s:,}: {time.perf_counter() - t0:.1f} s, kept {sum(ref_decisions):,}, "
          f"{on_threshold} pairs exactly at F1 == threshold; decisions identical: {'PASS' if same else 'FAIL'}")
    if not same:
        i = next(i for i, (a, b) in enumerate(zip(ref_decisions, decisions)) if a != b)
        print(f"    first difference at {i}: reference {ref_decisions[i]}, index {decisions[i]}: {corpus[i]!r}")
    return ok_time and same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000, help="corpus size")
    ap.add_argument("--check", type=int, default=2000, help="prefix checked against the reference loop")
    ap.add_argument("--queries", type=int, default=20, help="novel candidates timed in (a)")
    ap.add_argument("--ref-pairs", type=int, default=5000, help="pairs the reference is timed on in (a)")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    corpus = make_corpus(args.n, args.seed)
    print(f"corpus: {len(corpus):,} instructions, {len(set(corpus)):,} distinct strings, "
          f"{sum(len(t.split()) for t in corpus) / len(corpus):.1f} words on average "
          f"({time.perf_counter() - t0:.1f} s to generate)")
    for text in corpus[:5]:
        print(f"    {text}")
    assert rouge_l_f1(corpus[0], corpus[0]) == 1.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    ok = single_query(corpus, args, scorer)
    ok = full_dedup(corpus, args, scorer) and ok
    print(f"total {time.perf_counter() - t0:.0f} s: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
