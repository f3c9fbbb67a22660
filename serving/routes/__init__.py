"""The service's endpoints, one router per concern: search and embed, the corpus, and the service itself.

Each route finds the `serving.service.Service` on ``request.app.state`` (`service_of`) and declares its response
model (`serving.schemas`), so ``/openapi.json`` describes every body.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serving.service import Service


def service_of(request: Request) -> Service:
    return request.app.state.service


TheService = Annotated[Service, Depends(service_of)]
