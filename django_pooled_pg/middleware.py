"""``HolderMiddleware``: charge a request's checkouts to the view that served it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

from . import holders

#: What a request's checkouts are charged to until its URL is resolved (and
#: for good if it never is: a 404, or a middleware that answers first).
UNRESOLVED = "(unresolved request)"


class HolderMiddleware:
    """Names each request's holder after its resolved view (pool option ``holders``).

    Put it first in MIDDLEWARE, so that checkouts made by the middleware
    after it are charged to the request too. The request's holder is opened
    in ``__call__`` and named in ``process_view`` (where ``resolver_match``
    first exists): a connection checked out before the view is known is
    charged to the view all the same, as its hold is recorded at return.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.is_async:
            return self.__acall__(request)
        token = holders.enter(UNRESOLVED)
        try:
            response: HttpResponseBase = self.get_response(request)
            return response
        finally:
            holders.leave(token)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        token = holders.enter(UNRESOLVED)
        try:
            response: HttpResponseBase = await self.get_response(request)
            return response
        finally:
            holders.leave(token)

    def process_view(
        self,
        request: HttpRequest,
        view_func: Callable[..., Any],
        view_args: tuple[Any, ...],
        view_kwargs: dict[str, Any],
    ) -> None:
        # Under ASGI this runs in a worker thread with a copy of the
        # request's context: the copy holds the same cell, renamed here.
        cell = holders.current()
        if cell is not None:
            cell.name = holders.view_name(view_func)
