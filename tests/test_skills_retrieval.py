"""Retrieval (embedding, bm25, random) and teacher construction (docs/spec.md section 3)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REFERENCE_BANKS, require_shared
from sgsd.cli import main
from sgsd.errors import ConfigError
from sgsd.prompts import render_guidance
from sgsd.skills.bank import CommonMistake, GeneralSkill, SkillBank, load_bank
from sgsd.skills.retrieval import Retrieval, Scored, make_retriever
from sgsd.skills.teachers import build_teachers, pair_weights

PROBLEM = "Find the number of ordered pairs (x, y) of positive integers with x + y = 20 and gcd(x, y) = 1."


def _bank(skills, mistakes):
    return SkillBank(tuple(GeneralSkill(i, t, p, w) for i, t, p, w in skills),
                     tuple(CommonMistake(i, d, y, h) for i, d, y, h in mistakes))


@pytest.fixture(scope="module")
def bank_1b():
    return load_bank(require_shared(REFERENCE_BANKS) / "qwen3_1b_skill_bank.json")


@pytest.fixture(scope="module")
def embed_cache(tmp_path_factory):
    # Embedding the 126 items of the 1.7B bank takes 1-15 s on 2 shared cores: done once per module.
    return tmp_path_factory.mktemp("embed_cache")


@pytest.fixture(scope="module")
def embedding_retriever(bank_1b, embed_cache):
    return make_retriever("embedding", bank_1b, cache_dir=embed_cache)


def _small(bank):
    return SkillBank(bank.general_skills[:6], bank.common_mistakes[:6])


# ---- teachers: hand-computed values -------------------------------------------------------------

def _retrieval(skill_scores, mistake_scores):
    skills = [Scored(GeneralSkill(f"gen_{i}", f"T{i}", "p", "w"), s) for i, s in enumerate(skill_scores)]
    mistakes = [Scored(CommonMistake(f"err_{i}", f"D{i}", "y", "h"), s) for i, s in enumerate(mistake_scores)]
    return Retrieval("q", skills, mistakes)


def test_teachers_pair_by_rank_with_softmax_of_mean_scores():
    teachers = build_teachers(_retrieval([0.9, 0.5, 0.1], [0.1, 0.3]))
    assert [(t.skill.skill_id, t.mistake.mistake_id) for t in teachers] == [("gen_0", "err_0"), ("gen_1", "err_1")]
    assert [t.score for t in teachers] == pytest.approx([0.5, 0.4], abs=1e-15)
    z = math.exp(0.5) + math.exp(0.4)
    # float64 softmax: agreement to a few ulps.
    assert [t.weight for t in teachers] == pytest.approx([math.exp(0.5) / z, math.exp(0.4) / z], rel=1e-12)
    assert teachers[1].guidance == render_guidance([teachers[1].skill], [teachers[1].mistake])


def test_teacher_count_is_min_of_lists_and_k_and_uniform_without_scores():
    assert len(build_teachers(_retrieval([1, 2, 3], [1, 2, 3]), k=2)) == 2
    teachers = build_teachers(_retrieval([None] * 4, [None] * 3))
    assert [t.weight for t in teachers] == [1 / 3] * 3 and all(t.score is None for t in teachers)
    assert build_teachers(_retrieval([0.1], [])) == []


def test_softmax_is_stable_for_large_scores():
    weights = pair_weights([1000.0, 999.0])
    assert weights == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))], rel=1e-12)


# ---- random ---------------------------------------------------------------------------------------

def test_random_puts_dynamic_items_first_and_samples_without_replacement():
    bank = _bank([(f"gen_{i:03d}", "t", "p", "w") for i in range(20)] + [("dyn_001", "t", "p", "w"), ("dyn_002", "t", "p", "w")],
                 [(f"err_{i:03d}", "d", "y", "h") for i in range(20)])
    retriever = make_retriever("random", bank, seed=3)
    result = retriever.retrieve(PROBLEM, 8)
    ids = [s.item.skill_id for s in result.skills]
    assert ids[:2] == ["dyn_001", "dyn_002"] and len(set(ids)) == 8
    assert all(s.score is None for s in result.skills + result.mistakes)
    assert retriever.retrieve(PROBLEM, 8) == result
    # Different problems get different samples (20 choose 6 orders: a collision is ~impossible).
    assert make_retriever("random", bank, seed=3).retrieve(PROBLEM + " ", 8).skills != result.skills
    assert make_retriever("random", bank, seed=4).retrieve(PROBLEM, 8).skills != result.skills
    assert len(retriever.retrieve(PROBLEM, 100).skills) == 22


def test_random_is_identical_across_processes_with_different_hash_seeds(bank_1b):
    code = ("from sgsd.skills.bank import load_bank; from sgsd.skills.retrieval import make_retriever; "
            f"b = load_bank({str(REFERENCE_BANKS / 'qwen3_1b_skill_bank.json')!r}); "
            f"r = make_retriever('random', b).retrieve({PROBLEM!r}, 8); "
            "print([s.item.skill_id for s in r.skills] + [m.item.mistake_id for m in r.mistakes])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    here = make_retriever("random", bank_1b).retrieve(PROBLEM, 8)
    assert outs == {str([s.item.skill_id for s in here.skills] + [m.item.mistake_id for m in here.mistakes]) + "\n"}


# ---- bm25 -----------------------------------------------------------------------------------------

def test_bm25_ranks_lexical_matches_first_and_breaks_ties_by_id():
    bank = _bank([("gen_003", "modular arithmetic", "reduce mod p", "remainders"),
                  ("gen_002", "geometry", "draw a figure", "triangles"),
                  ("gen_001", "geometry", "draw a figure", "triangles")],
                 [("err_002", "sign error", "rushing", "check signs"), ("err_001", "sign error", "rushing", "check signs")])
    result = make_retriever("bm25", bank).retrieve("Compute the remainder of 7^100 mod 13 using modular arithmetic", 3)
    assert [s.item.skill_id for s in result.skills] == ["gen_003", "gen_001", "gen_002"]
    assert result.skills[0].score > 0 and result.skills[1].score == result.skills[2].score == 0.0
    # The two mistakes are identical, hence tied: the smaller id comes first although it is listed second.
    assert [m.item.mistake_id for m in result.mistakes] == ["err_001", "err_002"]


# ---- embedding ------------------------------------------------------------------------------------

def test_embedding_scores_are_cosines_of_normalised_vectors(embedding_retriever, bank_1b):
    bank = _small(bank_1b)
    result = embedding_retriever.rebind(bank).retrieve(PROBLEM, 4)
    model = embedding_retriever.encoder.model
    texts = [m.text for m in bank.common_mistakes]
    items = model.encode(texts, convert_to_numpy=True)  # unnormalised: normalised by hand below
    query = model.encode([PROBLEM], convert_to_numpy=True)[0]
    cosines = items @ query / (np.linalg.norm(items, axis=1) * np.linalg.norm(query))
    brute = sorted(zip(-cosines, [m.mistake_id for m in bank.common_mistakes]))[:4]
    assert [m.item.mistake_id for m in result.mistakes] == [i for _, i in brute]
    # float32 embeddings of dimension 384: the two ways of computing a cosine agree to ~1e-6.
    assert [m.score for m in result.mistakes] == pytest.approx([-c for c, _ in brute], abs=1e-5)
    m0 = bank.common_mistakes[0]
    assert texts[0] == ". ".join([m0.description, m0.why_it_happens, m0.how_to_avoid])


def test_embedding_batch_equals_single_and_item_embeddings_are_cached(embedding_retriever):
    problems = [PROBLEM, "Let ABC be a triangle with AB = 5, BC = 7. Find the circumradius.", "Solve x^2 - 5x + 6 = 0."]
    embedding_retriever.item_embeddings()
    encodes_before = embedding_retriever.item_encodes
    many = embedding_retriever.retrieve_many(problems, 8)
    for problem, batched in zip(problems, many):
        single = embedding_retriever.retrieve(problem, 8)
        assert [s.item for s in single.skills] == [s.item for s in batched.skills]
        # Padding in a batch changes float32 summation order only: 1e-5 is ample for cosines.
        assert [s.score for s in single.mistakes] == pytest.approx([s.score for s in batched.mistakes], abs=1e-5)
    assert embedding_retriever.item_encodes == encodes_before <= 1  # items embedded at most once


def test_embedding_ties_are_broken_by_id(embedding_retriever):
    bank = _bank([("gen_002", "Same", "text", "here"), ("gen_001", "Same", "text", "here"), ("gen_000", "Other", "x", "y")],
                 [("err_001", "a", "b", "c")])
    result = embedding_retriever.rebind(bank).retrieve("text here", 3)
    same = [s for s in result.skills if s.item.title == "Same"]
    assert [s.item.skill_id for s in same] == ["gen_001", "gen_002"] and same[0].score == same[1].score


def test_embedding_disk_cache_is_keyed_by_bank_version(embedding_retriever, bank_1b, tmp_path):
    bank = _small(bank_1b)
    first = make_retriever("embedding", bank, model=embedding_retriever.encoder.model, cache_dir=tmp_path)
    reference = first.retrieve(PROBLEM, 8)
    assert first.item_encodes == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    second = make_retriever("embedding", bank, model=embedding_retriever.encoder.model, cache_dir=tmp_path)
    assert second.retrieve(PROBLEM, 8) == reference and second.item_encodes == 0  # read from disk
    smaller = SkillBank(bank.general_skills[:5], bank.common_mistakes[:5])
    rebound = second.rebind(smaller)
    assert len(rebound.retrieve(PROBLEM, 8).skills) == 5 and rebound.item_encodes == 1
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_rebinding_after_an_update_embeds_only_the_new_items(embedding_retriever, bank_1b, monkeypatch):
    base = embedding_retriever.rebind(_small(bank_1b))
    before = base.retrieve(PROBLEM, 8)
    encoded = []
    original = base.encoder.encode
    monkeypatch.setattr(base.encoder, "encode", lambda texts, **kw: encoded.append(list(texts)) or original(texts, **kw))
    grown = base.bank.with_dynamic([GeneralSkill("dyn_001", "Parity", "Check parity first", "integers")], [])
    after = base.rebind(grown).retrieve(PROBLEM, 8)
    assert encoded == [[grown.general_skills[-1].text], [PROBLEM]]  # one new item, then the problem
    assert {s.item.skill_id for s in after.skills} == {s.item.skill_id for s in before.skills} | {"dyn_001"}


@pytest.mark.parametrize("mode", ["embedding", "bm25", "random"])
def test_cli_retrieve_returns_8_pairs_from_the_1_7b_bank(mode, embedding_retriever, embed_cache, capsys):
    path = require_shared(REFERENCE_BANKS) / "qwen3_1b_skill_bank.json"
    embedding_retriever.item_embeddings()  # fills the on-disk cache the command reads
    argv = ["skills", "retrieve", "--bank", str(path), "--problem", PROBLEM, "--mode", mode, "--json"]
    assert main(argv + (["--cache-dir", str(embed_cache)] if mode == "embedding" else [])) == 0
    teachers = json.loads(capsys.readouterr().out)["teachers"]
    assert len(teachers) == 8 and len({t["skill_id"] for t in teachers}) == 8
    assert set(teachers[0]) == {"skill_id", "mistake_id", "score", "weight", "guidance"}
    assert sum(t["weight"] for t in teachers) == pytest.approx(1.0, abs=1e-12)
    assert (teachers[0]["score"] is None) == (mode == "random")
    assert teachers[0]["guidance"].startswith("Below are retrieved skills") and "Don't:" in teachers[0]["guidance"]


def test_unknown_mode_and_bad_top_k_are_user_errors(bank_1b):
    with pytest.raises(ConfigError, match="unknown retrieval mode 'dense'"):
        make_retriever("dense", bank_1b)
    with pytest.raises(ConfigError, match="top_k"):
        make_retriever("bm25", bank_1b).retrieve(PROBLEM, 0)
