"""The official scoring rules, on answers with hand-computed expectations and on fixtures in the official formats.

Every test names the official script it pins (repository, path). The fixture folders come from
``tests/llava_eval_files.py`` (LLaVA's ``playground/data/eval`` layout and file names).
"""

import json
import os

import pytest

import llava_eval_files as files  # tests/ helper
from configs import eval as eval_config
from qtl_jax.eval import export, gqa, mme, pope, scienceqa, vqa
from qtl_jax.eval.answers import Example, answers_path, assign_keys, read_answers
from qtl_jax.eval.benchmarks import BENCHMARKS


def _spec(eval_dir, name, **overrides):
    spec = dict(eval_config.LLAVA_BENCHMARKS[name], **overrides)
    spec["root"] = os.path.join(eval_dir, spec["root"])
    return spec


def _score(tmp_path, name, answers, **overrides):
    """Scores answer lines as score_only does: question file -> examples, answer file -> rows by key."""
    spec = _spec(str(tmp_path / "eval"), name, **overrides)
    bench = BENCHMARKS[spec["kind"]]
    path = answers_path(str(tmp_path / "answers"), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(a) + "\n" for a in answers)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return bench.score(spec, bench.load(spec), read_answers(path, bench.by_prompt), str(out))


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
    """haotian-liu/LLaVA llava/eval/m4c_evaluator.py, EvalAIAnswerProcessor: the answer normalisation."""
    assert vqa.normalize_answer(raw) == expected


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_accuracy_leave_one_out(matches, expected):
    """haotian-liu/LLaVA llava/eval/m4c_evaluator.py, TextVQAAccuracyEvaluator: mean over the ten
    leave-one-out subsets of min(1, matches / 3)."""
    answers = ["blue"] * matches + ["red"] * (10 - matches)
    assert vqa.soft_accuracy("Blue.", answers) == pytest.approx(expected)
    assert vqa.vqa_eval_accuracy("blue", answers) == pytest.approx(expected)


def test_soft_accuracy_normalises_both_sides_and_rejects_bad_counts():
    """haotian-liu/LLaVA llava/eval/m4c_evaluator.py: both sides go through the processor; 10 answers."""
    assert vqa.soft_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa.accuracy(["two", "cat"], [["2"] * 10, ["dog"] * 10]) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="exactly 10"):
        vqa.soft_accuracy("x", ["x"] * 9)


def test_official_vqa_tool_normalises_only_when_the_humans_disagree():
    """GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py: strips both sides; applies its
    punctuation and digit/article processing to both only when the human answers are not all equal; its
    digit-comma test takes exactly one comma; no lower-casing or "'s" split before the punctuation step."""
    assert vqa.vqa_eval_accuracy("two", ["2"] * 10) == 0.0           # all agree: compared as they are
    assert vqa.soft_accuracy("two", ["2"] * 10) == 1.0               # m4c always normalises
    assert vqa.vqa_eval_accuracy("two", ["2"] * 9 + ["3"]) == 1.0    # disagree: "two" -> "2"
    assert vqa.vqa_eval_accuracy("Yes\n", ["yes"] * 10) == 0.0       # stripped, but case kept
    assert vqa.vqa_eval_accuracy(" yes\t", ["yes"] * 10) == 1.0
    humans = ["1000"] * 5 + ["1,000"] * 5
    assert vqa.vqa_eval_accuracy("1,,000", humans) == 0.0            # two commas: "1 000"
    assert vqa.vqa_eval_accuracy("1,000", humans) == 1.0
    assert vqa.soft_accuracy("1,,000", humans) == 1.0                # m4c drops every comma first
    assert vqa.vqa_eval_accuracy("man 's", ["man's"] * 4 + ["man"] * 6) == 0.0
    assert vqa.soft_accuracy("man's", ["man's"] * 4 + ["man"] * 6) == 1.0


def test_vqav2_official_layout(tmp_path):
    """haotian-liu/LLaVA scripts/convert_vqav2_for_submission.py: the EvalAI submission lists every question of
    llava_vqav2_mscoco_test2015.jsonl with the m4c-processed answer ("" when unanswered); GT-Vision-Lab/VQA
    vqaEval.py scores the submitted answers (official_accuracy, per answer type) beside the m4c figure."""
    answers, expected, submission = files.write_vqav2(str(tmp_path / "eval"))
    got = _score(tmp_path, "vqav2", answers, annotation_file="vqav2_local_annotations.json")
    assert got == pytest.approx(expected)
    assert json.loads((tmp_path / "out" / "vqav2_submission.json").read_text()) == submission
    # Without annotations (test-dev): only the submission and the number of answers.
    assert _score(tmp_path, "vqav2", answers) == {"answered": 3.0}


# ------------------------------------------------------------------------------------------- TextVQA


def test_textvqa_question_forms():
    """haotian-liu/LLaVA llava/eval/eval_textvqa.py, prompt_processor: three prompt forms, lower-cased."""
    assert vqa.textvqa_question("What is written?\nReference OCR token: STOP\nAnswer briefly.") == "what is written?"
    assert vqa.textvqa_question("Reference OCR token: STOP\nWhat is written?\nAnswer briefly.") == "what is written?"
    assert vqa.textvqa_question("What Brand?\nAnswer briefly.") == "what brand?"
    assert vqa.textvqa_question("OCR tokens: a b Question: What Brand? Short answer:") == "what brand?"
    with pytest.raises(ValueError, match="none of the forms"):
        vqa.textvqa_question("What brand?")
    with pytest.raises(ValueError, match="none of the forms"):
        vqa.textvqa_question("a\nb\nc")  # 3 lines without a reference-token line


def test_textvqa_official_layout_repeats_image_ids(tmp_path):
    """haotian-liu/LLaVA llava/eval/eval_textvqa.py: llava_textvqa_val_v051_ocr.jsonl's question_id is the image
    id and repeats; an answer's annotation is found by (image id, question from the prompt, lower-cased)
    in TextVQA_0.5.1_val.json."""
    answers, expected = files.write_textvqa(str(tmp_path / "eval"))
    spec = _spec(str(tmp_path / "eval"), "textvqa")
    keys = [ex.key for ex in BENCHMARKS["textvqa"].load(spec)]
    assert len(set(keys)) == 3 and keys[0].startswith("0054c91397f2fe05|") and keys[1].startswith("0054c91397f2fe05|")
    assert _score(tmp_path, "textvqa", answers) == pytest.approx(expected)


def test_repeated_questions_get_their_own_keys():
    """An identical (image, prompt) twice is answered and scored twice: the n-th repeat's key gets #n."""
    assert assign_keys([("img", "q"), ("img", "q"), ("img", "r"), ("img", "q")], by_prompt=True) == [
        "img|q", "img|q#2", "img|r", "img|q#3"]
    assert assign_keys([(1, "q"), (2, "q")], by_prompt=False) == ["1", "2"]


# ------------------------------------------------------------------------------------------- MME


@pytest.mark.parametrize("text, label", [
    ("yes", "yes"), ("No", "no"), ("Yes, there is.", "yes"), ("No.", "no"), ("I think yes", "other"),
    ("Not sure", "no"), ("", "other"), ("nope", "no"), ("Maybe", "other"),
])
def test_mme_parse(text, label):
    """MME eval_tool/calculation.py, parse_pred_ans: lower-case; yes/no as is, else "yes"/"no" in the first 4
    characters, else other."""
    assert mme.parse_yes_no(text) == label


def test_mme_subtask_acc_plus_and_totals():
    """MME eval_tool/calculation.py: acc, acc+ over the image pairs, score = 100 acc + 100 acc+, group sums."""
    rows = [("1.txt", "q1", "Yes", "Yes"), ("1.txt", "q2", "No", "no"),     # both right
            ("2.txt", "q1", "Yes", "Yes"), ("2.txt", "q2", "No", "Yes"),    # one right
            ("3.txt", "q1", "Yes", "No"), ("3.txt", "q2", "No", "maybe")]   # none ("maybe" is other)
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


def test_mme_question_lookup_and_double_space_retry():
    """LLaVA's playground/data/eval/MME/convert_answer_to_mme.py (eval.zip): drop the short-answer line and
    strip, append " Please answer yes or no." unless present, retry with two spaces when missing; the
    ground-truth file is the id's last part up to its first '.' plus .txt."""
    gt = {("count", "a.txt", "How many?  Please answer yes or no."): "No",
          ("count", "a.txt", "Two? Please answer yes or no."): "Yes"}
    assert mme.lookup(gt, "count/a.b.png", f"How many?\n{mme.SHORT_ANSWER}") == (
        "How many?  Please answer yes or no.", "No")
    assert mme.lookup(gt, "count/images/a.png", "Two? Please answer yes or no.") == (
        "Two? Please answer yes or no.", "Yes")
    with pytest.raises(KeyError, match="no ground truth for subtask 'count', file 'a.txt'"):
        mme.lookup(gt, "count/a.png", "Three?")


def test_mme_official_layout(tmp_path):
    """LLaVA's MME/convert_answer_to_mme.py + MME eval_tool/calculation.py on the release layout: flat
    subtask folders and images/ + questions_answers_YN/, CRLF ground-truth lines, a double-spaced question;
    mme_results/<subtask>.txt holds what the converter writes (<stem>.txt, question, gt, answer)."""
    answers, expected = files.write_mme(str(tmp_path / "eval"))
    assert _score(tmp_path, "mme", answers) == pytest.approx(expected)
    assert (tmp_path / "out" / "mme_results" / "existence.txt").read_text() == (
        "000000006040.txt\tIs there a train in this image? Please answer yes or no.\tYes\tYes\n"
        "000000006040.txt\tIs there a bed in this image?  Please answer yes or no.\tNo\tNo\n")
    # The release's images/ subtask without its questions_answers_YN/ folder is a clear error.
    import shutil

    shutil.rmtree(tmp_path / "eval" / "MME" / "MME_Benchmark_release_version" / "artwork" / "questions_answers_YN")
    with pytest.raises(FileNotFoundError, match="no questions_answers_YN"):
        _score(tmp_path, "mme", answers)


# ------------------------------------------------------------------------------------------- POPE


@pytest.mark.parametrize("text, label", [
    ("No, there is not.", "no"), ("Yes. There is no dog.", "yes"), ("There is nothing", "yes"), ("none", "yes"),
    ("not really", "no"), ("NO", "yes"), ("Not really", "yes"), ("No!", "yes"), ("", "yes"), ("no.", "no"),
    ("Yes, no doubt", "no"), ("No,it is not", "no"),
])
def test_pope_parse(text, label):
    """haotian-liu/LLaVA llava/eval/eval_pope.py: cut from the first '.', remove ',', split on ' '; "no" iff a
    word is exactly No, not or no (so NO, Not really and No! are yes)."""
    assert pope.parse_yes_no(text) == label


def test_pope_split_metrics_and_no_yes_answer():
    """haotian-liu/LLaVA llava/eval/eval_pope.py: accuracy, precision, recall, F1, yes-ratio with yes positive.
    With no "yes" answer (TP+FP = 0) LLaVA's script raises ZeroDivisionError; TinyLLaVA/TinyLLaVA_Factory
    tinyllava/eval/eval_pope.py guards with 1e-6 and prints 0: we print 0."""
    m = pope.split_metrics(["Yes", "No", "No", "Yes", "yes"], ["yes", "yes", "no", "no", "yes"])
    assert m == pytest.approx({"accuracy": 60.0, "precision": 200 / 3, "recall": 200 / 3, "f1": 200 / 3,
                               "yes_ratio": 60.0, "count": 5.0})
    always_no = pope.split_metrics(["no"] * 4, ["yes", "no", "yes", "no"])
    assert always_no == {"accuracy": 50.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0,
                         "count": 4.0}
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope.split_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="one answer per label"):
        pope.split_metrics(["yes"], ["yes", "no"])


def test_pope_official_layout_pairs_labels_by_position(tmp_path):
    """haotian-liu/LLaVA llava/eval/eval_pope.py: llava_pope_test.jsonl numbers each category from its own offset
    (adversarial 1, random 10000001, popular 20000001) while coco_pope_<category>.json numbers rows 1..n;
    line i of a label file labels the i-th question of its category. (Pairing by question_id would score
    the random and popular labels against adversarial answers.)"""
    answers, expected = files.write_pope(str(tmp_path / "eval"))
    assert _score(tmp_path, "pope", answers) == pytest.approx(expected)
    # Our documented difference: the answer file's order does not matter (eval_pope.py zips in file order).
    assert _score(tmp_path, "pope", answers[::-1]) == pytest.approx(expected)
    # Only answered questions are scored, each with its own label (here the last two random ones).
    part = _score(tmp_path, "pope", answers[4:6])
    assert part == pytest.approx({"random/accuracy": 100.0, "random/precision": 100.0, "random/recall": 100.0,
                                  "random/f1": 100.0, "random/yes_ratio": 100.0, "random/count": 2.0,
                                  "accuracy": 100.0, "f1": 100.0})


def test_pope_label_file_of_another_question_file_is_an_error(tmp_path):
    """Pairing by position needs the label file the question file was built from (LLaVA used POPE's older
    2910-row coco_pope_random.json): a label row whose image differs from its question's is an error."""
    answers, _ = files.write_pope(str(tmp_path / "eval"))
    path = tmp_path / "eval" / "pope" / "coco" / "coco_pope_random.json"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["image"] = "COCO_val2014_000000999999.jpg"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"line 2 of .*coco_pope_random.json labels image .* does not belong"):
        _score(tmp_path, "pope", answers)
    path.write_text(json.dumps(rows[0]) + "\n")  # fewer labels than questions
    with pytest.raises(ValueError, match="has 1 labels but .* at least 2 questions of category 'random'"):
        _score(tmp_path, "pope", answers)


# ------------------------------------------------------------------------------------------- ScienceQA


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("B. a dog", "B"), ("The answer is C.", "C"), ("So The answer is D!", "D"),
    ("the answer is D.", "FAILED"),  # case-sensitive
    ("The answer is C", "FAILED"),   # the official pattern needs one character after the letter
    ("a", "FAILED"), ("B.", "FAILED"), ("The answer is A. The answer is B.", "FAILED"), ("", "FAILED"),
])
def test_sqa_parse(text, letter):
    """haotian-liu/LLaVA llava/eval/eval_science_qa.py: a letter, "<letter>. ...", or one "The answer is X."."""
    assert scienceqa.parse_option(text) == letter


def test_sqa_accuracy_counts_image_questions_from_the_prompt():
    """haotian-liu/LLaVA llava/eval/eval_science_qa.py: a letter past the choices is -1 (wrong); an unanswered
    problem is FAILED with prompt 'Unknown'; "image question" = "<image>" in the answer line's prompt."""
    problems = {"1": {"choices": ["x", "y"], "answer": 1}, "2": {"choices": ["x", "y", "z"], "answer": 0},
                "3": {"choices": ["x", "y"], "answer": 0}}
    answers = {"1": {"text": "B", "prompt": "<image>\nQ"}, "2": {"text": "C", "prompt": "<image>\nQ"},
               "3": {"text": "A", "prompt": "Q"}}
    assert scienceqa.accuracy(problems, ["1", "2", "3"], answers) == pytest.approx(
        {"accuracy": 200 / 3, "count": 3.0, "img_accuracy": 50.0, "img_count": 2.0})
    assert scienceqa.predicted_index("C", 2) == -1
    # No image question at all: img_accuracy 0 (the official script divides by zero).
    assert scienceqa.accuracy(problems, ["3"], answers)["img_accuracy"] == 0.0


def test_sqa_official_layout(tmp_path):
    """haotian-liu/LLaVA llava/eval/eval_science_qa.py with llava/eval/model_vqa_science.py's answer lines
    (prompt "<image>\\n..." for image rows, the option prompt appended): an unanswered image problem counts
    in accuracy (wrong) but not in img_accuracy."""
    answers, expected = files.write_scienceqa(str(tmp_path / "eval"))
    assert _score(tmp_path, "scienceqa", answers) == pytest.approx(expected)
    # Our reader records the same prompt model_vqa_science.py records.
    examples = {ex.key: ex for ex in BENCHMARKS["scienceqa"].load(_spec(str(tmp_path / "eval"), "scienceqa"))}
    for a in answers:
        assert examples[a["question_id"]].recorded_prompt == a["prompt"]
    assert examples["1"].prompt == f"Context: N/A\nQuestion 1?\nA. x\nB. y\n{files.OPTION}"


# ------------------------------------------------------------------------------------------- GQA, exports


def test_gqa_prediction_rule():
    """haotian-liu/LLaVA scripts/convert_gqa_for_eval.py: rstrip('.') then lower(); nothing else."""
    assert gqa.prediction("Yes..") == "yes"
    assert gqa.prediction(" Yes.\n") == " yes.\n"


def test_gqa_official_layout(tmp_path):
    """GQA's eval.py (run by haotian-liu/LLaVA scripts/v1_5/eval/gqa.sh): exact match over the isBalanced
    questions; binary = structural type other than "query", open = "query"; the predictions file is
    convert_gqa_for_eval.py's [{"questionId", "prediction"}]."""
    answers, expected = files.write_gqa(str(tmp_path / "eval"))
    assert _score(tmp_path, "gqa", answers) == pytest.approx(expected)
    preds = json.loads((tmp_path / "out" / "testdev_balanced_predictions.json").read_text())
    assert preds[:2] == [{"questionId": "20968196", "prediction": "yes"},
                         {"questionId": "20968197", "prediction": "on the left"}]


def test_gqa_questions_file_without_balance_flags_is_an_error(tmp_path):
    """GQA's eval.py reads isBalanced and types.structural of every question: a file without them (not GQA's
    questions file) is a clear error rather than a KeyError."""
    answers, _ = files.write_gqa(str(tmp_path / "eval"))
    (tmp_path / "eval" / "gqa" / "data" / "testdev_balanced_questions.json").write_text(
        json.dumps({q["question_id"]: {"answer": "yes"} for q in answers}))
    with pytest.raises(ValueError, match="lack 'isBalanced' or 'types.structural'"):
        _score(tmp_path, "gqa", answers)


def test_exports(tmp_path):
    """haotian-liu/LLaVA scripts/convert_mmvet_for_eval.py ({"v1_<id>": answer}); MMMU's main_eval_only.py
    --output_path ({id: answer or option letter})."""
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


# ------------------------------------------------------------------------------------------- answer files


def test_reads_model_vqa_loader_answer_files(tmp_path):
    """haotian-liu/LLaVA llava/eval/model_vqa_loader.py writes question_id, prompt, text, answer_id, model_id,
    metadata per line; a torn last line is ignored (resume), a repeated id or a line without the fields
    is an error."""
    path = tmp_path / "a.jsonl"
    lines = [files.answer_line(1, "Q?", "Yes", 0), files.answer_line(2, "Q?", "No", 1)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"question_id": 3, "pro')
    assert read_answers(str(path), by_prompt=False) == {"1": lines[0], "2": lines[1]}
    assert list(read_answers(str(path), by_prompt=True)) == ["1|Q?", "2|Q?"]
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[0]) + "\n")
    with pytest.raises(ValueError, match=r"question ids \['1'\] are answered more than once"):
        read_answers(str(path), by_prompt=False)
    assert list(read_answers(str(path), by_prompt=True)) == ["1|Q?", "1|Q?#2"]
    path.write_text(json.dumps({"question_id": 1, "answer": "x"}) + "\n")
    with pytest.raises(ValueError, match="lacks 'question_id' and 'text'"):
        read_answers(str(path), by_prompt=False)


def test_question_ids_must_be_unique_where_answers_are_keyed_by_id(tmp_path):
    """The official scorers look POPE/GQA/VQAv2 questions up by id (eval_pope.py builds a dict): repeated ids
    would be silently merged, so they are an error; TextVQA and MME key by id and prompt instead."""
    files.write_pope(str(tmp_path / "eval"))
    qfile = tmp_path / "eval" / "pope" / "llava_pope_test.jsonl"
    qfile.write_text(qfile.read_text() + qfile.read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match=r"question ids \['1'\] repeat; every question needs its own id"):
        BENCHMARKS["pope"].load(_spec(str(tmp_path / "eval"), "pope"))
