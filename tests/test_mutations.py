"""The important tests can fail: each runs here against a deliberately broken implementation and must go red.

A test that passes whatever the code does is a defect. These break one thing at a time (a
sign-flipped loss, tuning on the wrong split, a wrong lambda, labels shifted by one) and
check that the test written to catch it raises AssertionError.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlpmem.evaluate as ev
import test_evaluate
import test_pipeline


def _negate_loss(monkeypatch):
    import mlpmem.train.loop as train  # the loop calls the loss

    real = train.sparse_kd_loss

    def negated(*args):
        loss, parts = real(*args)
        return -loss, parts

    monkeypatch.setattr(train, "sparse_kd_loss", negated)


def _valid_is_really_test(monkeypatch, corpus_dir_of):
    """Where valid is asked for, score the test split instead (lambda and T tuned on test)."""
    real = ev.score_online

    def swapped(model, tokens, *args, **kw):
        if "valid" in kw.get("desc", ""):
            from mlpmem.corpus import Corpus

            tokens = Corpus(corpus_dir_of()).tokens("test")
        return real(model, tokens, *args, **kw)

    monkeypatch.setattr(ev, "score_online", swapped)


def test_pipeline_test_catches_a_memory_that_learned_nothing(tmp_path, tiny_llama, tiny_corpus_file, monkeypatch):
    _negate_loss(monkeypatch)
    with pytest.raises(AssertionError):
        test_pipeline.test_recipe_runs_end_to_end_and_skips_finished_stages(tmp_path, tiny_llama, tiny_corpus_file, monkeypatch)


def test_pipeline_test_catches_tuning_on_test(tmp_path, tiny_llama, tiny_corpus_file, monkeypatch):
    _valid_is_really_test(monkeypatch, lambda: tmp_path / "run" / "corpus")
    with pytest.raises(AssertionError):
        test_pipeline.test_recipe_runs_end_to_end_and_skips_finished_stages(tmp_path, tiny_llama, tiny_corpus_file, monkeypatch)


def test_knnlm_test_catches_tuning_on_the_scored_split(run, monkeypatch):
    real = ev.score_online

    def valid_is_test(model, tokens, *args, **kw):
        if kw.get("desc") == "scoring valid":
            from mlpmem.corpus import Corpus

            tokens = Corpus(run["corpus"]).tokens("test")
        return real(model, tokens, *args, **kw)

    monkeypatch.setattr(ev, "score_online", valid_is_test)
    with pytest.raises(AssertionError):
        test_evaluate.test_run_knnlm_tunes_on_valid_only(run, monkeypatch)


def test_summarize_test_catches_a_wrong_lambda(monkeypatch):
    real = ev.interpolate_logprobs
    monkeypatch.setattr(ev, "interpolate_logprobs", lambda lp, other, lam: real(lp, other, min(1.0, lam * 1.01)))
    with pytest.raises(AssertionError):
        test_evaluate.test_summarize_against_naive_mixture()


def test_scoring_test_catches_labels_shifted_by_one(run, monkeypatch):
    real = ev.iter_batches

    def shifted(*args, **kw):
        for b in real(*args, **kw):
            b.labels = np.roll(b.labels, 1)
            yield b

    monkeypatch.setattr(ev, "iter_batches", shifted)
    with pytest.raises(AssertionError):
        test_evaluate.test_score_online_against_naive_references(run, 1)


# the module-scoped corpus + datastore + index of test_evaluate, shared here
run = test_evaluate.run
