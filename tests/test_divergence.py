"""KL at the scored positions, the dense reference cache and its fingerprint."""

from __future__ import annotations

import pytest
import torch

from dop.divergence import (
    DenseReference,
    DivergenceError,
    _teacher_force,
    calibration_batches,
    fingerprint,
    kl_per_sample,
)


def test_kl_matches_definition():
    g = torch.Generator().manual_seed(0)
    dense, pruned = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    rows = torch.tensor([0, 0, 1, 2, 2])
    got = kl_per_sample(torch.log_softmax(dense, -1), pruned, rows, 3)
    p, q = torch.softmax(dense.double(), -1), torch.softmax(pruned.double(), -1)
    per_pos = (p * (p.log() - q.log())).sum(-1)
    want = torch.stack([per_pos[:2].mean(), per_pos[2], per_pos[3:].mean()])
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(kl_per_sample(torch.log_softmax(dense, -1), dense, rows, 3),
                          torch.zeros(3, dtype=torch.float64), atol=1e-7)


def test_empty_calibration_set():
    with pytest.raises(DivergenceError, match="empty"):
        calibration_batches(object(), [])
    with pytest.raises(DivergenceError, match="empty"):
        DenseReference([], "x", 2)


def test_fingerprint_depends_on_what_matters():
    base = fingerprint("m", ["a", "b"], torch.float32)
    assert base == fingerprint("m", ["a", "b"], torch.float32)
    assert base != fingerprint("m", ["a", "c"], torch.float32)
    assert base != fingerprint("m", ["a", "b"], torch.bfloat16)
    assert base != fingerprint("m2", ["a", "b"], torch.float32)
    assert base != fingerprint("m", ["a", "b"], torch.float32, response_tokens=2)


def test_reference_cached_on_disk_and_checked(tmp_path):
    pytest.importorskip("dop.engine")
    from test_sweep_store import tiny_batches, tiny_model

    torch.set_num_threads(1)
    model, _ = tiny_model()
    layers = model.model.language_model.layers
    batches = tiny_batches()
    ref = DenseReference(batches, "fp1", len(layers), tmp_path, "memory").build(model, layers, "cpu")
    assert (tmp_path / "reference.pt").exists() and ref.dense_layer_forwards == 2 * len(layers)
    inputs, mids = ref.hidden(0, "cpu")
    assert len(inputs) == len(mids) == len(layers)
    again = DenseReference(batches, "fp1", len(layers), tmp_path, "none").build(model, layers, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(ref.logp, again.logp))
    with pytest.raises(DivergenceError, match="fingerprint"):
        DenseReference(batches, "fp2", len(layers), tmp_path, "none").build(model, layers, "cpu")
    disk = DenseReference(batches, "fp1", len(layers), tmp_path, "disk").build(model, layers, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(disk.hidden(1, "cpu")[1], ref.hidden(1, "cpu")[1]))


def test_teacher_forced_positions_reproduce_greedy_answer():
    pytest.importorskip("dop.engine")
    from test_sweep_store import tiny_model
    from tiny_models import tokenizer

    torch.set_num_threads(1)
    model, make = tiny_model()
    inputs = dict(make(batch=2, seed=3))
    forced, mask = _teacher_force(model, tokenizer(), inputs, 3)
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    logits = model(**forced).logits
    for b in range(2):
        pos = mask[b].nonzero().flatten()
        assert len(pos) >= 1
        assert logits[b, pos].argmax(-1).tolist() == gen[b, : len(pos)].tolist()
