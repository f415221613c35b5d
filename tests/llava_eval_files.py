"""Small benchmark folders in the official formats, laid out like LLaVA's ``playground/data/eval``.

Each ``write_<benchmark>(eval_dir)`` writes that benchmark's files under LLaVA's default folder and file
names (the question file, the ground truth in the benchmark's own release format, a tiny image per
question) and returns ``(answers, expected)``: the answer lines the official PyTorch code
(``llava/eval/model_vqa_loader.py`` / ``model_vqa_science.py``) would write for scripted answers, and
the metrics the official scoring scripts give for them, computed by hand in the comments.

The formats follow the official files:

* POPE: LLaVA's ``pope/llava_pope_test.jsonl`` (per-category question_id offsets: adversarial 1, random
  10000001, popular 20000001) and POPE's ``pope/coco/coco_pope_<category>.json`` label files (JSON lines,
  question_id 1..n in each file).
* MME: ``MME/llava_mme.jsonl`` and ``MME/MME_Benchmark_release_version/<subtask>/`` with ``<stem>.txt``
  beside the image, or ``images/`` + ``questions_answers_YN/`` (CRLF lines and one double-spaced
  "  Please answer yes or no." as in the release).
* TextVQA: ``textvqa/llava_textvqa_val_v051_ocr.jsonl`` (question_id = image id, repeated) and
  ``textvqa/TextVQA_0.5.1_val.json``.
* ScienceQA: ``scienceqa/llava_test_CQM-A.json``, ``problems.json``, ``pid_splits.json``,
  ``images/test/<pid>/image.png``.
* GQA: ``gqa/llava_gqa_testdev_balanced.jsonl`` and ``gqa/data/testdev_balanced_questions.json``.
* VQAv2: ``vqav2/llava_vqav2_mscoco_test-dev2015.jsonl``, ``llava_vqav2_mscoco_test2015.jsonl`` and a
  VQA-format annotations file (test-dev's answers are not public; this stands in for a local split).
"""

import json
import os

import numpy as np
import PIL.Image

SHORT = "Answer the question using a single word or phrase."
OPTION = "Answer with the option's letter from the given choices directly."


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _image(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path, format="PNG")


def answer_line(question_id, prompt, text, n):
    """What model_vqa_loader.py writes (answer_id: a shortuuid; model_id: the checkpoint's name)."""
    return {"question_id": question_id, "prompt": prompt, "text": text, "answer_id": f"Xq{n:020d}",
            "model_id": "llava-v1.5-13b", "metadata": {}}


def write_pope(eval_dir):
    root = os.path.join(eval_dir, "pope")
    cats = {  # category: (qid offset, [(image, object, label, answer)])
        "adversarial": (1, [("COCO_val2014_000000000042.jpg", "dog", "yes", "Yes, there is a dog."),
                            ("COCO_val2014_000000000042.jpg", "cat", "no", "No."),
                            ("COCO_val2014_000000000073.jpg", "car", "no", "NO")]),           # NO counts as yes
        "random": (10000001, [("COCO_val2014_000000000074.jpg", "cup", "no", "There is not a cup."),
                              ("COCO_val2014_000000000074.jpg", "bus", "yes", "Not really"),  # yes
                              ("COCO_val2014_000000000133.jpg", "bed", "yes", "No! It is there.")]),  # yes
        "popular": (20000001, [("COCO_val2014_000000000136.jpg", "tie", "yes", "No"),
                               ("COCO_val2014_000000000136.jpg", "kite", "no", "No"),
                               ("COCO_val2014_000000000139.jpg", "sink", "yes", "no")]),
    }
    questions, answers = [], []
    for cat, (offset, items) in cats.items():
        labels = []
        for i, (image, obj, label, answer) in enumerate(items):
            text = f"Is there a {obj} in the image?"
            labels.append({"question_id": i + 1, "image": image, "text": text, "label": label})
            q = {"question_id": offset + i, "image": image, "text": f"{text}\n{SHORT}", "category": cat}
            questions.append(q)
            answers.append(answer_line(q["question_id"], q["text"], answer, len(answers)))
            _image(os.path.join(root, "val2014", image))
        _jsonl(os.path.join(root, "coco", f"coco_pope_{cat}.json"), labels)
    _jsonl(os.path.join(root, "llava_pope_test.jsonl"), questions)
    # adversarial: preds yes/no/yes vs yes/no/no: TP 1 FP 1 TN 1 -> acc 2/3, P 1/2, R 1, F1 2/3, yes 2/3.
    # random: no/yes/yes vs no/yes/yes: all right -> acc 1, P 1, R 1, F1 1, yes 2/3.
    # popular: no/no/no vs yes/no/yes: TN 1 FN 2, TP+FP = 0 -> acc 1/3, P 0, R 0, F1 0, yes 0.
    expected = {
        "adversarial/accuracy": 200 / 3, "adversarial/precision": 50.0, "adversarial/recall": 100.0,
        "adversarial/f1": 200 / 3, "adversarial/yes_ratio": 200 / 3, "adversarial/count": 3.0,
        "random/accuracy": 100.0, "random/precision": 100.0, "random/recall": 100.0, "random/f1": 100.0,
        "random/yes_ratio": 200 / 3, "random/count": 3.0,
        "popular/accuracy": 100 / 3, "popular/precision": 0.0, "popular/recall": 0.0, "popular/f1": 0.0,
        "popular/yes_ratio": 0.0, "popular/count": 3.0,
        "accuracy": 200 / 3, "f1": 500 / 9,
    }
    return answers, expected


def write_mme(eval_dir):
    root = os.path.join(eval_dir, "MME")
    release = os.path.join(root, "MME_Benchmark_release_version")
    # existence: flat layout; the release's .txt files use CRLF and one question has the double space.
    _image(os.path.join(release, "existence", "000000006040.jpg"))
    with open(os.path.join(release, "existence", "000000006040.txt"), "w", encoding="utf-8", newline="") as f:
        f.write("Is there a train in this image? Please answer yes or no.\tYes\r\n"
                "Is there a bed in this image?  Please answer yes or no.\tNo\r\n")
    # artwork: images/ + questions_answers_YN/.
    _image(os.path.join(release, "artwork", "images", "10002.jpg"))
    os.makedirs(os.path.join(release, "artwork", "questions_answers_YN"))
    with open(os.path.join(release, "artwork", "questions_answers_YN", "10002.txt"), "w", encoding="utf-8") as f:
        f.write("Is this artwork created by Donatello? Please answer yes or no.\tYes\n"
                "Is this artwork created by Paul Cezanne? Please answer yes or no.\tNo\n")
    _image(os.path.join(release, "commonsense_reasoning", "0001.png"))
    with open(os.path.join(release, "commonsense_reasoning", "0001.txt"), "w", encoding="utf-8") as f:
        f.write("Should I wear a coat in this weather? Please answer yes or no.\tYes\n"
                "Should I wear shorts in this weather? Please answer yes or no.\tNo\n")
    rows = [  # (question_id, text, answer)
        ("existence/000000006040.jpg", f"Is there a train in this image?\n{SHORT}", "Yes"),
        ("existence/000000006040.jpg", f"Is there a bed in this image?\n{SHORT}", "No"),
        ("artwork/images/10002.jpg", f"Is this artwork created by Donatello?\n{SHORT}", "Yes, it is."),
        ("artwork/images/10002.jpg", f"Is this artwork created by Paul Cezanne?\n{SHORT}", "yes"),
        # The prompt already holds "Please answer yes or no.": the converter takes it as it is.
        ("commonsense_reasoning/0001.png", "Should I wear a coat in this weather? Please answer yes or no.", "No"),
        ("commonsense_reasoning/0001.png", f"Should I wear shorts in this weather?\n{SHORT}", "Maybe"),
    ]
    questions = [{"question_id": q, "image": q, "text": t, "category": q.split("/")[0]} for q, t, _ in rows]
    _jsonl(os.path.join(root, "llava_mme.jsonl"), questions)
    answers = [answer_line(q, t, a, i) for i, (q, t, a) in enumerate(rows)]
    # existence: both right -> 100 + 100; artwork: one right -> 50 + 0; commonsense: none ("Maybe" is other).
    expected = {"perception": 250.0, "cognition": 0.0,
                "artwork/acc": 50.0, "artwork/acc_plus": 0.0, "artwork/score": 50.0,
                "commonsense_reasoning/acc": 0.0, "commonsense_reasoning/acc_plus": 0.0,
                "commonsense_reasoning/score": 0.0,
                "existence/acc": 100.0, "existence/acc_plus": 100.0, "existence/score": 200.0}
    return answers, expected


def write_textvqa(eval_dir):
    root = os.path.join(eval_dir, "textvqa")
    ann = [
        {"image_id": "0054c91397f2fe05", "question": "what is the brand of this camera?",
         "answers": ["dakota"] * 6 + ["dakota digital"] * 4},
        {"image_id": "0054c91397f2fe05", "question": "What does the small white text spell?",
         "answers": ["copenhagen"] * 2 + ["cph"] * 8},
        {"image_id": "00685bc495504d61", "question": "what number is on the bike?",
         "answers": ["14"] * 3 + ["41"] * 7},
    ]
    _json(os.path.join(root, "TextVQA_0.5.1_val.json"), {"dataset_name": "textvqa", "data": ann})
    rows = [  # question_id is the image id; the first two questions share it
        ("0054c91397f2fe05", f"what is the brand of this camera?\nReference OCR token: dakota, digital\n{SHORT}",
         "Dakota"),
        ("0054c91397f2fe05", f"what does the small white text spell?\nReference OCR token: copenhagen\n{SHORT}",
         "Copenhagen."),
        ("00685bc495504d61", f"what number is on the bike?\n{SHORT}", "14"),
    ]
    questions = [{"question_id": q, "image": f"{q}.jpg", "text": t} for q, t, _ in rows]
    for q, _, _ in rows:
        _image(os.path.join(root, "train_images", f"{q}.jpg"))
    _jsonl(os.path.join(root, "llava_textvqa_val_v051_ocr.jsonl"), questions)
    answers = [answer_line(q, t, a, i) for i, (q, t, a) in enumerate(rows)]
    # dakota: 6 matches -> 1; copenhagen: 2 matches -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6; 14: 3 -> 0.9.
    return answers, {"accuracy": 100 * 2.5 / 3, "count": 3.0}


def write_scienceqa(eval_dir):
    root = os.path.join(eval_dir, "scienceqa")
    problems = {  # pid: (choices, answer index, has image, answer text or None = unanswered)
        "1": (["x", "y"], 1, True, "B"),
        "2": (["x", "y", "z"], 0, True, "The answer is A."),
        "3": (["x", "y"], 0, False, "A"),
        "4": (["x", "y", "z", "w"], 3, True, "E"),      # E is past the 4 choices: wrong
        "5": (["x", "y"], 1, True, None),               # an image problem without an answer
    }
    _json(os.path.join(root, "problems.json"), {
        pid: {"question": f"Question {pid}?", "choices": c, "answer": a, "hint": "",
              "image": "image.png" if img else None, "split": "test"} for pid, (c, a, img, _) in problems.items()})
    _json(os.path.join(root, "pid_splits.json"), {"test": list(problems), "val": []})
    convs, answers = [], []
    for pid, (choices, a, img, text) in problems.items():
        options = "\n".join(f"{'ABCDE'[j]}. {c}" for j, c in enumerate(choices))
        body = f"Context: N/A\nQuestion {pid}?\n{options}"
        row = {"id": pid, "conversations": [{"from": "human", "value": f"<image>\n{body}" if img else body},
                                            {"from": "gpt", "value": "ABCDE"[a]}]}
        if img:
            row["image"] = f"{pid}/image.png"
            _image(os.path.join(root, "images", "test", pid, "image.png"))
        convs.append(row)
        if text is not None:  # model_vqa_science.py's recorded prompt
            answers.append(answer_line(pid, ("<image>\n" if img else "") + f"{body}\n{OPTION}", text, len(answers)))
    _json(os.path.join(root, "llava_test_CQM-A.json"), convs)
    # Right: 1, 2, 3 of 5 -> 60. Image questions by "<image>" in the answer's prompt: 1, 2, 4 (5 has no
    # answer, so no prompt) -> 2 of 3.
    return answers, {"accuracy": 60.0, "count": 5.0, "img_accuracy": 200 / 3, "img_count": 3.0}


def write_gqa(eval_dir):
    root = os.path.join(eval_dir, "gqa")
    questions = {  # qid: (gold, isBalanced, structural type, answer)
        "20968196": ("yes", True, "verify", "Yes."),
        "20968197": ("left", True, "query", "On the left."),  # exact match only: wrong
        "20968198": ("cat", True, "query", "Cat"),
        "20968199": ("no", False, "logical", "yes"),    # not balanced: not scored
        "20968200": ("yes", True, "logical", "yes"),
    }
    _json(os.path.join(root, "data", "testdev_balanced_questions.json"), {
        q: {"question": f"question {q}?", "answer": g, "fullAnswer": g, "imageId": "n161313", "isBalanced": b,
            "types": {"structural": s, "semantic": "attr", "detailed": "x"},
            "semantic": [{"operation": "select", "argument": "sky (1)", "dependencies": []}],
            "groups": {"global": g, "local": f"10q-{g}"}}
        for q, (g, b, s, _) in questions.items()})
    rows = [{"question_id": q, "image": "n161313.jpg", "text": f"question {q}?\n{SHORT}"} for q in questions]
    _image(os.path.join(root, "data", "images", "n161313.jpg"))
    _jsonl(os.path.join(root, "llava_gqa_testdev_balanced.jsonl"), rows)
    answers = [answer_line(r["question_id"], r["text"], questions[r["question_id"]][3], i)
               for i, r in enumerate(rows)]
    # Balanced: ...196 (binary) right, ...197 (open) wrong, ...198 (open) right, ...200 (binary) right.
    return answers, {"accuracy": 75.0, "binary": 100.0, "open": 50.0, "count": 4.0}


def write_vqav2(eval_dir, annotations="vqav2_local_annotations.json"):
    root = os.path.join(eval_dir, "vqav2")
    items = [  # qid, answer type, ten human answers, model answer
        (262144000, "number", ["2"] * 9 + ["3"], "Two."),
        (262144001, "yes/no", ["yes"] * 10, "Yes"),
        # m4c splits "'s" off the prediction and the humans alike (match); the official tool does not
        # split it off the human answers, so the submitted "man 's" matches none of them.
        (262144002, "other", ["man's"] * 4 + ["man"] * 6, "man's"),
    ]
    rows = [{"question_id": q, "image": "COCO_test2015_000000262144.jpg", "text": f"Question {q}?\n{SHORT}",
             "category": "default"} for q, _, _, _ in items]
    _jsonl(os.path.join(root, "llava_vqav2_mscoco_test-dev2015.jsonl"), rows)
    _jsonl(os.path.join(root, "llava_vqav2_mscoco_test2015.jsonl"),
           rows + [{"question_id": 262144003, "image": "COCO_test2015_000000262144.jpg", "text": f"More?\n{SHORT}",
                    "category": "default"}])
    _image(os.path.join(root, "test2015", "COCO_test2015_000000262144.jpg"))
    _json(os.path.join(root, annotations), {"annotations": [
        {"question_id": q, "image_id": 262144, "question_type": "what", "answer_type": t,
         "multiple_choice_answer": h[0],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(h)]}
        for q, t, h, _ in items]})
    answers = [answer_line(r["question_id"], r["text"], a, i) for i, (r, (_, _, _, a)) in enumerate(zip(rows, items))]
    expected = {"accuracy": 100.0, "official_accuracy": 200 / 3, "count": 3.0, "official_accuracy/number": 100.0,
                "official_accuracy/other": 0.0, "official_accuracy/yes/no": 100.0}
    submission = [{"question_id": 262144000, "answer": "2"}, {"question_id": 262144001, "answer": "yes"},
                  {"question_id": 262144002, "answer": "man 's"}, {"question_id": 262144003, "answer": ""}]
    return answers, expected, submission


WRITERS = {"pope": write_pope, "mme": write_mme, "textvqa": write_textvqa, "scienceqa": write_scienceqa,
           "gqa": write_gqa}
