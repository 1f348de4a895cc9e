"""Static files of the widget and the inbox, read once from the package."""

from __future__ import annotations

from importlib import resources
from typing import Final

from aiohttp import web

__all__ = ["Assets"]

_CONTENT_TYPES: Final = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}


class Assets:
    """The files of ``commhub.core.widget/static`` by name, with their content types."""

    def __init__(self, package: str = "commhub.core.widget", folder: str = "static") -> None:
        root = resources.files(package).joinpath(folder)
        self.files: dict[str, tuple[bytes, str]] = {}
        for entry in root.iterdir():
            suffix = "." + entry.name.rpartition(".")[2]
            if entry.is_file() and suffix in _CONTENT_TYPES:
                self.files[entry.name] = (entry.read_bytes(), _CONTENT_TYPES[suffix])

    def response(self, name: str, headers: dict[str, str]) -> web.Response:
        """The file as an answer; KeyError when the package lacks it."""
        body, content_type = self.files[name]
        charset = "utf-8" if content_type.startswith("text/") else None
        return web.Response(body=body, content_type=content_type, charset=charset,
                            headers=headers)
