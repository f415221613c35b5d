"""ScienceQA-IMG answers of a finished Figure-3 run, split the way session 28 read them (docs/experiments.md).

    python docs/session28/letters.py /tmp/fig3 fp16 blind L4

Per model: accuracy per question kind (the problem's first words), and among the answers that name an
offered option the accuracy against chance (the mean of 1 / options over the same problems): a model that
has not learned to answer with the option's letter sits at chance there whatever it sees in the image.
Then the text-only problems (no image), and the letters answered per number of options.
"""

import collections
import json
import os
import sys


def main(workdir: str, models: list[str]) -> None:
    bench = os.path.join(workdir, "data", "images", "benchmarks", "scienceqa", "problems.json")
    with open(bench, encoding="utf-8") as f:
        problems = json.load(f)
    for model in models:
        with open(os.path.join(workdir, model, "eval", "answers", "scienceqa.jsonl"), encoding="utf-8") as f:
            answers = [json.loads(line) for line in f]
        kinds = collections.defaultdict(lambda: [0, 0])
        text_only = [0, 0]
        letters = collections.Counter()
        offered = right = 0
        chance = 0.0
        for a in answers:
            p = problems[a["question_id"]]
            pred = a["text"].strip().rstrip(".")
            n = len(p["choices"])
            ok = pred == "ABCDE"[p["answer"]]
            if p.get("image") is None:
                text_only[0] += ok
                text_only[1] += 1
                continue
            kind = " ".join(p["question"].split()[:2])
            kinds[kind][0] += ok
            kinds[kind][1] += 1
            letters[(n, pred)] += 1
            if pred and pred in "ABCDE"[:n]:
                offered += 1
                right += ok
                chance += 1 / n
        n_img = sum(v[1] for v in kinds.values())
        print(f"{model}: {sum(v[0] for v in kinds.values())}/{n_img} with an image; "
              f"{offered} answers name an offered option: {100 * right / max(offered, 1):.1f} % right, "
              f"chance {100 * chance / max(offered, 1):.1f} %; text-only {text_only[0]}/{text_only[1]}")
        print("  per kind: " + ", ".join(f"{k!r} {v[0]}/{v[1]}" for k, v in sorted(kinds.items())))
        print("  letters (options, answer): " + ", ".join(f"{k}: {v}" for k, v in sorted(letters.items())))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python docs/session28/letters.py WORKDIR MODEL [MODEL ...]")
    main(sys.argv[1], sys.argv[2:])
