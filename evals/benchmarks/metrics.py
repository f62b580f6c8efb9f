"""The public benchmarks' own scoring rules, each written to behave as the scorer the paper's numbers came from.

The Q-Zoom paper evaluates through lmms-eval; every function here reproduces the lmms-eval task's rule (the
behaviour, checked case by case in ``tests/test_benchmarks.py``), with the quirks kept where they change scores:

* :func:`anls` (DocVQA, InfoVQA): 1 - normalised Levenshtein distance to the closest reference, 0 below 0.5. Both
  strings are lower-cased and their whitespace collapsed before the distance, but the length that divides it is the
  *raw* strings' (as lmms-eval's ``anls`` does).
* :func:`relaxed_correctness` (ChartQA): a number within 5 % of a numeric target (a trailing ``%`` divides by 100),
  otherwise a case-insensitive exact match. A target of 0 is compared as text.
* :func:`vqa_accuracy` (TextVQA): both sides through :func:`vqa_normalize` (the VQA/EvalAI answer processing), then
  the mean over the ten leave-one-out subsets of ``min(1, matches / 3)``.
* :func:`ocrbench_correct` / :func:`ocrbench_summary` (OCRBench): the lower-cased reference contained in the
  lower-cased prediction (HME100k formulas: with every space removed), scored per question type; the final score is
  the number right out of the 1000 questions.
* :func:`choice_letter` (V* Bench, HR-Bench): the option letter of a free-form reply (a bare letter, ``(B)``,
  ``C.``, "the answer is D", or the text of exactly one option).
* :func:`mme_realworld_letter` / :func:`mme_realworld_correct` / :func:`mme_realworld_summary`
  (MME-RealWorld-Lite): the first capital A-E after the answer prefixes are removed; right when it equals the
  answer (or contains it); accuracy overall, per task (Perception / Reasoning), per subtask and per category.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

# ---------------------------------------------------------------------------------------------------------------------
# ANLS (DocVQA, InfoVQA)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute: cost 1 each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one answer against its references (see the module docstring)."""
    if not references:
        raise ValueError("ANLS needs at least one reference answer")
    pred = " ".join(prediction.strip().lower().split())
    best = 1.0
    for ref in references:
        gt = " ".join(ref.strip().lower().split())
        length = max(len(ref), len(prediction))  # the raw lengths, as lmms-eval divides
        best = min(best, 0.0 if length == 0 else levenshtein(gt, pred) / length)
    score = 1.0 - best
    return score if score >= threshold else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Relaxed accuracy (ChartQA)


def _to_float(text: str) -> float | None:
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's relaxed accuracy for one answer (see the module docstring)."""
    pred_f, target_f = _to_float(prediction), _to_float(target)
    if pred_f is not None and target_f:  # a zero target falls through to the text comparison, as in the scorer
        return abs(pred_f - target_f) / abs(target_f) <= max_relative_change
    return prediction.lower() == target.lower()


# ---------------------------------------------------------------------------------------------------------------------
# VQA accuracy (TextVQA)

_NUMBERS = {
    w: str(i)
    for i, w in enumerate(["none", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])
}
_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophe-less spellings of English contractions, mapped back to the apostrophe form, as the VQA evaluation does.
_CONTRACTED = [
    "ain't",
    "aren't",
    "can't",
    "could've",
    "couldn't",
    "couldn't've",
    "didn't",
    "doesn't",
    "don't",
    "hadn't",
    "hadn't've",
    "hasn't",
    "haven't",
    "he'd",
    "he'd've",
    "he'll",
    "he's",
    "how'd",
    "how'll",
    "how's",
    "i'd've",
    "i'll",
    "i'm",
    "i've",
    "isn't",
    "it'd",
    "it'd've",
    "it'll",
    "let's",
    "ma'am",
    "mightn't",
    "mightn't've",
    "might've",
    "mustn't",
    "must've",
    "needn't",
    "not've",
    "o'clock",
    "oughtn't",
    "shan't",
    "she'd've",
    "she'll",
    "should've",
    "shouldn't",
    "shouldn't've",
    "somebody'd've",
    "somebody'll",
    "somebody's",
    "someone'd",
    "someone'd've",
    "someone'll",
    "someone's",
    "something'd",
    "something'd've",
    "something'll",
    "that's",
    "there'd",
    "there'd've",
    "there're",
    "there's",
    "they'd",
    "they'd've",
    "they'll",
    "they're",
    "they've",
    "twas",
    "wasn't",
    "we'd've",
    "we've",
    "weren't",
    "what'll",
    "what're",
    "what's",
    "what've",
    "when's",
    "where'd",
    "where's",
    "where've",
    "who'd",
    "who'd've",
    "who'll",
    "who's",
    "who've",
    "why'll",
    "why're",
    "why's",
    "won't",
    "would've",
    "wouldn't",
    "wouldn't've",
    "y'all",
    "y'all'll",
    "y'all'd've",
    "you'd",
    "you'd've",
    "you'll",
    "you're",
    "you've",
]


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for word in _CONTRACTED:
        parts = word.split("'")
        for mask in range(1, 1 << (len(parts) - 1)):  # every way of dropping at least one apostrophe
            spelled = parts[0]
            for k, part in enumerate(parts[1:]):
                spelled += ("" if mask >> k & 1 else "'") + part
            table.setdefault(spelled, word)
    return table


_CONTRACTIONS = _contraction_table()
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_COMMA_IN_NUMBER = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def vqa_normalize(answer: str) -> str:
    """The VQA/EvalAI answer processing: lower case, punctuation, number words to digits, articles, contractions."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    spaced = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCT:
        # Punctuation beside a space (or any text with a comma inside a number) is dropped; elsewhere it separates.
        out = out.replace(p, "" if (p + " " in text or " " + p in text or spaced) else " ")
    out = _PERIOD_NOT_BEFORE_DIGIT.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy over the human answers (ten for TextVQA): mean over leave-one-out subsets of min(1, hits/3)."""
    if not answers:
        raise ValueError("VQA accuracy needs the human answers")
    pred = vqa_normalize(prediction)
    gts = [vqa_normalize(a) for a in answers]
    scores = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return statistics.fmean(scores)


# ---------------------------------------------------------------------------------------------------------------------
# OCRBench

OCRBENCH_RECOGNITION = (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
)
OCRBENCH_TYPES = (
    *OCRBENCH_RECOGNITION,
    "Scene Text-centric VQA",
    "Doc-oriented VQA",
    "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
)


def ocrbench_correct(prediction: str, answers: Sequence[str], dataset: str) -> bool:
    """Whether any reference is contained in the prediction (HME100k: spaces and newlines removed first)."""
    pred = prediction.lower().strip()
    for ans in answers:
        if dataset == "HME100k":
            ok = ans.strip().replace("\n", " ").replace(" ", "") in pred.replace("\n", " ").replace(" ", "")
        else:
            ok = ans.lower().strip().replace("\n", " ") in pred.replace("\n", " ")
        if ok:
            return True
    return False


def ocrbench_summary(results: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Per question type, the number right; ``Text Recognition`` (the six recognition types); ``Final Score`` (all);
    ``accuracy`` = right / questions (on the full set, the final score / 1000)."""
    counts: dict[str, float] = {t: 0.0 for t in OCRBENCH_TYPES}
    n = 0
    for question_type, score in results:
        counts[question_type] = counts.get(question_type, 0.0) + score
        n += 1
    out = dict(counts)
    out["Text Recognition"] = sum(counts[t] for t in OCRBENCH_RECOGNITION)
    out["Final Score"] = sum(counts.values())
    out["accuracy"] = out["Final Score"] / n if n else float("nan")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Multiple choice (V* Bench, HR-Bench)

_LETTER_PATTERNS = (
    re.compile(r"^\(?([A-Z])\)?(?:[\s.:,)\]]|$)"),  # starts with the letter: "B", "(B)", "B.", "B) blue"
    re.compile(r"(?:ANSWER|CHOICE|OPTION)(?:\s+IS)?[\s:]+\(?([A-Z])\b"),  # "the answer is C", "Option: (C)"
    re.compile(r"\(([A-Z])\)"),  # "(C)" anywhere
)


def choice_letter(reply: str, options: Mapping[str, str]) -> str | None:
    """The option letter a reply picks, or None when it picks none or several (see the module docstring)."""
    text = reply.strip()
    upper = text.upper()
    for pattern in _LETTER_PATTERNS:
        m = pattern.search(upper)
        if m and m.group(1) in options:
            return m.group(1)
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", upper).split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1:
        return named[0]
    lowered = text.lower().strip(" .")
    matches = [letter for letter, option in options.items() if option.lower().strip(" .") == lowered]
    if not matches:
        matches = [letter for letter, option in options.items() if option.strip() and option.lower() in lowered]
    return matches[0] if len(matches) == 1 else None


def grouped_mean(results: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Mean score per group and ``average`` (the mean of the group means: HR-Bench's per-cycle-category rule)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for group, score in results:
        groups[group].append(score)
    out = {g: statistics.fmean(s) for g, s in sorted(groups.items())}
    out["average"] = statistics.fmean(out.values()) if out else float("nan")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# MME-RealWorld(-Lite)

_MME_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
)
MME_TASKS = ("Perception", "Reasoning")


def mme_realworld_letter(reply: str) -> str:
    """The letter an MME-RealWorld reply gives ("" for none): prefixes removed, then the first capital A-E; a long
    reply without one gives none; a short one naming an option's letter in lower case counts."""
    s = reply.strip()
    for prefix in _MME_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCDE]", s):
        return ""
    m = re.search("[ABCDE]", s)
    if m is None:
        for letter in "ABCDE":
            if s.lower() in f"({letter.lower()})":
                return letter
        return ""
    return m.group(0)


def mme_realworld_correct(letter: str, answer: str) -> bool:
    return letter.lower() == answer.lower() or answer.lower() in letter.lower()


def mme_realworld_task(category: str) -> tuple[str, str]:
    """(task, subtask) of a sample's ``category`` such as ``perception/Autonomous_Driving``."""
    return ("Perception" if "perception" in category.lower() else "Reasoning"), category.split("/")[-1]


def mme_realworld_summary(results: Iterable[tuple[str, str, float]]) -> dict[str, float]:
    """From (category, l2-category, score): ``accuracy`` over all, and per task, ``task/subtask`` and
    ``task/subtask/category`` (categories ending in an attribute are merged as MME-RealWorld's scorer does)."""
    right: dict[str, float] = defaultdict(float)
    total: dict[str, int] = defaultdict(int)
    for category, l2, score in results:
        task, sub = mme_realworld_task(category)
        cat = l2.lower()
        if "attribute" in cat:
            cat = cat.split("/")[0] + "/attribute"
        for key in ("accuracy", task, f"{task}/{sub}", f"{task}/{sub}/{cat}"):
            right[key] += score
            total[key] += 1
    return {k: right[k] / total[k] for k in sorted(total)}
