"""The HTTP side of `gpujobs api`: FastAPI routes for /v1/files and /v1/batches, the API key
check, and `serve()` (uvicorn).

Every route but /health asks for `Authorization: Bearer <api_key>` when a key is configured
(settings.api_key, GPUJOBS_API_KEY, from a Kubernetes Secret). Without one, `serve()` listens
on loopback only.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from gpujobs.api.batches import BatchCreate, BatchService
from gpujobs.api.errors import ApiError, install_handlers
from gpujobs.api.files import FileStore
from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.errors import GpujobsError
from gpujobs.monitor.flower import is_loopback

# Bytes a multipart upload adds around its file (boundaries, headers, the purpose field).
UPLOAD_FRAMING_BYTES = 64 * 1024


def make_app(settings: Settings, client: Client | None = None) -> FastAPI:
    """The API over the cluster `settings` name (or over `client`). BrokerUnreachable when
    the broker does not answer: a server that cannot do its work does not start."""
    client = client or Client(settings)
    client.redis  # noqa: B018  (the Client connects lazily: reach the broker now)
    files = FileStore(settings.media, settings.api_max_file_bytes)
    batches = BatchService(client, files)
    key = settings.api_key.get_secret_value() if settings.api_key else None

    def authorize(authorization: Annotated[str | None, Header()] = None) -> None:
        if key is None:
            return
        if not authorization:
            raise ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), key):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    app = FastAPI(
        title="gpujobs Batch API",
        description="The OpenAI Batch API (files and batches) over the gpujobs queue.",
        docs_url=None,
        redoc_url=None,
    )
    install_handlers(app)
    v1 = Depends(authorize)

    @app.middleware("http")
    async def before_the_body(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """The key, and an upload's declared size, checked before the body is read: FastAPI
        reads a form (a whole upload, spooled to disk) before it runs any dependency, so an
        unauthenticated or oversized upload would otherwise be received in full first."""
        if request.url.path.startswith("/v1/"):
            try:
                authorize(request.headers.get("authorization"))
                declared = request.headers.get("content-length", "")
                # The multipart framing around the file and the purpose field is small.
                limit = files.max_bytes + UPLOAD_FRAMING_BYTES
                if request.method == "POST" and declared.isdigit() and int(declared) > limit:
                    raise ApiError(
                        413,
                        f"The request declares {int(declared)} bytes, over the "
                        f"{files.max_bytes}-byte limit on an upload "
                        "(GPUJOBS_API_MAX_FILE_BYTES).",
                    )
            except ApiError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)
        return await call_next(request)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/files", dependencies=[v1])
    def create_file(
        file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
    ) -> dict[str, Any]:
        return files.save(file.file, file.filename, purpose)

    @app.get("/v1/files", dependencies=[v1])
    def list_files(
        purpose: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
    ) -> dict[str, Any]:
        objects = files.all() + batches.output_objects()
        if purpose is not None:
            objects = [o for o in objects if o["purpose"] == purpose]
        objects.sort(key=lambda o: (o["created_at"], o["id"]), reverse=order == "desc")
        if after is not None:
            ids = [o["id"] for o in objects]
            if after not in ids:
                raise ApiError(400, f"Invalid 'after': no file {after!r}.", param="after")
            objects = objects[ids.index(after) + 1 :]
        page = objects[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(objects) > limit,
        }

    @app.get("/v1/files/{file_id}", dependencies=[v1])
    def retrieve_file(file_id: str) -> dict[str, Any]:
        found = batches.output_record(file_id)
        if found is not None:
            return batches.output_object(*found)
        return files.get(file_id)

    @app.get("/v1/files/{file_id}/content", dependencies=[v1])
    def file_content(file_id: str) -> FileResponse:
        found = batches.output_record(file_id)
        path = batches.output_path(*found) if found else files.content_path(file_id)
        return FileResponse(path, media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}", dependencies=[v1])
    def delete_file(file_id: str) -> dict[str, Any]:
        found = batches.output_record(file_id)
        if found is not None:
            batches.delete_output(*found)
        else:
            files.delete(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/batches", dependencies=[v1])
    def create_batch(body: BatchCreate) -> dict[str, Any]:
        return batches.create(body)

    @app.get("/v1/batches", dependencies=[v1])
    def list_batches(
        after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
    ) -> dict[str, Any]:
        return batches.page(after, limit)

    @app.get("/v1/batches/{batch_id}", dependencies=[v1])
    def retrieve_batch(batch_id: str) -> dict[str, Any]:
        return batches.get(batch_id)

    @app.post("/v1/batches/{batch_id}/cancel", dependencies=[v1])
    def cancel_batch(batch_id: str) -> dict[str, Any]:
        return batches.cancel(batch_id)

    return app


def check_listen(settings: Settings, address: str) -> None:
    """GpujobsError unless an API key is set or `address` is loopback."""
    if settings.api_key is None and not is_loopback(address):
        raise GpujobsError(
            f"refusing to serve the API on {address} without an API key: set GPUJOBS_API_KEY "
            "(or listen on 127.0.0.1)"
        )


def serve(
    settings: Settings,
    address: str | None = None,
    port: int | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the API until interrupted. address: default settings.api_address (127.0.0.1);
    port: default settings.api_port (8090). ready(base_url) is called once it listens.
    GpujobsError when it would listen beyond loopback without a key."""
    host = settings.api_address if address is None else address
    check_listen(settings, host)
    app = make_app(settings)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    wanted = settings.api_port if port is None else port
    try:
        sock.bind((host, wanted))
    except OSError as exc:
        sock.close()
        raise GpujobsError(f"cannot listen on {host}:{wanted}: {exc.strerror or exc}") from None
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    if ready is not None:
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        ready(f"http://{shown}:{bound}/v1")
    uvicorn.Server(config).run(sockets=[sock])
