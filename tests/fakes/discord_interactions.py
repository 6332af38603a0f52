"""Application commands and interactions, with the gatekeeping Discord's own client does.

Discord never delivers a command a member may not use (`default_member_permissions`), nor a
guild-only command in a DM; a bot's permission decorators are only honest if the fake refuses
those too, so `CommandRefused` is raised in the test and nothing reaches the bot.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.discord_world import (
    BOT_ID,
    CHAT_INPUT_COMMAND_MESSAGE,
    DM_CHANNEL,
    EPHEMERAL,
    LOADING,
    THREAD_TYPES,
    Channel,
    DiscordError,
    Message,
    Perm,
    World,
    unknown_message,
)

APPLICATION_COMMAND, AUTOCOMPLETE, MODAL_SUBMIT = 2, 4, 5
SUBCOMMAND, SUBCOMMAND_GROUP = 1, 2
STRING, INTEGER, BOOLEAN, USER, CHANNEL, ROLE, MENTIONABLE, NUMBER, ATTACHMENT = range(3, 12)
GUILD_CONTEXT, BOT_DM_CONTEXT = 0, 1
MESSAGE_RESPONSE, DEFERRED_RESPONSE, AUTOCOMPLETE_RESULT, MODAL_RESPONSE = 4, 5, 8, 9
ACTION_ROW, TEXT_INPUT, LABEL = 1, 4, 18
ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024


class CommandRefused(AssertionError):
    """Discord would not deliver this invocation (unknown command, missing permission, ...)."""


@dataclass(frozen=True)
class InteractionReply:
    """What the invoking user ended up seeing for one interaction."""

    interaction_id: int
    command: str
    response_types: list[int]  # callback types in order: 4 message, 5 deferred, 8 choices
    ephemeral: bool
    deferred: bool
    original: Message | None
    followups: list[Message]
    choices: list[dict[str, Any]] | None

    @property
    def messages(self) -> list[Message]:
        """The messages the user can still see (a deleted "thinking" message is gone)."""
        return [m for m in (self.original, *self.followups) if m is not None and not m.deleted]

    @property
    def content(self) -> str:
        """The original response's text after every edit ('' while still "thinking")."""
        return self.original.content if self.original else ""

    @property
    def text(self) -> str:
        """All visible text: the original response, then each followup, one per line."""
        return "\n".join(m.content for m in self.messages if m.content)

    @property
    def visible(self) -> bool:
        return any(
            not m.flags & LOADING and (m.content or m.embeds or m.attachments)
            for m in self.messages
        )


@dataclass
class InteractionState:
    id: int
    token: str
    type: int
    command: str
    user_id: int
    channel_id: int
    created: float
    responses: list[dict[str, Any]] = field(default_factory=list)
    original_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)
    choices: list[dict[str, Any]] | None = None
    modal: dict[str, Any] | None = None  # the modal the bot answered with (its `data`)


def unknown_webhook() -> DiscordError:
    return DiscordError(404, 10015, "Unknown Webhook")


def check_not_empty(body: dict[str, Any], files: list[dict[str, Any]]) -> None:
    if not (body.get("content") or body.get("embeds") or files or body.get("components")):
        raise DiscordError(400, 50006, "Cannot send an empty message")


class AppCommands:
    """Commands the bot registered, global (scope None) or per guild."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.by_scope: dict[int | None, dict[tuple[str, int], dict[str, Any]]] = {}

    def put(self, guild_id: int | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Bulk overwrite, as `tree.sync()` does; an unchanged name keeps its id."""
        old = self.by_scope.get(guild_id, {})
        new: dict[tuple[str, int], dict[str, Any]] = {}
        for item in items:
            key = (item["name"], item.get("type") or 1)
            new[key] = self._stored(item, guild_id, old.get(key))
        self.by_scope[guild_id] = new
        return list(new.values())

    def upsert(self, guild_id: int | None, item: dict[str, Any]) -> dict[str, Any]:
        scope = self.by_scope.setdefault(guild_id, {})
        key = (item["name"], item.get("type") or 1)
        scope[key] = self._stored(item, guild_id, scope.get(key))
        return scope[key]

    def listed(self, guild_id: int | None) -> list[dict[str, Any]]:
        return list(self.by_scope.get(guild_id, {}).values())

    def find(self, name: str, guild_id: int | None) -> dict[str, Any] | None:
        for scope in (guild_id, None) if guild_id else (None,):
            command = self.by_scope.get(scope, {}).get((name, 1))
            if command is not None:
                return command
        return None

    def _stored(
        self, item: dict[str, Any], guild_id: int | None, old: dict[str, Any] | None
    ) -> dict[str, Any]:
        permissions = item.get("default_member_permissions")
        stored = {
            "id": old["id"] if old else str(self.world.ids.next()),
            "application_id": str(BOT_ID),
            "version": str(self.world.ids.next()),
            "type": item.get("type") or 1,
            "name": item["name"],
            "name_localizations": item.get("name_localizations"),
            "description": item.get("description") or "",
            "description_localizations": item.get("description_localizations"),
            "options": item.get("options") or [],
            "default_member_permissions": None if permissions is None else str(permissions),
            "dm_permission": item.get("dm_permission", True) is not False,
            "contexts": item.get("contexts"),
            "integration_types": item.get("integration_types") or [0],
            "nsfw": bool(item.get("nsfw")),
        }
        if guild_id is not None:
            stored["guild_id"] = str(guild_id)
        return stored


class Interactions:
    """Interactions sent to the bot and everything the bot answered to each."""

    def __init__(self, world: World, commands: AppCommands) -> None:
        self.world = world
        self.commands = commands
        self.by_id: dict[int, InteractionState] = {}
        self.ack_deadline = 3.0  # seconds Discord waits for the first callback
        self.attachment_size_limit = ATTACHMENT_SIZE_LIMIT  # bytes per file, as announced

    # Building what the bot receives

    def create(
        self,
        itype: int,
        name: str,
        options: dict[str, Any],
        user_id: int,
        channel_id: int,
        subcommand: str | None = None,
        focused: str | None = None,
    ) -> dict[str, Any]:
        world = self.world
        channel = world.channels.get(int(channel_id))
        if channel is None:
            raise ValueError(f"the fake has no channel {channel_id}")
        if channel.type == DM_CHANNEL and channel.recipient_id != user_id:
            raise ValueError(f"user {user_id} is not the recipient of DM channel {channel.id}")
        command = self.commands.find(name, channel.guild_id)
        if command is None:
            known = sorted(n for scope in self.commands.by_scope.values() for n, _ in scope)
            raise CommandRefused(f"/{name} was never registered by the bot (known: {known})")
        self._check_allowed(command, user_id, channel)
        data_options, resolved = self._options(command, options, subcommand, focused, channel)
        data: dict[str, Any] = {
            "id": command["id"],
            "name": name,
            "type": 1,
            "options": data_options,
            "resolved": resolved,
        }
        if "guild_id" in command:
            data["guild_id"] = command["guild_id"]
        return self._envelope(itype, name, data, user_id, channel)

    def create_modal_submit(self, opened_by: int, values: dict[str, str]) -> dict[str, Any]:
        """The user fills in and submits the modal the bot answered interaction `opened_by`
        with: `values` by text input `custom_id` (an input left out keeps its pre-filled
        value). Discord's client refuses a value outside the input's length limits, or a
        required one left empty."""
        opened = self.by_id.get(opened_by)
        if opened is None or opened.modal is None:
            raise ValueError(f"interaction {opened_by} was not answered with a modal")
        unused = set(values)

        def submitted(component: dict[str, Any]) -> dict[str, Any] | None:
            kind = component["type"]
            if kind == ACTION_ROW:
                inner = [c for c in map(submitted, component["components"]) if c is not None]
                return {"type": ACTION_ROW, "components": inner}
            if kind == LABEL:
                inner_one = submitted(component["component"])
                return None if inner_one is None else {"type": LABEL, "component": inner_one}
            if kind != TEXT_INPUT:
                return None
            custom_id = component["custom_id"]
            unused.discard(custom_id)
            value = values.get(custom_id, component.get("value") or "")
            shortest = component.get("min_length") or 0
            longest = component.get("max_length") or 4000
            if component.get("required", True) and not value:
                raise CommandRefused(f"text input {custom_id!r} is required")
            if value and not shortest <= len(value) <= longest:
                raise CommandRefused(
                    f"text input {custom_id!r} takes {shortest}..{longest} characters, "
                    f"got {len(value)}"
                )
            return {"type": TEXT_INPUT, "custom_id": custom_id, "value": value}

        modal = opened.modal
        components = [c for c in map(submitted, modal["components"]) if c is not None]
        if unused:
            raise ValueError(f"the modal has no text inputs {sorted(unused)}")
        data = {"custom_id": modal["custom_id"], "components": components}
        channel = self.world.channels[opened.channel_id]
        return self._envelope(MODAL_SUBMIT, modal["custom_id"], data, opened.user_id, channel)

    def _envelope(
        self, itype: int, name: str, data: dict[str, Any], user_id: int, channel: Channel
    ) -> dict[str, Any]:
        """An interaction payload around `data`, as Discord sends it to the bot."""
        world = self.world
        iid = world.ids.next()
        token = f"interaction-token-{iid}"
        payload: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(BOT_ID),
            "type": itype,
            "token": token,
            "version": 1,
            "data": data,
            "channel_id": str(channel.id),
            "locale": "en-US",
            "entitlements": [],
            "entitlement_sku_ids": [],
            "attachment_size_limit": self.attachment_size_limit,
        }
        channel_payload = world.channel_payload(channel)
        if channel.guild_id is None:
            payload |= {
                "user": world.users[user_id],
                "channel": channel_payload,
                "app_permissions": str(Perm.EVERYONE),
                "authorizing_integration_owners": {"0": "0"},
                "context": BOT_DM_CONTEXT,
            }
        else:
            member_perms = str(world.channel_permissions(user_id, channel))
            payload |= {
                "guild_id": str(channel.guild_id),
                "guild": {"id": str(channel.guild_id), "locale": "en-US", "features": []},
                "guild_locale": "en-US",
                "member": world.member_payload(user_id) | {"permissions": member_perms},
                "channel": channel_payload | {"permissions": member_perms},
                "app_permissions": str(world.channel_permissions(BOT_ID, channel)),
                "authorizing_integration_owners": {"0": str(channel.guild_id)},
                "context": GUILD_CONTEXT,
            }
        self.by_id[iid] = InteractionState(
            iid, token, itype, name, user_id, channel.id, time.monotonic()
        )
        return payload

    def _check_allowed(self, command: dict[str, Any], user_id: int, channel: Channel) -> None:
        name, contexts = command["name"], command.get("contexts")
        if channel.guild_id is None:
            if "guild_id" in command or command["dm_permission"] is False:
                raise CommandRefused(f"/{name} is guild-only; Discord does not offer it in DMs")
            if contexts is not None and BOT_DM_CONTEXT not in contexts:
                raise CommandRefused(f"/{name} is not allowed in DMs (contexts={contexts})")
            return
        if contexts is not None and GUILD_CONTEXT not in contexts:
            raise CommandRefused(f"/{name} is not allowed in guilds (contexts={contexts})")
        if user_id not in self.world.member_roles:
            raise CommandRefused(f"user {user_id} is not a member of the guild")
        required = command.get("default_member_permissions")
        if required is None:
            return
        have = self.world.permissions(user_id)
        needed = int(required)
        if have & Perm.ADMINISTRATOR:
            return
        if needed == 0 or have & needed != needed:
            raise CommandRefused(
                f"/{name} needs permissions {needed:#x}; user {user_id} has {have:#x}"
            )

    def _options(
        self,
        command: dict[str, Any],
        given: dict[str, Any],
        subcommand: str | None,
        focused: str | None,
        channel: Channel,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        defs: list[dict[str, Any]] = command.get("options") or []
        top: list[dict[str, Any]] = []
        container = top
        for part in (subcommand or "").split():
            found = next((d for d in defs if d["name"] == part and d["type"] <= 2), None)
            if found is None:
                raise CommandRefused(f"/{command['name']} has no subcommand {part!r}")
            entry: dict[str, Any] = {"name": part, "type": found["type"], "options": []}
            container.append(entry)
            container, defs = entry["options"], found.get("options") or []
        if any(d["type"] in (SUBCOMMAND, SUBCOMMAND_GROUP) for d in defs):
            names = [d["name"] for d in defs]
            raise CommandRefused(f"/{command['name']} needs a subcommand, one of {names}")
        resolved: dict[str, Any] = {}
        for name, value in given.items():
            spec = next((d for d in defs if d["name"] == name), None)
            if spec is None:
                raise CommandRefused(f"/{command['name']} has no option {name!r}")
            option: dict[str, Any] = {"name": name, "type": spec["type"]}
            if name == focused:
                if not spec.get("autocomplete"):
                    raise CommandRefused(f"option {name!r} has no autocomplete")
                option |= {"value": value, "focused": True}
            else:
                option["value"] = self._value(spec, value, resolved, channel)
            container.append(option)
        if focused is None:
            missing = [d["name"] for d in defs if d.get("required") and d["name"] not in given]
            if missing:
                raise CommandRefused(f"/{command['name']} is missing required options {missing}")
        return top, resolved

    def _value(
        self, spec: dict[str, Any], value: Any, resolved: dict[str, Any], channel: Channel
    ) -> Any:
        kind, world = spec["type"], self.world
        if kind in (STRING, INTEGER, NUMBER, BOOLEAN):
            python_type: dict[int, type | tuple[type, ...]] = {
                STRING: str,
                INTEGER: int,
                NUMBER: (int, float),
                BOOLEAN: bool,
            }
            if not isinstance(value, python_type[kind]) or isinstance(value, bool) != (
                kind == BOOLEAN
            ):
                raise CommandRefused(f"option {spec['name']!r} takes type {kind}, got {value!r}")
            shortest, longest = spec.get("min_length"), spec.get("max_length")
            if isinstance(value, str) and (
                (shortest is not None and len(value) < shortest)
                or (longest is not None and len(value) > longest)
            ):  # Discord's client refuses to send it
                raise CommandRefused(
                    f"option {spec['name']!r} takes {shortest}..{longest} characters, "
                    f"got {len(value)}"
                )
            choices = [c["value"] for c in spec.get("choices") or []]
            if choices and value not in choices:
                raise CommandRefused(f"{value!r} is not one of the choices {choices}")
            return value
        if kind == ATTACHMENT:
            resolved.setdefault("attachments", {})[value["id"]] = value
            return value["id"]
        if isinstance(value, dict):
            value = value["id"]
        snowflake = str(value)
        if kind in (USER, MENTIONABLE) and int(snowflake) in world.users:
            resolved.setdefault("users", {})[snowflake] = world.users[int(snowflake)]
            if channel.guild_id and int(snowflake) in world.member_roles:
                member = world.member_payload(int(snowflake), with_user=False)
                member["permissions"] = str(world.permissions(int(snowflake)))
                resolved.setdefault("members", {})[snowflake] = member
        elif kind in (ROLE, MENTIONABLE) and int(snowflake) in world.roles:
            resolved.setdefault("roles", {})[snowflake] = world.roles[int(snowflake)]
        elif kind == CHANNEL and int(snowflake) in world.channels:
            target = world.channels[int(snowflake)]
            data = world.channel_payload(target)
            data["permissions"] = str(world.permissions(BOT_ID))
            if target.type not in THREAD_TYPES:
                data = {k: v for k, v in data.items() if k != "thread_metadata"}
            resolved.setdefault("channels", {})[snowflake] = data
        else:
            raise CommandRefused(f"option {spec['name']!r}: nothing known with id {snowflake}")
        return snowflake

    # What the bot sends back

    def callback(
        self, iid: str, token: str, body: dict[str, Any], files: list[dict[str, Any]]
    ) -> dict[str, Any]:
        state = self.by_id.get(int(iid)) if iid.isdigit() else None
        if state is None or state.token != token:
            raise DiscordError(404, 10062, "Unknown interaction")
        if state.responses:
            raise DiscordError(400, 40060, "Interaction has already been acknowledged.")
        if time.monotonic() - state.created > self.ack_deadline:
            raise DiscordError(404, 10062, "Unknown interaction")
        rtype, data = body["type"], body.get("data") or {}
        if rtype == MESSAGE_RESPONSE:
            check_not_empty(data, files)
        state.responses.append(body)
        message = None
        if rtype in (MESSAGE_RESPONSE, DEFERRED_RESPONSE):
            message = self._original(state, data, files, loading=rtype == DEFERRED_RESPONSE)
        elif rtype == AUTOCOMPLETE_RESULT:
            state.choices = list(data.get("choices") or [])
        elif rtype == MODAL_RESPONSE:
            if state.type not in (APPLICATION_COMMAND,):  # not to a modal's own submission
                state.responses.pop()
                raise DiscordError(400, 50035, "Invalid Form Body")
            state.modal = copy.deepcopy(data)
        answer: dict[str, Any] = {"interaction": {"id": str(state.id), "type": state.type}}
        resource: dict[str, Any] = {"type": rtype}
        if message is not None:
            answer["interaction"] |= {
                "response_message_id": str(message.id),
                "response_message_loading": bool(message.flags & LOADING),
                "response_message_ephemeral": message.ephemeral,
            }
            resource["message"] = self.world.message_payload(message)
        answer["resource"] = resource
        return answer

    def _original(
        self,
        state: InteractionState,
        data: dict[str, Any],
        files: list[dict[str, Any]],
        *,
        loading: bool,
    ) -> Message:
        flags = int(data.get("flags") or 0) | (LOADING if loading else 0)
        metadata = {
            "id": str(state.id),
            "type": state.type,
            "user": self.world.users[state.user_id],
            "authorizing_integration_owners": {},
            "name": state.command,
        }
        message = self.world.post(
            state.channel_id,
            BOT_ID,
            "" if loading else data.get("content") or "",
            type=CHAT_INPUT_COMMAND_MESSAGE,
            flags=flags,
            embeds=[] if loading else list(data.get("embeds") or []),
            attachments=files,
            allowed_mentions=data.get("allowed_mentions"),
            interaction_id=state.id,
            interaction_metadata=metadata,
            webhook_id=BOT_ID,
        )
        state.original_id = message.id
        return message

    def by_token(self, webhook_id: str, token: str) -> InteractionState:
        """The interaction a webhook route's token belongs to, once it was acknowledged."""
        if webhook_id != str(BOT_ID):
            raise unknown_webhook()
        for state in self.by_id.values():
            if state.token == token and state.responses:
                return state
        raise unknown_webhook()

    def followup(
        self, state: InteractionState, body: dict[str, Any], files: list[dict[str, Any]]
    ) -> Message:
        """A followup; the first one after a defer replaces the "thinking" message instead
        (keeping its visibility), unless that message was deleted."""
        check_not_empty(body, files)
        original = self.world.messages.get(state.original_id or 0)
        if original is not None and not original.deleted and original.flags & LOADING:
            return self.world.edit(original, body | {"attachments": files})
        message = self.world.post(
            state.channel_id,
            BOT_ID,
            body.get("content") or "",
            flags=int(body.get("flags") or 0),
            embeds=list(body.get("embeds") or []),
            attachments=files,
            allowed_mentions=body.get("allowed_mentions"),
            interaction_id=state.id,
            webhook_id=BOT_ID,
        )
        state.followup_ids.append(message.id)
        return message

    def webhook_message(self, state: InteractionState, message_id: str) -> Message:
        wanted = state.original_id if message_id == "@original" else int(message_id)
        if wanted is None or (wanted != state.original_id and wanted not in state.followup_ids):
            raise unknown_message()
        message = self.world.messages.get(wanted)
        if message is None or message.deleted:
            raise unknown_message()
        return message

    def reply(self, iid: int) -> InteractionReply:
        state = self.by_id.get(iid)
        if state is None:
            raise ValueError(f"no interaction {iid} was sent")
        messages = self.world.messages

        def snapshot(mid: int | None) -> Message | None:
            msg = messages.get(mid or 0)
            return None if msg is None else copy.deepcopy(msg)

        original = snapshot(state.original_id)
        followups = [m for m in map(snapshot, state.followup_ids) if m is not None]
        first = state.responses[0] if state.responses else {}
        shown = [m for m in (original, *followups) if m is not None and not m.deleted]
        return InteractionReply(
            interaction_id=state.id,
            command=state.command,
            response_types=[r["type"] for r in state.responses],
            # Private when everything still shown is (and something is, or was asked to be).
            ephemeral=all(m.ephemeral for m in shown)
            if shown
            else bool(int((first.get("data") or {}).get("flags") or 0) & EPHEMERAL),
            deferred=first.get("type") == DEFERRED_RESPONSE,
            original=original,
            followups=followups,
            choices=None if state.choices is None else list(state.choices),
        )
