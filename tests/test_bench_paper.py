"""The paper-size benchmark's PyTorch reference is the same model as ours (tiny shapes, fp32), and its sizes.

* ``bench.torch_openelm.OpenELM`` (the eager reference decoder, transformers has no OpenELM) saved as an Apple
  OpenELM checkpoint (its ``state_dict`` with Apple's names + Apple's ``config.json`` keys) and read by
  :func:`qtl_jax.weights.llm_maps.load_causal_lm` gives our JAX decoder the same logits, with per-layer head /
  KV head / FFN widths, GQA, qk-norm, RoPE, a padding mask and the tied head in play.
* The paper benchmark's models: ours from ``configs/stage{1,2}.py:paper_random`` (``jax.eval_shape``, nothing
  allocated) and the torch reference (on the ``meta`` device) have the published parameter counts, component by
  component, and each stage's trainable split is the paper's.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
import torch

from bench import paper
from bench.torch_openelm import OpenELM
from qtl_jax.models.decoder import Decoder
from qtl_jax.weights import safetensors_io
from qtl_jax.weights.llm_maps import load_causal_lm
from tolerances import layers_tolerance

VOCAB, SEQ = 96, 18
HEADS, KV_HEADS, WIDTHS = [4, 6, 3], [2, 3, 1], [32, 64, 96]
# Apple's config.json keys, explicit per-layer lists (ffn_multipliers x model_dim / divisor 16 give WIDTHS).
APPLE_CONFIG = dict(model_type="openelm", num_transformer_layers=3, model_dim=64, head_dim=16, vocab_size=VOCAB,
                    num_query_heads=HEADS, num_kv_heads=KV_HEADS, ffn_multipliers=[0.5, 1.0, 1.5], ffn_dim_divisor=16,
                    ffn_with_glu=True, normalize_qk_projections=True, share_input_output_layers=True,
                    rms_norm_eps=1e-6, rope_freq_constant=3.0)


def test_torch_openelm_reference_matches_our_decoder(tmp_path):
    torch.manual_seed(0)
    ref = OpenELM(VOCAB, 64, 16, HEADS, KV_HEADS, WIDTHS, eps=1e-6, rope_theta=3.0)
    # Unit-scale weights (the default 0.02-ish inits make every logit ~0 and the comparison vacuous).
    rng = np.random.default_rng(0)
    weights = {}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 2:
                fan_in = 1 if "embeddings" in name else p.shape[1]
                value = rng.standard_normal(tuple(p.shape)) / math.sqrt(fan_in)
            else:
                value = 1.0 + 0.2 * rng.standard_normal(tuple(p.shape))
            p.copy_(torch.from_numpy(value.astype(np.float32)))
            weights[name] = value.astype(np.float32)
    assert "transformer.layers.1.attn.qkv_proj.weight" in weights and not any("lm_head" in n for n in weights)
    safetensors_io.write_file(str(tmp_path / "model.safetensors"), weights)
    (tmp_path / "config.json").write_text(json.dumps(APPLE_CONFIG))
    model, params = load_causal_lm(str(tmp_path))
    assert model.config.intermediate_size == tuple(WIDTHS) and model.config.num_kv_heads == tuple(KV_HEADS)

    ids = rng.integers(0, VOCAB, (2, SEQ))
    mask = np.ones_like(ids)
    mask[1, -5:] = 0  # right padding: the reference's attention mask must match ours
    positions = np.tile(np.arange(SEQ), (len(ids), 1))
    with torch.no_grad():
        t_ids = torch.from_numpy(ids)
        theirs = ref.logits(ref(ref.embed(t_ids), torch.from_numpy(mask), torch.from_numpy(positions))).numpy()

    def ours(p, i, m):
        return model.apply({"params": p}, model.apply({"params": p}, i, method=Decoder.embed), m)

    out = np.asarray(jax.jit(ours)(params, ids, mask))
    real = mask.astype(bool)
    assert theirs[real].std() > 0.5
    tol = layers_tolerance(theirs[real], width=max(64, max(WIDTHS), SEQ), layers=3)
    worst = float(np.abs(out[real] - theirs[real]).max())
    assert worst <= tol, f"max |ours - torch OpenELM| = {worst:.2e} > {tol:.2e}"


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("stage", [1, 2])
def test_paper_models_have_the_published_sizes_and_each_stages_split(stage):
    """Ours via jax.eval_shape, the torch reference on the meta device: nothing is allocated."""
    from qtl_jax.models.tinyllava import abstract_params

    config = paper.stage_config(stage, 4)
    assert config.global_batch_size == 4 and config.data.kind == "shapes" and config.model.source == "random"
    tcfg = paper.tinyllava_of(config)
    ours = abstract_params(tcfg)
    assert _count(ours["llm"]) == 271_527_168  # OpenELM-270M, tied head
    assert _count(ours["vision_tower"]) == 412_987_248  # SigLIP-so400m-patch14-384 without its pooling head
    assert tcfg.num_image_tokens == 728 and paper.vision_layers_used(tcfg) == 26
    with torch.device("meta"):
        ref = paper.torch_model(tcfg, stage)
    count = lambda m, trainable=None: sum(  # noqa: E731
        p.numel() for p in m.parameters() if trainable is None or p.requires_grad == trainable)
    assert count(ref.llm) == _count(ours["llm"])
    assert count(ref.vision) - count(ref.vision.head) == _count(ours["vision_tower"])
    assert count(ref.connector) == _count(ours["connector"])
    d = tcfg.llm.hidden_size
    assert count(ref.image_q) == count(ref.text_q) == 2 * (d * d + d)
    # The paper's split: stage 1 trains connector + quantizers, stage 2 the LLM too; the tower never.
    trained = count(ref.connector) + count(ref.image_q) + count(ref.text_q) + (count(ref.llm) if stage == 2 else 0)
    assert count(ref, trainable=True) == trained
    assert count(ref.vision, trainable=True) == 0


def test_paper_flops_count_each_stages_backward():
    """Stage 2 differs from stage 1 only by the LLM's weight gradients: one more forward's worth (2 N per token)."""
    from qtl_jax.models.tinyllava import abstract_params

    tcfg = paper.tinyllava_of(paper.stage_config(1, 4))
    b, t, merged = 4, 64, 64 + 727
    batch = {"input_ids": np.zeros((b, t)), "source": np.zeros((b, merged))}
    # Multiply-adds per token: every decoder kernel, and the tied head (the embedding table) once.
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params(tcfg)["llm"])[0]
    per_token = sum(math.prod(x.shape) for path, x in leaves if "kernel" in jax.tree_util.keystr(path)
                    or "embedding" in jax.tree_util.keystr(path))
    forward = 2 * b * merged * per_token + 4 * b * merged**2 * tcfg.llm.head_dim * sum(tcfg.llm.num_heads)
    assert paper.flops(tcfg, batch, 2) - paper.flops(tcfg, batch, 1) == pytest.approx(forward, rel=1e-12)


def test_flops_parts_add_up_to_the_step():
    """The per-part FLOPs (``SplitStep.time_programs``'s parts) sum to the step's, at both stages."""
    from bench import paper

    batch = {"input_ids": np.zeros((2, 16), np.int32), "source": np.zeros((2, 30), np.int32)}
    parts = {}
    for stage in (1, 2):
        model = paper.tinyllava_of(paper.stage_config(stage, 2, "float32", preset="tiny"))
        parts[stage] = paper.flops_parts(model, batch, stage)
        assert list(parts[stage]) == list(paper.PARTS) and min(parts[stage].values()) > 0
        assert paper.flops(model, batch, stage) == pytest.approx(sum(parts[stage].values()), rel=1e-12)
    # Only the server's LLM backward differs between the stages (weight gradients in stage 2: 3 passes, not 2).
    assert parts[1]["client_begin"] == parts[2]["client_begin"]
    assert parts[1]["client_finish"] == parts[2]["client_finish"]
    assert parts[2]["exchange"] > parts[1]["exchange"]


@pytest.mark.parametrize("framework", ["ours", "torch"])
def test_paper_xla_flags_reach_our_worker_alone(monkeypatch, framework):
    """``--paper-xla-flags`` (the environment variable it sets) is added to XLA_FLAGS in our worker only,
    after what the user already set, and the result records it; the PyTorch worker's environment is untouched."""
    seen = {}

    class Done:
        returncode, stderr = 0, ""
        stdout = json.dumps({"ours_step_s": 1.0}) + "\n"

    def fake_run(cmd, env, **kw):
        seen.update(env)
        return Done()

    monkeypatch.setattr(paper.subprocess, "run", fake_run)
    # The device is named, so nothing here starts a backend that would parse the made-up flag below.
    monkeypatch.setenv("QTL_BENCH_TORCH_DEVICE", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_user_flag=1")
    monkeypatch.setenv(paper.OURS_XLA_FLAGS_ENV, "--xla_gpu_enable_command_buffer=")
    r = paper.run_worker(framework, 2, "/unused.npz", 1, "float32", 10.0)
    if framework == "ours":
        assert seen["XLA_FLAGS"] == "--xla_user_flag=1 --xla_gpu_enable_command_buffer="
        assert r["ours_xla_flags"] == "--xla_gpu_enable_command_buffer="
    else:
        assert seen["XLA_FLAGS"] == "--xla_user_flag=1" and "ours_xla_flags" not in r
