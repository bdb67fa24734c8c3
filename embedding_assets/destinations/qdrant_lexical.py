"""The Qdrant side of hybrid search: a sparse named vector `lexical` beside the dense one,
holding the chunk text's BM25 term weights. The terms come from qdrant-edge's own BM25 model
(hashed token ids: no vocabulary to download), computed on our side for both engines; the
collection's `idf` modifier lets the engine weight rare terms, so a query scores as BM25.
A query's terms weigh 1 each; hybrid search fuses the dense and the sparse top candidates by
weighted reciprocal rank, on our side (`core.fusion`, the formula pgvector's SQL uses), so both
backends and both engines rank alike."""

import functools

import qdrant_edge as edge

LEXICAL_VECTOR = "lexical"
SparseTerms = tuple[list[int], list[float]]


@functools.cache
def _model(language: str) -> edge.Bm25:
    """`simple`: words as written (no stemming, no stop words), as in Postgres; else the
    language's stemmer and stop words."""
    if language == "simple":
        config = edge.Bm25Config(stemmer=edge.DisabledStemmer(), stopwords=edge.StopwordsSet())
    else:
        try:
            return edge.Bm25(edge.Bm25Config(language=language))
        except ValueError as unknown:
            raise ValueError(
                f"hybrid.language {language!r} is not a language Qdrant's BM25 knows ({unknown});"
                " use simple, english, german, french, ... (or `qdrant: false` for a Postgres"
                " text search configuration of your own)"
            ) from None
    return edge.Bm25(config)


def check_language(language: str) -> None:
    """Raise ValueError, saying what to use, if Qdrant's BM25 does not know `language`."""
    _model(language)


def document_terms(text: str, language: str) -> SparseTerms:
    vector = _model(language).embed_document(text)
    return list(vector.indices), list(vector.values)


def query_terms(text: str, language: str) -> SparseTerms:
    vector = _model(language).embed_query(text)
    return list(vector.indices), list(vector.values)
