"""Every machine-dependent claim in the labs is printed by the code that measured it, not typed in the prose.

A markdown sentence that states a ratio (``1.8x``) or that something is faster / slower / halves the time fails
this test unless it is (a) a question, a prediction or a conditional ("expect", "if your ratio ..."), (b) a pointer
to what a cell printed ("the verdict above"), or (c) one of the invariant claims listed below: counted operations,
bit-exactness, instruction specifications and quoted figures from the slides, which no machine can contradict.
"""

import json
import re
from pathlib import Path

import pytest

SOLUTIONS = Path(__file__).resolve().parent.parent / "solutions"
NOTEBOOKS = sorted(SOLUTIONS.glob("[0-9][0-9]_*.ipynb"))

# a ratio such as 1.8x, 4x, 2.34X (not a shape such as 5 x 5), or a comparative speed claim
CLAIM = re.compile(r"(?<![\w.])(?<!\d )(?<![x×] )\d+(?:\.\d+)?\s?[xX×](?!\s*[\d(])(?![\w])|\bfaster\b|\bslower\b|\bhalves\b"
                   r"|\bspeed-?ups?\b|\bdoubles? the speed\b|\bloses? to\b|\bbeats?\b|\bscales? (?:well|linearly)\b"
                   r"|\badvantage\b|\bfalls? behind\b|\bmatters? most\b|\bhelps\b")
# (a) and (b): the sentence does not assert a measured outcome
HEDGED = re.compile(r"\?|\bexpect|\bpredict|\bif\b|\bwhether\b|\bwould\b|\bmight\b|\bmay\b|\bcould\b|\bcan\b"
                    r"|\bshould\b|\busually\b|\boften\b|\bverdict|\bprinted\b|\bprints\b|\byour (?:ratio|run|machine)"
                    r"|\bmeasure (?:it|them)\b|\bwhich\b|\bhow much\b|\bcompare\b|\bon some CPUs\b|\bclaim", re.I)
# (c) invariant claims: true on every machine, so no cell needs to compute them
INVARIANT = [
    r"up to 4x|4x the MACs|4x more|4x fewer|4x smaller|4x less|4x as many|1\.33x|just under 4x|a quarter",  # counted
    r"\b16x\b.*\b(pad|waste|work)|(pad|waste|work).*\b16x\b",  # nChw16c padding of one channel, counted
    r"slides'?|Intel's|Intel quotes|oneDNN's|documented|specification|per instruction|per cycle",  # quoted figures
    r"\b2x\b.*(instruction|peak|pairs|s16)|(instruction|peak|pairs|s16).*\b2x\b",  # vpdpwssd: half the lanes, counted
    r"bit[- ]identical|bit for bit|same bits",
    r"\bmodel\b.*(predicts|says)|(predicts|says).*\bmodel\b",  # the alpha-beta model's output, labelled
    r"1,024|8-16x|8–16x|TMUL|AMX",  # AMX: counted from its specification, not measurable here
    r"\b2 \(p - 1\)|p - 1",  # the ring's traffic, counted
    r"\b5X\b",  # the slides' figure, quoted as such
    r"the slower rank",  # a definition (the timeline's wait), not a comparison
]
INVARIANT_RE = re.compile("|".join(f"(?:{p})" for p in INVARIANT), re.I)


def sentences(markdown):
    """The markdown's sentences, with code spans, hidden answers' markers and link targets removed."""
    text = re.sub(r"`[^`]*`", "CODE", markdown)
    text = re.sub(r"<[^>]+>", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    parts = re.split(r"(?<=[.!?:])\s+(?=[A-Z*(\"])|\n\s*[-*\d]+[.)]?\s+|\n\n", text)
    return [" ".join(p.split()) for p in parts if p.strip()]


def unbacked_claims(notebook):
    cells = json.loads(Path(notebook).read_text())["cells"]
    found = []
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "markdown":
            continue
        for sentence in sentences("".join(cell["source"])):
            if CLAIM.search(sentence) and not HEDGED.search(sentence) and not INVARIANT_RE.search(sentence):
                found.append(f"cell {i}: {sentence}")
    return found


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_machine_dependent_claim_is_computed(notebook):
    found = unbacked_claims(notebook)
    assert not found, ("markdown states a speed claim no cell computes; print it from a bench verdict, or phrase "
                       "it as the question / expectation:\n" + "\n".join(found))


def test_the_claim_detector_catches_typed_claims_and_passes_hedged_ones():
    assert CLAIM.search("fusion makes training 1.04x faster") and not HEDGED.search("fusion makes training faster")
    assert HEDGED.search("expect fusion to be faster") and HEDGED.search("If your ratio is below 1, fusion lost")
    assert INVARIANT_RE.search("VNNI does up to 4x the MACs of fp32 per instruction")
    assert not INVARIANT_RE.search("a second thread nearly halves the time")
    assert sentences("One. Two is `1.5x` faster.\n\n- three") == ["One.", "Two is CODE faster.", "three"]


def test_every_timed_code_cell_uses_the_measurement_method():
    """No hand-rolled perf_counter timing or best_time in a solution: bench.measure / compare give the spread."""
    offenders = []
    for notebook in NOTEBOOKS:
        for i, cell in enumerate(json.loads(notebook.read_text())["cells"]):
            src = "".join(cell["source"])
            if cell["cell_type"] == "code" and re.search(r"\bbest_time\(|perf_counter\(\)", src):
                offenders.append(f"{notebook.stem} cell {i}")
    assert not offenders, f"timed without bench.measure/compare: {offenders}"
