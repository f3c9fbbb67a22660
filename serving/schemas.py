"""The service's request and response bodies as Pydantic models: what ``/openapi.json`` tells clients.

Responses are declared as each route's ``response_model``, so FastAPI checks
every answer against its model. Request bodies are read by the guarded parser
(`serving.payloads`: the byte, punctuation and nesting caps come before any
parse, which Pydantic would do first), so their models only describe them:
`request_body` puts them in the operation's OpenAPI, and `request_models`
lists them for the schema's components. `tests/test_service.py` checks that
the parser accepts exactly the members these models name.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    """Every failure, whatever its status."""

    error: str = Field(description="One line saying what went wrong and, where it helps, what to do.")


# --- requests (documentation of what `serving.payloads` reads) ---


class EmbedRequest(BaseModel):
    """``POST /v1/embed`` as JSON (or multipart/form-data with ``images`` file parts)."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(description="Images (PNG, JPEG, WebP, ...) as base64 strings.", max_length=64)


class SearchRequest(BaseModel):
    """``POST /v1/search`` as JSON: exactly one of ``images``, ``key`` or ``vectors``.

    As multipart/form-data: ``images`` file parts, or a ``key`` field, and the same scalar fields.
    """

    model_config = ConfigDict(extra="forbid")
    images: list[str] | None = Field(None, description="Query images as base64 strings.")
    key: str | None = Field(None, description="A corpus key: search with its stored vector.")
    vectors: list[list[float]] | None = Field(None, description="Query vectors of the index's dimension.")
    k: int | None = Field(None, ge=1, description="Neighbours per query (the service's default when absent).")
    nprobe: int | None = Field(None, ge=1, description="IVF lists probed (IVF indexes; tuned value when absent).")
    ef: int | None = Field(None, ge=1, description="HNSW efSearch (HNSW indexes; tuned value when absent).")


class EmbedForm(BaseModel):
    """``POST /v1/embed`` as multipart/form-data."""

    images: list[bytes] = Field(description="One or more image file parts.", json_schema_extra={"format": "binary"})


class SearchForm(BaseModel):
    """``POST /v1/search`` as multipart/form-data: ``images`` file parts or a ``key``, and scalar fields."""

    images: list[bytes] | None = Field(None, description="Query image file parts.")
    key: str | None = None
    k: int | None = None
    nprobe: int | None = None
    ef: int | None = None


def request_models() -> tuple[type[BaseModel], ...]:
    return (EmbedRequest, SearchRequest, EmbedForm, SearchForm)


def request_body(json_model: type[BaseModel], form_model: type[BaseModel]) -> dict[str, Any]:
    """An operation's ``requestBody`` naming ``json_model`` and ``form_model`` (for ``openapi_extra``)."""

    def ref(model: type[BaseModel]) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": ref(json_model)},
                "multipart/form-data": {"schema": ref(form_model)},
            },
        }
    }


# --- responses ---


class EmbedResponse(BaseModel):
    model: str = Field(description="The model bundle's hash: vectors of different hashes are not comparable.")
    dim: int
    embeddings: list[list[float]] = Field(description="L2-normalised float32 vectors, in request order.")


class Hit(BaseModel):
    rank: int
    key: str
    label: int | None = Field(description="The sample's class, when the corpus has labels.")
    score: float = Field(description="Similarity: higher is nearer.")


class QueryHits(BaseModel):
    query: int = Field(description="The query's position in the request.")
    hits: list[Hit]


class SearchResponse(BaseModel):
    index: str = Field(description="The index's FAISS factory string.")
    model: str = Field(description="The hash of the model the index's vectors came from.")
    generation: int = Field(description="Which loaded (model, index) pair answered: a reload increments it.")
    results: list[QueryHits]


class IndexSummary(BaseModel):
    factory: str | None
    index_kind: str | None
    metric: str | None
    count: int
    dim: int | None
    search: dict[str, Any] | None = Field(description="The tuned search parameter and its value.")
    recall_at_k: dict[str, Any] | None = Field(description="What the tuner measured: k, queries, recall.")
    version: int | None = Field(description="The version its bundle folder's `current` names (an update adds one).")
    build: str | None = Field(description="A digest of the served build's index.json.")


class ModelResponse(BaseModel):
    model: dict[str, Any] = Field(description="The model bundle's model.json.")
    index: IndexSummary | None
    generation: int


class CorpusSummary(BaseModel):
    count: int
    class_names: list[str] | None
    images: bool = Field(description="Whether the corpus images can be shown (`/v1/images/{key}`).")
    images_unavailable: str | None = Field(description="Why not, when they cannot.")


class RandomKey(BaseModel):
    key: str


class Liveness(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    error: str | None = Field(None, description="Why the service cannot become ready (a bad bundle).")


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (404, "Unknown key, route, or no index served"),
        (413, "A body, image or count over its limit"),
        (422, "Invalid input, with the reason"),
        (503, "Loading, or overloaded (with Retry-After)"),
    )
}
