"""The fake's HTTP side: Discord's REST routes under /api/v10, answered the way Discord does.

Each request is recorded; bodies are checked before any handler runs (see
`discord_validation`), rate-limit headers come on every answer, and a route the fake does not
know is answered 404 and listed in `unhandled`, so a test can prove the bot used nothing else.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

from tests.fakes.discord_interactions import AppCommands, Interactions, check_not_empty
from tests.fakes.discord_validation import body_errors
from tests.fakes.discord_world import (
    ADMIN_ID,
    BOT_ID,
    PRIVATE_THREAD,
    PUBLIC_THREAD,
    DiscordError,
    Message,
    Perm,
    World,
)

API = "/api/v10"
JSON = "application/json"  # exactly: discord.py treats "...; charset=utf-8" as plain text
EDITS_PER_WINDOW, EDIT_WINDOW = 5, 5.0
MAX_FILES = 10
_FILE_FIELD = re.compile(r"files\[(\d+)\]")
_NO_AUTH = (f"{API}/webhooks/", f"{API}/interactions/")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    body: Any  # the JSON body (or multipart payload_json), None when there was none
    status: int


@dataclass
class Refusal:
    method: str
    path: str
    body: Any
    errors: dict[str, Any]


@dataclass
class RestRecords:
    requests: list[RecordedRequest] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    unhandled: list[str] = field(default_factory=list)
    typing_calls: list[int] = field(default_factory=list)
    rate_limited: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)  # the fake's own bugs, as tracebacks
    refuse_next: list[tuple[str, str, DiscordError]] = field(default_factory=list)
    """Injected faults: the next request with this method and path gets this error."""


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=json.dumps(body).encode(),
        status=status,
        headers={"Content-Type": JSON, **(headers or {})},
    )


def _form_error(field_name: str, code: str, message: str) -> DiscordError:
    errors = {field_name: {"_errors": [{"code": code, "message": message}]}}
    return DiscordError(400, 50035, "Invalid Form Body", errors)


def _history_query(query: Mapping[str, str]) -> tuple[int, dict[str, int]]:
    """`limit` and the one of `before`/`after`/`around` given, refused as Discord refuses
    them (50035, naming the field). Discord's documentation calls the three mutually
    exclusive; the fake refuses more than one rather than guess which would win."""
    raw = query.get("limit", "50")
    try:
        limit = int(raw)
    except ValueError:
        raise _form_error("limit", "NUMBER_TYPE_COERCE", f'Value "{raw}" is not int.') from None
    if limit < 1:
        raise _form_error(
            "limit", "NUMBER_TYPE_MIN", "int value should be greater than or equal to 1."
        )
    if limit > 100:
        raise _form_error(
            "limit", "NUMBER_TYPE_MAX", "int value should be less than or equal to 100."
        )
    pivots: dict[str, int] = {}
    for name in ("around", "before", "after"):
        if name in query:
            value = query[name]
            if not value.isascii() or not value.isdigit():
                raise _form_error(name, "NUMBER_TYPE_COERCE", f'Value "{value}" is not snowflake.')
            pivots[name] = int(value)
    if len(pivots) > 1:
        raise _form_error(
            sorted(pivots)[-1],
            "BASE_TYPE_BAD_COMBINATION",
            "around, before and after exclude each other.",
        )
    return limit, pivots


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true")


class _Windows:
    """Fixed-window counters, one per Discord bucket (route plus its major parameter)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._state: dict[str, tuple[float, int]] = {}

    def take(self, key: str) -> tuple[float, dict[str, str]]:
        """Count one request; returns (seconds to wait or 0, the X-RateLimit-* headers)."""
        now = time.time()
        start, used = self._state.get(key, (now, 0))
        if now >= start + self.window:
            start, used = now, 0
        wait = start + self.window - now if used >= self.limit else 0.0
        if not wait:
            used += 1
        self._state[key] = (start, used)
        return wait, {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.limit - used),
            "X-RateLimit-Reset": f"{start + self.window:.3f}",
            "X-RateLimit-Reset-After": f"{max(start + self.window - now, 0.001):.3f}",
        }


def _too_many(retry_after: float, headers: dict[str, str]) -> web.Response:
    # discord.py only honours a 429 that came through Discord's proxy (a `Via` header).
    headers = headers | {"Via": "1.1 google", "Retry-After": str(max(1, round(retry_after)))}
    body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": False}
    return json_response(body, 429, headers)


@dataclass
class _Upload:
    field: str  # the form field's name: `files[n]`
    filename: str
    data: bytes
    content_type: str


# The parsed JSON (or multipart payload_json) body, None when there was none.
BODY: web.RequestKey[Any] = web.RequestKey("body", object)
UPLOADS = web.RequestKey("uploads", list[_Upload])


def _check_uploads(body: Any, uploads: list[_Upload], size_limit: int) -> None:
    """Refuse files the way Discord does: at most 10, each within the size limit, each named
    and sent as `files[n]` matching an entry `{"id": n}` of the payload's `attachments`
    (when the payload lists them)."""
    if len(uploads) > MAX_FILES:
        raise DiscordError(400, 50035, "Invalid Form Body", {"files": _too_many_files()})
    for upload in uploads:
        if len(upload.data) > size_limit:
            raise DiscordError(413, 40005, "Request entity too large")
        index = _FILE_FIELD.fullmatch(upload.field)
        if index is None or not upload.filename or len(upload.filename) > 1024:
            errors = {upload.field or "file": {"_errors": [_bad_file(upload)]}}
            raise DiscordError(400, 50035, "Invalid Form Body", errors)
    listed = (body or {}).get("attachments") if isinstance(body, dict) else None
    if uploads and listed is not None:
        sent = {int(_FILE_FIELD.fullmatch(u.field)[1]) for u in uploads}  # type: ignore[index]
        named = {int(a["id"]) for a in listed if int(a["id"]) < MAX_FILES}
        if sent != named:
            error = {"code": "ATTACHMENT_NOT_FOUND", "message": "Unknown attachment"}
            raise DiscordError(
                400, 50035, "Invalid Form Body", {"attachments": {"_errors": [error]}}
            )


def _too_many_files() -> dict[str, Any]:
    return {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 10 or fewer."}]}


def _bad_file(upload: _Upload) -> dict[str, str]:
    return {"code": "BINARY_TYPE_INVALID", "message": f"Invalid file field {upload.field!r}"}


class RestApi:
    def __init__(
        self,
        *,
        lock: threading.Lock,
        world: World,
        commands: AppCommands,
        interactions: Interactions,
        token: str,
        rate_limit: int,
        rate_window: float,
    ) -> None:
        self.lock, self.world, self.token = lock, world, token
        self.commands, self.interactions = commands, interactions
        self.records = RestRecords()
        self.strict_edit_rate = False
        self.recommended_shards = 1  # the shard count /gateway/bot recommends
        self._buckets = _Windows(rate_limit, rate_window)
        self._edits: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=EDITS_PER_WINDOW)
        )

    def routes(self) -> list[web.RouteDef]:
        app, guild_app = f"{API}/applications/{{application_id}}", f"{API}/applications/"
        channel = f"{API}/channels/{{channel_id}}"
        webhook = f"{API}/webhooks/{{webhook_id}}/{{webhook_token}}"
        return [
            web.get(f"{API}/users/@me", self.get_me),
            web.get(f"{API}/oauth2/applications/@me", self.get_application),
            web.get(f"{API}/gateway", self.get_gateway),
            web.get(f"{API}/gateway/bot", self.get_gateway),
            web.get(f"{app}/commands", self.get_commands),
            web.put(f"{app}/commands", self.put_commands),
            web.post(f"{app}/commands", self.post_command),
            web.get(guild_app + "{application_id}/guilds/{guild_id}/commands", self.get_commands),
            web.put(guild_app + "{application_id}/guilds/{guild_id}/commands", self.put_commands),
            web.post(guild_app + "{application_id}/guilds/{guild_id}/commands", self.post_command),
            web.get(channel, self.get_channel),
            web.patch(channel, self.edit_channel),
            web.get(f"{channel}/messages", self.get_messages),
            web.post(f"{channel}/messages", self.post_message),
            web.get(f"{channel}/messages/{{message_id}}", self.get_message),
            web.patch(f"{channel}/messages/{{message_id}}", self.edit_message),
            web.delete(f"{channel}/messages/{{message_id}}", self.delete_message),
            web.post(f"{channel}/messages/{{message_id}}/threads", self.thread_from_message),
            web.post(f"{channel}/threads", self.thread_without_message),
            web.post(f"{channel}/typing", self.typing),
            web.post(f"{API}/users/@me/channels", self.create_dm),
            web.post(
                f"{API}/interactions/{{interaction_id}}/{{interaction_token}}/callback",
                self.interaction_callback,
            ),
            web.post(webhook, self.followup),
            web.get(f"{webhook}/messages/{{message_id}}", self.get_webhook_message),
            web.patch(f"{webhook}/messages/{{message_id}}", self.edit_webhook_message),
            web.delete(f"{webhook}/messages/{{message_id}}", self.delete_webhook_message),
            web.get("/attachments/{file_id}/{filename}", self.get_attachment),
        ]

    # The part every request goes through

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body: Any = None
        try:
            body, uploads = await self._read_body(request)
            request[BODY], request[UPLOADS] = body, uploads
            response = await self._answer(request, handler, body)
        except DiscordError as error:
            response = json_response(error.body(), error.status)
        except Exception:
            # A bug in the fake. Not a 500: discord.py would retry it for ~16 s before failing.
            with self.lock:
                self.records.crashes.append(traceback.format_exc())
            message = f"the fake Discord crashed on {request.method} {request.path}"
            response = json_response({"message": message, "code": 0}, 400)
        with self.lock:
            self.records.requests.append(
                RecordedRequest(
                    request.method, request.path, dict(request.query), body, response.status
                )
            )
        return response

    async def _answer(
        self, request: web.Request, handler: Handler, body: Any
    ) -> web.StreamResponse:
        path = request.path
        if not path.startswith(API):
            return await handler(request)
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else path
        if not path.startswith(_NO_AUTH) and request.headers.get("Authorization") != (
            f"Bot {self.token}"
        ):
            return json_response({"message": "401: Unauthorized", "code": 0}, 401)
        if canonical == "/{tail}":
            return await handler(request)
        with self.lock:
            for injected in self.records.refuse_next:
                if injected[:2] == (request.method, path):
                    self.records.refuse_next.remove(injected)
                    raise injected[2]
        spec_path = canonical.removeprefix(API)
        if request.method in ("POST", "PATCH", "PUT") and body is not None:
            errors = body_errors(spec_path, request.method, body)
            if errors is not None:
                with self.lock:
                    self.records.refused.append(Refusal(request.method, path, body, errors))
                raise DiscordError(400, 50035, "Invalid Form Body", errors)
        if request[UPLOADS]:
            try:
                _check_uploads(body, request[UPLOADS], self.interactions.attachment_size_limit)
            except DiscordError as refused:
                with self.lock:
                    reason = refused.errors or {"_errors": [refused.message]}
                    self.records.refused.append(Refusal(request.method, path, body, reason))
                raise
        major = "+".join(
            request.match_info.get(k, "")
            for k in ("channel_id", "guild_id", "webhook_id", "webhook_token", "interaction_id")
        )
        bucket = hashlib.sha1(f"{request.method} {canonical}".encode()).hexdigest()[:16]
        with self.lock:
            wait, headers = self._buckets.take(f"{bucket}:{major}")
            headers["X-RateLimit-Bucket"] = bucket
            if not wait and self.strict_edit_rate and request.method == "PATCH":
                wait = self._edit_wait(request)
            if wait:
                self.records.rate_limited.append(f"{request.method} {path}")
        if wait:
            return _too_many(round(wait, 3), headers)
        response = await handler(request)
        response.headers.update(headers)
        return response

    def _edit_wait(self, request: web.Request) -> float:
        """Discord throttles edits of one message (about 5 per 5 s) whatever the bucket says."""
        key = request.match_info.get("message_id")
        if key is None:
            return 0.0
        key = f"{request.match_info.get('webhook_token', '')}:{key}"
        now, edits = time.monotonic(), self._edits[key]
        if len(edits) == EDITS_PER_WINDOW and now - edits[0] < EDIT_WINDOW:
            return EDIT_WINDOW - (now - edits[0])
        edits.append(now)
        return 0.0

    async def _read_body(self, request: web.Request) -> tuple[Any, list[_Upload]]:
        if request.method not in ("POST", "PUT", "PATCH"):
            return None, []  # never read a GET: the websocket upgrade's stream is not a body
        if request.content_type.startswith("multipart/"):
            body: Any = None
            uploads = []
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "payload_json":
                    body = json.loads(await part.text())
                elif part.filename is not None:
                    data = bytes(await part.read())
                    content_type = part.headers.get("Content-Type", "application/octet-stream")
                    uploads.append(_Upload(part.name or "", part.filename, data, content_type))
            return body, uploads
        raw = await request.read()
        if not raw:
            return None, []
        try:
            return json.loads(raw), []
        except ValueError:
            raise DiscordError(400, 50109, "The request body contains invalid JSON.") from None

    def _files(self, request: web.Request) -> list[dict[str, Any]]:
        """Store uploads (lock held) and return them as attachment objects."""
        return [self.world.add_file(u.filename, u.data, u.content_type) for u in request[UPLOADS]]

    @staticmethod
    def _no_content() -> web.Response:
        return web.Response(status=204)

    def _message(self, msg: Message) -> web.Response:
        return json_response(self.world.message_payload(msg))

    # Identity and commands

    async def get_me(self, request: web.Request) -> web.Response:
        user = self.world.bot_user | {"verified": True, "mfa_enabled": False, "flags": 0}
        return json_response(user)

    async def get_application(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "id": str(BOT_ID),
                "name": "fakebot",
                "description": "",
                "icon": None,
                "bot_public": False,
                "bot_require_code_grant": False,
                "owner": self.world.users[ADMIN_ID],
                "verify_key": "0" * 64,
                "flags": 0,
                "team": None,
                "bot": self.world.bot_user,
            }
        )

    async def get_gateway(self, request: web.Request) -> web.Response:
        url = f"ws://{request.host}/"
        limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
        shards = self.recommended_shards
        return json_response({"url": url, "shards": shards, "session_start_limit": limit})

    def _scope(self, request: web.Request) -> int | None:
        if request.match_info["application_id"] != str(BOT_ID):
            raise DiscordError(404, 10002, "Unknown Application")
        guild = request.match_info.get("guild_id")
        if guild is not None and guild not in {str(g) for g in self.world.guild_ids}:
            raise DiscordError(404, 10004, "Unknown Guild")
        return None if guild is None else int(guild)

    async def get_commands(self, request: web.Request) -> web.Response:
        with self.lock:
            return json_response(self.commands.listed(self._scope(request)))

    async def put_commands(self, request: web.Request) -> web.Response:
        with self.lock:
            return json_response(self.commands.put(self._scope(request), request[BODY] or []))

    async def post_command(self, request: web.Request) -> web.Response:
        with self.lock:
            return json_response(self.commands.upsert(self._scope(request), request[BODY]), 201)

    # Channels and messages

    async def get_channel(self, request: web.Request) -> web.Response:
        with self.lock:
            channel = self.world.channel(request.match_info["channel_id"])
            return json_response(self.world.channel_payload(channel))

    async def edit_channel(self, request: web.Request) -> web.Response:
        """Renaming a thread; other changes to channels are beyond this fake."""
        body = request[BODY] or {}
        if set(body) != {"name"} or not isinstance(body["name"], str):
            raise DiscordError(400, 0, f"the fake only renames threads, not {sorted(body)}")
        with self.lock:
            channel = self.world.channel(request.match_info["channel_id"])
            renamed = self.world.rename_thread(channel, body["name"], BOT_ID)
            return json_response(self.world.channel_payload(renamed))

    async def get_messages(self, request: web.Request) -> web.Response:
        """Newest first, as Discord answers: the `limit` (1 to 100, default 50) messages just
        before `before`, just after `after`, or around `around`, of which at most one may
        be given. A bot without Read Message History here gets an empty list."""
        limit, pivots = _history_query(request.query)
        with self.lock:
            channel = self.world.channel(request.match_info["channel_id"])
            if channel.guild_id is not None and not (
                self.world.channel_permissions(BOT_ID, channel) & Perm.READ_MESSAGE_HISTORY
            ):
                return json_response([])
            found = self.world.channel_messages(channel.id)
            if "before" in pivots:
                found = [m for m in found if m.id < pivots["before"]][-limit:]
            elif "after" in pivots:
                found = [m for m in found if m.id > pivots["after"]][:limit]
            elif "around" in pivots:
                pivot = pivots["around"]
                found = [m for m in found if m.id < pivot][-(limit // 2) :] + [
                    m for m in found if m.id >= pivot
                ][: limit - limit // 2]
            else:
                found = found[-limit:]
            return json_response([self.world.message_payload(m) for m in reversed(found)])

    async def get_message(self, request: web.Request) -> web.Response:
        with self.lock:
            info = request.match_info
            return self._message(self.world.message(info["channel_id"], info["message_id"]))

    async def post_message(self, request: web.Request) -> web.Response:
        body = request[BODY] or {}
        with self.lock:
            channel = self.world.channel(request.match_info["channel_id"])
            files = self._files(request)
            check_not_empty(body, files)
            reference = body.get("message_reference")
            mentions: tuple[int, ...] = ()
            if reference:
                target = self.world.messages.get(int(reference["message_id"]))
                if target is None or target.deleted:
                    if reference.get("fail_if_not_exists", True):
                        errors = {
                            "message_reference": {
                                "_errors": [
                                    {
                                        "code": "MESSAGE_REFERENCE_UNKNOWN_MESSAGE",
                                        "message": "Unknown message",
                                    }
                                ]
                            }
                        }
                        raise DiscordError(400, 50035, "Invalid Form Body", errors)
                    reference = None
                elif (body.get("allowed_mentions") or {}).get("replied_user"):
                    mentions = (target.author_id,)
            msg = self.world.post(
                channel.id,
                BOT_ID,
                body.get("content") or "",
                extra_mentions=mentions,
                flags=int(body.get("flags") or 0),
                embeds=list(body.get("embeds") or []),
                attachments=files,
                allowed_mentions=body.get("allowed_mentions"),
                message_reference=reference,
            )
            return self._message(msg)

    def _edit(self, msg: Message, request: web.Request) -> Message:
        body = dict(request[BODY] or {})
        if "attachments" in body:
            kept = {str(a.get("id")) for a in body["attachments"] or []}
            body["attachments"] = [a for a in msg.attachments if a["id"] in kept]
            body["attachments"] += self._files(request)
        return self.world.edit(msg, body)

    async def edit_message(self, request: web.Request) -> web.Response:
        with self.lock:
            info = request.match_info
            msg = self.world.message(info["channel_id"], info["message_id"])
            if msg.author_id != BOT_ID:
                raise DiscordError(403, 50005, "Cannot edit a message authored by another user")
            return self._message(self._edit(msg, request))

    async def delete_message(self, request: web.Request) -> web.Response:
        with self.lock:
            info = request.match_info
            self.world.delete(self.world.message(info["channel_id"], info["message_id"]))
        return self._no_content()

    async def typing(self, request: web.Request) -> web.Response:
        with self.lock:
            channel = self.world.channel(request.match_info["channel_id"])
            self.records.typing_calls.append(channel.id)
        return self._no_content()

    async def thread_from_message(self, request: web.Request) -> web.Response:
        with self.lock:
            info = request.match_info
            channel = self.world.channel(info["channel_id"])
            msg = self.world.message(channel.id, info["message_id"])
            self.world.require(BOT_ID, channel, Perm.CREATE_PUBLIC_THREADS)
            name = request[BODY]["name"]
            thread = self.world.create_thread(channel.id, name, BOT_ID, thread_id=msg.id)
            return json_response(self.world.channel_payload(thread), 201)

    async def thread_without_message(self, request: web.Request) -> web.Response:
        body = request[BODY]
        thread_type = body.get("type") or PRIVATE_THREAD
        if thread_type not in (PUBLIC_THREAD, PRIVATE_THREAD):
            raise DiscordError(400, 50024, "Cannot execute action on this channel type")
        with self.lock:
            parent = self.world.channel(request.match_info["channel_id"])
            public = thread_type == PUBLIC_THREAD
            needed = Perm.CREATE_PUBLIC_THREADS if public else Perm.CREATE_PRIVATE_THREADS
            self.world.require(BOT_ID, parent, needed)
            thread = self.world.create_thread(
                parent.id, body["name"], BOT_ID, thread_type=thread_type
            )
            return json_response(self.world.channel_payload(thread), 201)

    async def create_dm(self, request: web.Request) -> web.Response:
        with self.lock:
            recipient = (request[BODY] or {}).get("recipient_id")
            if recipient is None or int(recipient) not in self.world.users:
                raise DiscordError(400, 50033, "Invalid Recipient(s)")
            return json_response(self.world.channel_payload(self.world.dm_channel(int(recipient))))

    async def get_attachment(self, request: web.Request) -> web.Response:
        with self.lock:
            stored = self.world.files.get(int(request.match_info["file_id"]))
        if stored is None or stored.filename != request.match_info["filename"]:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=stored.data, headers={"Content-Type": stored.content_type})

    # Interactions

    async def interaction_callback(self, request: web.Request) -> web.Response:
        info = request.match_info
        with self.lock:
            files = self._files(request)
            answer = self.interactions.callback(
                info["interaction_id"], info["interaction_token"], request[BODY] or {}, files
            )
        if _truthy(request.query.get("with_response")):
            return json_response(answer)
        return self._no_content()

    async def followup(self, request: web.Request) -> web.Response:
        info = request.match_info
        with self.lock:
            state = self.interactions.by_token(info["webhook_id"], info["webhook_token"])
            msg = self.interactions.followup(state, request[BODY] or {}, self._files(request))
            if _truthy(request.query.get("wait")):
                return self._message(msg)
        return self._no_content()

    def _webhook_message(self, request: web.Request) -> Message:
        info = request.match_info
        state = self.interactions.by_token(info["webhook_id"], info["webhook_token"])
        return self.interactions.webhook_message(state, info["message_id"])

    async def get_webhook_message(self, request: web.Request) -> web.Response:
        with self.lock:
            return self._message(self._webhook_message(request))

    async def edit_webhook_message(self, request: web.Request) -> web.Response:
        with self.lock:
            return self._message(self._edit(self._webhook_message(request), request))

    async def delete_webhook_message(self, request: web.Request) -> web.Response:
        with self.lock:
            self.world.delete(self._webhook_message(request))
        return self._no_content()

    # Everything else

    async def unhandled(self, request: web.Request) -> web.Response:
        with self.lock:
            self.records.unhandled.append(f"{request.method} {request.path}")
        return json_response({"message": "404: Not Found", "code": 0}, 404)
