"""eval.py on a folder laid out like LLaVA's ``playground/data/eval``, and answer files both ways.

* The official PyTorch code's answer files (``llava/eval/model_vqa_loader.py`` /
  ``model_vqa_science.py`` lines) are scored here without a model (``config.score_only``), with the
  official scripts' numbers.
* Our answer files hold the same lines (question_id, prompt, text, answer_id, model_id, metadata, in
  question order) as the official code writes, so the official scoring scripts read ours.
* Benchmarks whose files are missing are skipped with one line naming the file; no per-benchmark flag.
"""

import json
import os
import subprocess
import sys
import types

import pytest

import llava_eval_files as files  # tests/ helper
from configs import eval as eval_config
from qtl_jax.eval import harness, runner
from qtl_jax.eval.answers import answers_path, read_jsonl
from qtl_jax.eval.benchmarks import benchmark_specs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESENT = ("pope", "mme", "textvqa", "scienceqa", "gqa")
ABSENT = {"vqav2": "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", "mmvet": "mm-vet/llava-mm-vet.jsonl",
          "mmmu": "MMMU/llava_mmmu_val.jsonl"}


@pytest.fixture(scope="module")
def playground(tmp_path_factory):
    """``eval/``: five benchmarks in LLaVA's layout (no VQAv2, MM-Vet, MMMU); ``answers/``: the official
    code's answer files named after the benchmarks; the expected metrics."""
    root = tmp_path_factory.mktemp("playground")
    eval_dir, answers_dir = str(root / "eval"), str(root / "answers")
    expected, official = {}, {}
    for name in PRESENT:
        official[name], expected[name] = files.WRITERS[name](eval_dir)
        os.makedirs(answers_dir, exist_ok=True)
        with open(answers_path(answers_dir, name), "w") as f:
            f.writelines(json.dumps(a) + "\n" for a in official[name])
    return types.SimpleNamespace(eval_dir=eval_dir, answers_dir=answers_dir, expected=expected, official=official)


def _config(playground, **kw):
    c = eval_config.get_config()
    c.benchmark_dir = playground.eval_dir
    c.progress = False
    for k, v in kw.items():
        c[k] = v
    return c


def test_score_only_scores_official_answer_files(playground, tmp_path, capsys):
    """Answer files written by the official PyTorch code get the official scripts' numbers (the per-script
    rules are pinned in tests/test_scorers.py); missing benchmarks are skipped with one line each."""
    out = runner.evaluate(_config(playground, score_only=True, answers_dir=playground.answers_dir), str(tmp_path))
    assert set(out["metrics"]) == set(PRESENT)
    for name in PRESENT:
        assert out["metrics"][name] == pytest.approx(playground.expected[name]), name
    assert json.loads((tmp_path / "metrics.json").read_text()) == out["metrics"]
    printed = capsys.readouterr().out.splitlines()
    for name, rel in ABSENT.items():
        assert f"skipping {name}: {os.path.join(playground.eval_dir, rel)} does not exist" in printed
    assert "scienceqa: 1 of 5 questions have no answer in " + answers_path(playground.answers_dir, "scienceqa") \
        in printed
    assert (tmp_path / "results" / "mme" / "mme_results" / "existence.txt").is_file()


class _Replay:
    """Answers each question with the official answer file's text for it (the same model, replayed)."""

    def __init__(self, official):
        self.texts = {(str(a["question_id"]), a["prompt"]): a["text"] for a in official}
        self.asked = 0

    def __call__(self, batch):
        self.asked += len(batch)
        return [self.texts.get((str(ex.question_id), ex.recorded_prompt), "A") for ex in batch]


def test_our_answer_files_are_the_official_answer_files(playground, tmp_path):
    """Evaluating writes, per benchmark, the lines model_vqa_loader.py / model_vqa_science.py write for the
    same answers (apart from answer_id and model_id), in question order, so the official scripts score
    ours; score_only on our answer folder reproduces the run's metrics."""
    config = _config(playground, batch_size=2)
    specs = runner.present_specs(benchmark_specs(config), with_images=True)
    assert set(specs) == set(PRESENT)
    stub = types.SimpleNamespace(source="replay", levels=lambda: None)
    metrics = {}
    for name in PRESENT:
        replay = _Replay(playground.official[name])
        metrics.update(harness.run_benchmarks(stub, config, str(tmp_path / "run"), answerer=replay,
                                              specs={name: specs[name]}))
        ours = read_jsonl(answers_path(str(tmp_path / "run" / "answers"), name))
        assert all(list(r) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"] for r in ours)
        assert len({r["answer_id"] for r in ours}) == len(ours) and {r["model_id"] for r in ours} == {"replay"}

        def strip_ids(rows):
            return [{k: r[k] for k in ("question_id", "prompt", "text", "metadata")} for r in rows]

        official = strip_ids(playground.official[name])
        if name == "scienceqa":  # the official file lacks problem 5; we answered every question ("A")
            assert strip_ids(ours)[:4] == official and ours[4]["question_id"] == "5"
        else:
            assert strip_ids(ours) == official
        assert replay.asked == len(ours)
    for name in ("pope", "mme", "textvqa", "gqa"):
        assert metrics[name] == pytest.approx(playground.expected[name]), name
    # Problem 5 answered "A" (wrong), now an image question with a prompt: 2 of 4 image questions right.
    assert metrics["scienceqa"] == pytest.approx({"accuracy": 60.0, "count": 5.0, "img_accuracy": 50.0,
                                                  "img_count": 4.0})
    again = runner.evaluate(_config(playground, score_only=True, answers_dir=str(tmp_path / "run" / "answers")),
                            str(tmp_path / "rescored"))
    assert again["metrics"] == metrics


def test_skips_a_benchmark_without_its_images_when_answering(playground, tmp_path, capsys):
    """Answering needs the image folder; scoring answer files does not."""
    import shutil

    eval_dir = tmp_path / "eval"
    shutil.copytree(playground.eval_dir, eval_dir)
    shutil.rmtree(eval_dir / "gqa" / "data" / "images")
    config = _config(playground)
    config.benchmark_dir = str(eval_dir)
    specs = benchmark_specs(config)
    assert set(runner.present_specs(specs, with_images=True)) == set(PRESENT) - {"gqa"}
    assert f"skipping gqa: {eval_dir / 'gqa' / 'data' / 'images'} does not exist" in capsys.readouterr().out
    assert set(runner.present_specs(specs, with_images=False)) == set(PRESENT)
    config.benchmark_dir = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="none of the configured benchmarks has its files under"):
        runner.present_specs(benchmark_specs(config), with_images=False)


def test_score_only_errors(playground, tmp_path):
    with pytest.raises(FileNotFoundError, match="score_only needs --config.answers_dir"):
        runner.evaluate(_config(playground, score_only=True), str(tmp_path / "w1"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no answer file for any configured benchmark"):
        runner.evaluate(_config(playground, score_only=True, answers_dir=str(empty)), str(tmp_path / "w2"))
    # POPE's answers under MME's name: they match no MME question.
    (empty / "mme.jsonl").write_text(open(answers_path(playground.answers_dir, "pope")).read())
    with pytest.raises(ValueError, match="answers match no question of mme's question file"):
        runner.evaluate(_config(playground, score_only=True, answers_dir=str(empty)), str(tmp_path / "w3"))


def test_eval_cli_score_only(playground, tmp_path):
    """``python eval.py --config=configs/eval.py --config.score_only=True --config.answers_dir=DIR``."""
    cmd = [sys.executable, "eval.py", "--config=configs/eval.py", "--config.score_only=True",
           f"--config.answers_dir={playground.answers_dir}", f"--config.benchmark_dir={playground.eval_dir}",
           f"--workdir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"pope: f1={500 / 9:.2f} (9 answers from {answers_path(playground.answers_dir, 'pope')})" in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["gqa"] == pytest.approx(playground.expected["gqa"])
