"""The evaluation runner: file contract, resume after an interruption, the bits sweep, clear errors.

Scoring runs on the built-in shapes benchmark files (written tiny here) with scripted answerers (the
ground truth, an always-"Yes" model), so the expected numbers are exact; one end-to-end run uses a tiny
random model through real generation and checks the output files, not its (meaningless) scores.
"""

import collections
import json
import math
import os
import types

import numpy as np
import pytest

from configs import eval as eval_config
from qtl_jax import codec
from qtl_jax.data.shapes import benchmarks as benchmark_files
from qtl_jax.data.shapes import ShapesConfig
from qtl_jax.eval import answerer, harness, mme, runner, vqa
from qtl_jax.eval.answers import answers_path, read_answers, read_json, read_jsonl
from qtl_jax.eval.benchmarks import BENCHMARKS, benchmark_specs, subsample

STUB = types.SimpleNamespace(source="scripted", levels=lambda: None)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("benchmarks"))
    benchmark_files.write_benchmarks(root, seed=0, cfg=ShapesConfig(image_size=32), n_mme=2, n_pope=3, n_scienceqa=8,
                                     n_vqa=4)
    return root


def _config(bench_dir, **overrides):
    c = eval_config.get_config("tiny")
    c.benchmark_dir = bench_dir
    c.shapes_benchmarks.enabled = False
    for k, v in overrides.items():
        c[k] = v
    return c


def _truth(bench_dir):
    """``(benchmark, key) -> ground-truth answer`` for every shapes question."""
    specs = benchmark_specs(_config(bench_dir))
    truth = {}
    gt = mme.load_ground_truth(os.path.join(bench_dir, "mme", "MME_Benchmark_release_version"))
    for ex in BENCHMARKS["mme"].load(specs["mme"]):
        truth["mme", ex.key] = mme.lookup(gt, ex.question_id, ex.prompt)[1]
    # POPE's label files number their rows 1..n; the question file numbers each category from its offset.
    for split, offset in benchmark_files.POPE_QID_OFFSETS.items():
        for r in read_jsonl(os.path.join(bench_dir, "pope", "coco", f"coco_pope_{split}.json")):
            truth["pope", str(offset + r["question_id"] - 1)] = r["label"]
    for pid, p in read_json(os.path.join(bench_dir, "scienceqa", "problems.json")).items():
        truth["scienceqa", pid] = "ABCDE"[p["answer"]]
    for a in read_json(os.path.join(bench_dir, "vqa", "annotations.json"))["annotations"]:
        truth["vqav2", str(a["question_id"])] = a["multiple_choice_answer"]
    majority = {(d["image_id"], d["question"].lower()): collections.Counter(d["answers"]).most_common(1)[0][0]
                for d in read_json(os.path.join(bench_dir, "vqa", "textvqa_val.json"))["data"]}
    for ex in BENCHMARKS["textvqa"].load(specs["textvqa"]):
        truth["textvqa", ex.key] = majority[ex.question_id, vqa.textvqa_question(ex.prompt)]
    return truth


class Scripted:
    """Answers from a table (or a constant); counts what it was asked; can stop after some batches."""

    def __init__(self, table=None, constant=None, fail_after=None):
        self.table, self.constant, self.fail_after = table, constant, fail_after
        self.asked = []

    def for_benchmark(self, name):
        def answer(batch):
            if self.fail_after is not None and len(self.asked) >= self.fail_after:
                raise KeyboardInterrupt("simulated kill")
            self.asked.extend((name, ex.key) for ex in batch)
            return [self.constant if self.table is None else self.table[name, ex.key] for ex in batch]

        return answer


def _run(config, workdir, scripted):
    """run_benchmarks with one scripted answerer per benchmark (the runner takes one answerer)."""
    specs = benchmark_specs(config)
    metrics = {}
    for name, spec in specs.items():
        metrics.update(harness.run_benchmarks(STUB, config, workdir, answerer=scripted.for_benchmark(name),
                                             specs={name: spec}))
    return metrics


def test_ground_truth_answers_score_perfectly(bench_dir, tmp_path):
    m = _run(_config(bench_dir), str(tmp_path), Scripted(table=_truth(bench_dir)))
    assert m["mme"]["perception"] == pytest.approx(800.0)  # 4 perception subtasks x 200
    assert m["mme"]["cognition"] == pytest.approx(400.0)
    for split in ("random", "popular", "adversarial"):
        assert m["pope"][f"{split}/accuracy"] == pytest.approx(100.0)
        assert m["pope"][f"{split}/yes_ratio"] == pytest.approx(50.0)
    assert m["scienceqa"]["accuracy"] == pytest.approx(100.0)
    assert m["scienceqa"]["img_accuracy"] == pytest.approx(100.0)
    assert m["vqav2"]["accuracy"] == pytest.approx(100.0)
    assert m["textvqa"]["accuracy"] == pytest.approx(100.0)


def test_always_yes_scores_and_file_contract(bench_dir, tmp_path):
    workdir = str(tmp_path)
    config = _config(bench_dir)
    specs = benchmark_specs(config)
    m = harness.run_benchmarks(STUB, config, workdir, answerer=Scripted(constant="Yes").for_benchmark("all"),
                              specs=specs)
    # MME: one Yes and one No question per image -> acc 50, acc+ 0, 50 points per subtask.
    assert m["mme"]["perception"] == pytest.approx(200.0)
    assert m["mme"]["cognition"] == pytest.approx(100.0)
    assert m["mme"]["count/acc_plus"] == 0.0
    # POPE: half the labels are yes -> precision 50, recall 100, F1 2/3.
    assert m["pope"]["random/accuracy"] == pytest.approx(50.0)
    assert m["pope"]["f1"] == pytest.approx(200 / 3)
    assert m["pope"]["adversarial/yes_ratio"] == pytest.approx(100.0)
    assert m["scienceqa"]["accuracy"] == 0.0  # "Yes" is not an option letter
    on_disk = json.loads(open(os.path.join(workdir, "metrics.json")).read())
    assert on_disk == m
    assert all(isinstance(v, float) for bench in on_disk.values() for v in bench.values())
    for name in specs:
        rows = read_jsonl(answers_path(os.path.join(workdir, "answers"), name))
        # LLaVA's model_vqa_loader answer lines, nothing else.
        assert all(list(r) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"] for r in rows)
    table = open(os.path.join(workdir, "results.md")).read()
    assert "| pope | f1 | 66.67 |" in table
    assert os.path.isfile(os.path.join(workdir, "results", "mme", "mme_results", "existence.txt"))
    assert os.path.isfile(os.path.join(workdir, "results", "vqav2", "vqav2_submission.json"))


def test_interrupted_evaluation_resumes(bench_dir, tmp_path):
    config = _config(bench_dir, batch_size=4)
    truth = _truth(bench_dir)
    spec = {"pope": benchmark_specs(config)["pope"]}
    workdir = str(tmp_path / "run")
    first = Scripted(table=truth, fail_after=8)
    with pytest.raises(KeyboardInterrupt):
        harness.run_benchmarks(STUB, config, workdir, answerer=first.for_benchmark("pope"), specs=spec)
    path = answers_path(os.path.join(workdir, "answers"), "pope")
    assert len(read_answers(path, by_prompt=False)) == 8
    with open(path, "a") as f:
        f.write('{"question_id": 99, "prompt": "Is th')  # a line torn by the kill
    second = Scripted(table=truth)
    resumed = harness.run_benchmarks(STUB, config, workdir, answerer=second.for_benchmark("pope"), specs=spec)
    total = len(BENCHMARKS["pope"].load(spec["pope"]))
    assert len(second.asked) == total - 8
    assert not set(first.asked) & set(second.asked)
    ids = [r["question_id"] for r in read_jsonl(path)]
    # Every question once, in question-file order (eval_pope.py pairs labels with answers by position).
    assert ids == [ex.question_id for ex in BENCHMARKS["pope"].load(spec["pope"])]
    fresh = harness.run_benchmarks(STUB, config, str(tmp_path / "fresh"), answerer=Scripted(table=truth)
                                  .for_benchmark("pope"), specs=spec)
    assert resumed == fresh
    # A finished evaluation asks nothing more.
    third = Scripted(table=truth)
    harness.run_benchmarks(STUB, config, workdir, answerer=third.for_benchmark("pope"), specs=spec)
    assert third.asked == []


def test_subsample_keeps_mme_pairs(bench_dir):
    specs = benchmark_specs(_config(bench_dir))
    b = BENCHMARKS["mme"]
    examples = b.load(specs["mme"])
    picked = subsample(examples, 6, b.group)
    counts = collections.Counter(ex.question_id for ex in picked)
    assert len(picked) == 6 and set(counts.values()) == {2}
    assert subsample(examples, 0, b.group) == examples


def test_configuration_errors(bench_dir, tmp_path):
    c = _config(bench_dir)
    c.benchmarks.pope.kind = "popee"
    with pytest.raises(ValueError, match="use one of"):
        benchmark_specs(c)
    c = _config(None)
    with pytest.raises(ValueError, match="set --config.benchmark_dir"):
        benchmark_specs(c)
    c = _config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pope question file"):
        BENCHMARKS["pope"].load(benchmark_specs(c)["pope"])
    bad = tmp_path / "answers.jsonl"
    bad.write_text('{"question_id": 1, "text": "a"}\nnot json\n{"question_id": 2, "text": "b"}\n')
    with pytest.raises(ValueError, match="is not JSON"):
        read_answers(str(bad), by_prompt=False)


@pytest.fixture(scope="module")
def tiny_model():
    import jax

    from qtl_jax.eval import model as model_lib

    return model_lib.load_random(eval_config.get_config("tiny"), jax.random.key(0))


def test_tiny_model_generates_answers(bench_dir, tmp_path, tiny_model):
    """Real generation (random tiny model, prompt through the quantizers): the files, not the scores."""
    config = _config(bench_dir, max_examples=4)
    specs = {"pope": benchmark_specs(config)["pope"]}
    metrics = harness.run_benchmarks(tiny_model, config, str(tmp_path), specs=specs)
    assert json.loads(open(os.path.join(tmp_path, "metrics.json")).read()) == metrics
    rows = read_answers(answers_path(str(tmp_path / "answers"), "pope"), by_prompt=False)
    assert len(rows) == 4 and all(isinstance(r["text"], str) for r in rows.values())
    assert 0.0 <= metrics["pope"]["accuracy"] <= 100.0
    assert "random init" in open(os.path.join(tmp_path, "results.md")).read()


def test_tiny_model_answers_a_llava_layout_folder(tmp_path, tiny_model, capsys):
    """Real generation on LLaVA's playground/data/eval layout with the default file names: the benchmarks
    present are answered (images from their default folders), the others skipped with one line each."""
    import ml_collections

    import llava_eval_files as files  # tests/ helper

    eval_dir = str(tmp_path / "eval")
    files.write_pope(eval_dir)
    files.write_scienceqa(eval_dir)
    config = _config(eval_dir, max_new_tokens=2, batch_size=16)
    config.benchmarks = ml_collections.ConfigDict({k: dict(v) for k, v in eval_config.LLAVA_BENCHMARKS.items()})
    specs = runner.present_specs(benchmark_specs(config), with_images=True)
    assert set(specs) == {"pope", "scienceqa"}
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipping ")]
    assert len(skipped) == 6 and f"skipping mme: {eval_dir}/MME/llava_mme.jsonl does not exist" in skipped
    metrics = harness.run_benchmarks(tiny_model, config, str(tmp_path / "run"), specs=specs)
    assert metrics["pope"]["adversarial/count"] == 3 and metrics["scienceqa"]["count"] == 5
    pope_lines = read_jsonl(answers_path(str(tmp_path / "run" / "answers"), "pope"))
    questions = read_jsonl(os.path.join(eval_dir, "pope", "llava_pope_test.jsonl"))
    assert [(r["question_id"], r["prompt"]) for r in pope_lines] == [(q["question_id"], q["text"]) for q in questions]
    sqa_prompts = [r["prompt"] for r in read_jsonl(answers_path(str(tmp_path / "run" / "answers"), "scienceqa"))]
    assert [p.startswith("<image>\n") for p in sqa_prompts] == [True, True, False, True, True]


def test_sweep_contract(bench_dir, tmp_path, tiny_model):
    """sweep.json / sweep.png / the uplink bytes from the real codec, with scripted answers."""
    from qtl_jax.eval import sweep

    config = _config(bench_dir, max_examples=6)
    config.sweep.levels = (2,)
    config.sweep.bytes_samples = 2
    specs = benchmark_specs(config)
    specs = {k: specs[k] for k in ("pope", "scienceqa")}
    answers = iter(["Yes", "No"] * 100)
    entries = sweep.run_sweep(tiny_model, config, str(tmp_path), specs,
                              answerer_for=lambda at: lambda batch: [next(answers) for _ in batch])
    on_disk = json.loads(open(os.path.join(tmp_path, "sweep.json")).read())
    assert on_disk == entries
    assert [(e["levels"], e["bits"], e["baseline"]) for e in on_disk] == [(2, 1.0, False), (65536, 16.0, True)]
    for e in on_disk:
        assert set(e["scores"]) == {"pope", "scienceqa"} and e["pope"] == e["scores"]["pope"]
        assert set(e["uplink_bytes_per_sample"]) == {"fp16", "packed", "ans", "downlink_bytes_fp32",
                                                     "roundtrip_bytes_per_sample", "roundtrip_bytes_per_sample_paper"}
    low, base = (e["uplink_bytes_per_sample"] for e in on_disk)
    # Fixed-width packing at L=2 costs 1 bit per value against fp16's 16 (plus headers); fp16 does not depend on L.
    assert low["packed"] < low["fp16"] / 8
    assert math.isclose(low["fp16"], base["fp16"])
    # The downlink is one float32 per value that went up, the same at every L: twice the fp16 payload less
    # its message headers, one [n, D] message per modality present (text, and the image if any) per sample,
    # so the mean over the 2 measured samples leaves 1, 1.5 or 2 headers per sample.
    header = len(codec.encode_fp16(np.zeros((1, 1), np.float32))) - 2
    down = low["downlink_bytes_fp32"]
    assert down == base["downlink_bytes_fp32"]
    assert (2 * low["fp16"] - down) / (2 * header) in (1.0, 1.5, 2.0)
    for u in (low, base):
        assert u["roundtrip_bytes_per_sample"] == u["ans"] + u["downlink_bytes_fp32"]
        assert u["roundtrip_bytes_per_sample_paper"] == u["fp16"] + u["downlink_bytes_fp32"]
    assert "| round trip B/sample (ans + fp32 down) |" in open(os.path.join(tmp_path, "sweep.md")).read()
    assert os.path.getsize(os.path.join(tmp_path, "sweep.png")) > 10_000
    assert "| 65536 (baseline) | 16 |" in open(os.path.join(tmp_path, "sweep.md")).read()
    selection = json.loads(open(os.path.join(tmp_path, "sweep_selection.json")).read())
    assert set(selection) == {"image", "text"} and all(2 <= s["levels"] <= 32 for s in selection.values())
    assert os.path.isfile(os.path.join(tmp_path, "sweep", "L2", "metrics.json"))


def test_with_levels(tiny_model):
    import dataclasses

    at8 = tiny_model.with_levels(8)
    assert at8.levels() == 8 and at8.qconfig.text_quantizer.levels == 8 and tiny_model.levels() == 4
    assert at8.params is tiny_model.params  # the same weights
    with pytest.raises(ValueError, match="no quantizer projections"):
        dataclasses.replace(tiny_model, qconfig=None).with_levels(8)


@pytest.mark.slow
def test_tiny_config_full_run(tmp_path):
    """``configs/eval.py:tiny`` as the CLI runs it: shapes files, five benchmarks, sweep L=2,4 + baseline."""
    config = eval_config.get_config("tiny")
    runner.evaluate(config, str(tmp_path))
    metrics = json.loads(open(os.path.join(tmp_path, "metrics.json")).read())
    assert set(metrics) == {"mme", "pope", "scienceqa", "vqav2", "textvqa"}
    sweep = json.loads(open(os.path.join(tmp_path, "sweep.json")).read())
    assert [e["levels"] for e in sweep] == [2, 4, 65536]


def test_loads_a_train_workdir_checkpoint(tmp_path, tiny_model):
    """An Orbax checkpoint written by the training Checkpointer comes back with the run's model and L."""
    import jax
    import numpy as np

    from configs import stage2
    from qtl_jax.eval import model as model_lib
    from qtl_jax.split.step import PartitionState, TrainState
    from qtl_jax.train.checkpoint import Checkpointer
    from qtl_jax.train.loop import config_to_json

    train_cfg = stage2.get_config("tiny")
    # The same architecture as the eval tiny model, trained (here: saved) at L=8.
    train_cfg.model = eval_config.get_config("tiny").model
    train_cfg.quantizer.levels = 8
    params = jax.tree.map(lambda x: x + 0.5, tiny_model.params)  # distinct from any fresh init
    state = TrainState(step=jax.numpy.int32(7), client=PartitionState(params["client"], {}, {}),
                       server=PartitionState(params["server"], {}, {}), rng=jax.random.PRNGKey(1))
    workdir = str(tmp_path / "run")
    ckpt = Checkpointer(workdir)
    ckpt.save(state, {}, config_to_json(train_cfg))
    ckpt.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_to_json(train_cfg), f)

    config = eval_config.get_config("tiny")
    config.checkpoint = workdir
    loaded = model_lib.load_model(config)
    assert loaded.levels() == 8 and "(step 7)" in loaded.source
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), loaded.params, params)
    assert all(jax.tree.leaves(same))
    config.checkpoint = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        model_lib.load_model(config)
    os.makedirs(config.checkpoint)
    with pytest.raises(FileNotFoundError, match="neither a train.py workdir"):
        model_lib.load_model(config)


def test_requantized_first_token_matches_kv_cache_generation(bench_dir):
    """Both answerers compute the first token from the same quantized prompt; with frozen (ema) scaling
    statistics padding cannot change the codes, so the two independent implementations must agree."""
    import jax

    from qtl_jax.eval import model as model_lib

    config = eval_config.get_config("tiny")
    config.quantizer.scaling = "ema"
    config.max_new_tokens = 1
    loaded = model_lib.load_random(config, jax.random.key(3))
    examples = BENCHMARKS["scienceqa"].load(benchmark_specs(_config(bench_dir))["scienceqa"])[:6]
    assert any(ex.image is None for ex in examples) and any(ex.image for ex in examples)
    config.generation = "kv_cache"
    reference = answerer.make_answerer(loaded, config)(examples)
    assert len(set(reference)) > 1  # not one constant token, so agreement means something
    config.generation = "requantized"
    assert answerer.make_answerer(loaded, config)(examples) == reference
    config.generation = "beam"
    with pytest.raises(ValueError, match="use 'kv_cache'"):
        answerer.make_answerer(loaded, config)


def test_loads_a_hugging_face_directory_without_quantizers(bench_dir, tmp_path):
    """A llava-hf checkpoint (no quantizer tensors) is evaluated as a plain TinyLLaVA and cannot be swept."""
    import torch
    import transformers as T

    from qtl_jax.data.shapes.tokenizer import build_shapes_tokenizer
    from qtl_jax.eval import model as model_lib

    torch.manual_seed(0)
    vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=32, patch_size=8)
    text = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=320)
    hf = T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=319,
                                                       vision_feature_layer=-2,
                                                       vision_feature_select_strategy="full")).eval()
    path = str(tmp_path / "llava_hf")
    hf.save_pretrained(path)
    build_shapes_tokenizer().save_pretrained(path)
    config = eval_config.get_config("tiny")
    config.checkpoint = path
    config.max_new_tokens = 2
    config.generation = "kv_cache"
    loaded = model_lib.load_model(config)
    assert loaded.qconfig is None and loaded.levels() is None
    examples = [ex for ex in BENCHMARKS["pope"].load(benchmark_specs(_config(bench_dir))["pope"])][:2]
    answers = answerer.make_answerer(loaded, config)(examples)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    with pytest.raises(ValueError, match="no quantizer projections"):
        loaded.with_levels(4)
