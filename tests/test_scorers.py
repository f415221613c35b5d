"""The benchmark scoring rules on crafted answers with hand-computed expectations."""

import json

import pytest

from qtl_jax.eval import export, gqa, mme, pope, scienceqa, vqa
from qtl_jax.eval.answers import Example

# ------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),
    ("the dog.", "dog"),
    ("A Red Car", "red car"),
    ("dont", "don't"),
    ("yes!", "yes"),
    ("red-car", "red car"),       # a hyphen inside a word becomes a space
    ("x - y", "x y"),             # next to a space it is deleted
    ("3.5", "3.5"),               # a period before a digit stays
    ("it's", "it 's"),
    ("1,000", "1000"),
    ("What?\n", "what"),
    ("none", "0"),
    ("an apple, the pear", "apple pear"),
    ("(a)", ""),                  # brackets become spaces, then the article "a" is dropped
])
def test_normalize_answer(raw, expected):
    assert vqa.normalize_answer(raw) == expected


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_accuracy_leave_one_out(matches, expected):
    # k matching annotators: leaving one of them out leaves k-1 matches, leaving another out leaves k.
    answers = ["blue"] * matches + ["red"] * (10 - matches)
    assert vqa.soft_accuracy("Blue.", answers) == pytest.approx(expected)


def test_soft_accuracy_normalises_both_sides_and_rejects_bad_counts():
    assert vqa.soft_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa.accuracy(["two", "cat"], [["2"] * 10, ["dog"] * 10]) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="exactly 10"):
        vqa.soft_accuracy("x", ["x"] * 9)


def test_textvqa_question_extraction():
    assert vqa.textvqa_question("What is written?\nReference OCR token: STOP\nAnswer the question using a single "
                                "word or phrase.") == "what is written?"
    assert vqa.textvqa_question("OCR tokens: a b\nWhat Brand?\nAnswer briefly.") == "what brand?"


# ------------------------------------------------------------------------------------------- MME


@pytest.mark.parametrize("text, label", [
    ("yes", "yes"), ("No", "no"), ("Yes, there is.", "yes"), ("No.", "no"), ("I think yes", "other"),
    ("Not sure", "no"), ("", "other"), ("nope", "no"), ("Maybe", "other"),
])
def test_mme_parse(text, label):
    assert mme.parse_yes_no(text) == label


def test_mme_subtask_acc_plus_and_totals():
    rows = [("1.png", "q1", "Yes", "Yes"), ("1.png", "q2", "No", "no"),     # both right
            ("2.png", "q1", "Yes", "Yes"), ("2.png", "q2", "No", "Yes"),    # one right
            ("3.png", "q1", "Yes", "No"), ("3.png", "q2", "No", "maybe")]   # none ("maybe" is other)
    s = mme.subtask_scores(rows)
    assert s["acc"] == pytest.approx(50.0)
    assert s["acc_plus"] == pytest.approx(100 / 3)
    assert s["score"] == pytest.approx(50 + 100 / 3)
    per = {"existence": {"score": 150.0}, "count": {"score": 100.0}, "numerical_calculation": {"score": 70.0}}
    assert mme.totals(per) == {"perception": 250.0, "cognition": 70.0}
    with pytest.raises(ValueError, match="neither group"):
        mme.totals({"juggling": {"score": 1.0}})
    with pytest.raises(ValueError, match="two questions per image"):
        mme.subtask_scores(rows[:3])


def test_mme_question_of_prompt():
    p = "Is it red? Please answer yes or no.\nAnswer the question using a single word or phrase."
    assert mme.question_of(p) == "Is it red? Please answer yes or no."
    assert mme.question_of("Is it red?") == "Is it red? Please answer yes or no."


# ------------------------------------------------------------------------------------------- POPE


@pytest.mark.parametrize("text, label", [
    ("No, there is not.", "no"), ("Yes. There is no dog.", "yes"), ("There is nothing", "yes"), ("none", "yes"),
    ("not really", "no"), ("NO", "yes"), ("", "yes"), ("no.", "no"), ("Yes, no doubt", "no"),
])
def test_pope_parse(text, label):
    assert pope.parse_yes_no(text) == label


def test_pope_split_metrics():
    # preds yes/no/no/yes/yes vs labels yes/yes/no/no/yes: TP 2, FN 1, TN 1, FP 1.
    m = pope.split_metrics(["Yes", "No", "No", "Yes", "yes"], ["yes", "yes", "no", "no", "yes"])
    assert m == pytest.approx({"accuracy": 60.0, "precision": 200 / 3, "recall": 200 / 3, "f1": 200 / 3,
                               "yes_ratio": 60.0})
    always_no = pope.split_metrics(["no"] * 4, ["yes", "no", "yes", "no"])
    assert always_no == pytest.approx({"accuracy": 50.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0})
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope.split_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="one answer per label"):
        pope.split_metrics(["yes"], ["yes", "no"])


# ------------------------------------------------------------------------------------------- ScienceQA


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("B. a dog", "B"), ("The answer is C.", "C"), ("So The answer is D!", "D"), ("the answer is D.", "FAILED"),  # case-sensitive
    ("The answer is C", "FAILED"),   # the official pattern needs one character after the letter
    ("a", "FAILED"), ("B.", "FAILED"), ("The answer is A. The answer is B.", "FAILED"), ("", "FAILED"),
])
def test_sqa_parse(text, letter):
    assert scienceqa.parse_option(text) == letter


def test_sqa_accuracy_and_img_subset():
    problems = {
        "1": {"choices": ["x", "y"], "answer": 1, "image": "image.png"},
        "2": {"choices": ["x", "y", "z"], "answer": 0, "image": "image.png"},
        "3": {"choices": ["x", "y"], "answer": 0, "image": None},
        "4": {"choices": ["x", "y", "z", "w"], "answer": 3, "image": "image.png"},
        "5": {"choices": ["x", "y"], "answer": 1, "image": None},
    }
    answers = {"1": "B", "2": "The answer is A.", "3": "B", "4": "E", "5": "B. y"}  # 4: E is past the choices
    out = scienceqa.accuracy(problems, list(problems), answers)
    assert out["accuracy"] == pytest.approx(60.0)      # 1, 2, 5
    assert out["img_accuracy"] == pytest.approx(200 / 3)  # 1, 2 of 1, 2, 4
    assert out["img_count"] == 3
    assert scienceqa.predicted_index("C", 2) == -1
    # A problem without an answer counts as failed.
    assert scienceqa.accuracy(problems, ["1", "2"], {"1": "B"})["accuracy"] == pytest.approx(50.0)


# ------------------------------------------------------------------------------------------- GQA, exports


def test_gqa_exact_match():
    assert gqa.normalize(" Yes.\n") == "yes"
    assert gqa.accuracy(["Yes.", "left", "the cat"], ["yes", "right", "cat"]) == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="one prediction per answer"):
        gqa.accuracy(["a"], [])


def test_gqa_files(tmp_path):
    root = tmp_path / "gqa"
    root.mkdir()
    (root / "q.jsonl").write_text("\n".join(json.dumps({"question_id": q, "image": "x.jpg", "text": t})
                                           for q, t in (("201", "Which side?"), ("202", "Is it red?"))) + "\n")
    (root / "gold.json").write_text(json.dumps({"201": {"answer": "left"}, "202": {"answer": "no"}}))
    spec = {"kind": "gqa", "root": str(root), "question_file": "q.jsonl", "annotation_file": "gold.json"}
    examples = gqa.load(spec)
    rows = {"201": {"text": "Left."}, "202": {"text": "yes"}}
    assert gqa.score(spec, examples, rows, str(tmp_path)) == {"accuracy": 50.0}


def test_exports(tmp_path):
    examples = [Example("7", 7, "Describe.", None), Example("validation_Art_1", "validation_Art_1", "Pick.", None),
                Example("validation_Art_2", "validation_Art_2", "Pick.", None)]
    rows = {"7": {"text": "A cat."}, "validation_Art_1": {"text": "(B) the second"},
            "validation_Art_2": {"text": "blue"}}
    export.score_mmvet({}, examples[:1], rows, str(tmp_path))
    assert json.loads((tmp_path / "mmvet_results.json").read_text()) == {"v1_7": "A cat."}
    export.score_mmmu({}, examples[1:], rows, str(tmp_path))
    assert json.loads((tmp_path / "mmmu_results.json").read_text()) == {"validation_Art_1": "B",
                                                                        "validation_Art_2": "blue"}
    assert [export.option_letter(t) for t in ("A", "A.", "(C)", "D) x", "Apple", "")] == ["A", "A", "C", "D", None,
                                                                                          None]


# ------------------------------------------------------------------------------------------- real layouts


def test_mme_reads_questions_answers_yn_layout(tmp_path):
    """The official release keeps some subtasks' images in images/ and ground truth in questions_answers_YN/."""
    release = tmp_path / "MME" / "MME_Benchmark_release_version"
    (release / "artwork" / "images").mkdir(parents=True)
    (release / "artwork" / "questions_answers_YN").mkdir()
    (release / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this by Monet? Please answer yes or no.\tYes\nIs this by Dali? Please answer yes or no.\tNo\n")
    rows = [{"question_id": "artwork/10002.jpg", "image": "artwork/10002.jpg", "category": "artwork",
             "text": f"Is this by {a}? Please answer yes or no.\nAnswer the question using a single word or phrase."}
            for a in ("Monet", "Dali")]
    (tmp_path / "MME" / "llava_mme.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"kind": "mme", "root": str(tmp_path / "MME"), "question_file": "llava_mme.jsonl",
            "image_folder": "MME_Benchmark_release_version", "gt_folder": "MME_Benchmark_release_version"}
    examples = mme.load(spec)
    answers = {examples[0].key: {"text": "Yes"}, examples[1].key: {"text": "Yes"}}
    out = mme.score(spec, examples, answers, str(tmp_path))
    assert out == pytest.approx({"perception": 50.0, "cognition": 0.0, "artwork/acc": 50.0, "artwork/acc_plus": 0.0,
                                 "artwork/score": 50.0})
    written = (tmp_path / "mme_results" / "artwork.txt").read_text().splitlines()
    assert written[0] == "10002.jpg\tIs this by Monet? Please answer yes or no.\tYes\tYes"
