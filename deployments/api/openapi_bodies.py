"""The HTTP routes' request bodies, declared in the OpenAPI schema (`/openapi.json`).

The routes read their bodies themselves (`openai_protocol.parse_body`: strict JSON, a 400 naming
the first bad field, after the guards' key and size checks), so FastAPI never sees the models and
would publish no request bodies. A route names its model with `bodies.of(Model)` as its
`openapi_extra`; `bodies.install(app)` adds the models' JSON schemas to the schema's components.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF_TEMPLATE = "#/components/schemas/{model}"


class DeclaredBodies:
    """The request models of one app's routes, by name."""

    def __init__(self) -> None:
        self.models: dict[str, type[BaseModel]] = {}

    def of(self, model: type[BaseModel]) -> dict[str, Any]:
        """A route's `openapi_extra`: a required JSON body of `model`."""
        known = self.models.setdefault(model.__name__, model)
        if known is not model:
            raise ValueError(f"two request models named {model.__name__}")
        ref = {"$ref": REF_TEMPLATE.format(model=model.__name__)}
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}

    def install(self, app: FastAPI) -> None:
        """Makes `app.openapi()` carry the models (and the models they use) as components."""
        build = app.openapi

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is not None:
                return app.openapi_schema
            schema = build()  # FastAPI's, cached on the app: completed in place
            _, defs = models_json_schema([(m, "validation") for m in self.models.values()],
                                         ref_template=REF_TEMPLATE)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            return schema

        app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
