"""Request bodies of the tool server, parsed to the contract's status codes."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import HTTPException, Request, status
from pydantic import BaseModel, ValidationError

_M = TypeVar("_M", bound=BaseModel)


async def parse_body(request: Request, model: type[_M], *, required: bool = True) -> _M | None:
    """The request's JSON body as ``model``.

    Parsed here, not by FastAPI, which answers 400 for a body that is not UTF-8 or nests too deep
    where the contract says 422 with a message. An empty body is None unless ``required``.
    """
    raw = await request.body()
    if not raw.strip() and not required:
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{where}: {first['msg']}"[:300]) from None
    except (ValueError, RecursionError) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"the request body is not valid JSON ({type(exc).__name__})") from None


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as the JSON body of a route that parses it itself
    (:func:`parse_body`); nested models are inlined, so the schema stands alone in the spec."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"content": {"application/json": {"schema": inline(schema)}}}}


__all__ = ["body_schema", "parse_body"]
