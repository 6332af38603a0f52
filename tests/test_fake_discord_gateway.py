"""The fake Discord is faithful enough that the real discord.py client runs whole
conversations against it: login, messages, edits, threads, slash commands, refusals.

The bot here is a throwaway defined in this file; the project's bot has its own tests.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import discord
import pytest
from discord import app_commands
from discord.http import Route

from tests.fakes.discord_gateway import CommandRefused, FakeDiscord
from tests.fakes.discord_interactions import ATTACHMENT_SIZE_LIMIT
from tests.fakes.discord_world import DiscordError, Intent, Perm

MODELS = ["openai/gpt-5.1", "openai/gpt-4o", "anthropic/claude-opus-4-5"]


class ThrowawayBot(discord.Client):
    """Just enough bot to exercise the protocol: it remembers what it saw, has commands."""

    def __init__(self) -> None:
        intents = discord.Intents.default()
        intents.message_content = True
        super().__init__(intents=intents, guild_ready_timeout=0.1)
        self.tree = app_commands.CommandTree(self)
        self.seen: list[discord.Message] = []
        self.ready = asyncio.Event()
        self.resumed = asyncio.Event()
        _add_commands(self.tree)

    async def on_ready(self) -> None:
        self.ready.set()

    async def on_resumed(self) -> None:
        self.resumed.set()

    async def on_message(self, message: discord.Message) -> None:
        self.seen.append(message)


def _add_commands(tree: app_commands.CommandTree[ThrowawayBot]) -> None:
    @tree.command(name="settings", description="Change the bot's settings")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def settings(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("settings changed", ephemeral=True)

    @tree.command(name="slow", description="Think first, answer later")
    async def slow(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.followup.send("done thinking")

    @tree.command(name="pick", description="Pick a model")
    async def pick(interaction: discord.Interaction, model: str) -> None:
        await interaction.response.send_message(f"picked {model}")

    @pick.autocomplete("model")
    async def pick_model(
        interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return [app_commands.Choice(name=m, value=m) for m in MODELS if current in m]


@pytest.fixture
def fake() -> Iterator[FakeDiscord]:
    with FakeDiscord() as fake, fake.point_discord_py_here():
        yield fake


@pytest.fixture
async def bot(fake: FakeDiscord) -> AsyncIterator[ThrowawayBot]:
    client = ThrowawayBot()
    running = asyncio.create_task(client.start(fake.token))
    try:
        await asyncio.wait_for(client.ready.wait(), 10)
        await client.tree.sync()
        yield client
    finally:
        await client.close()
        await running


async def _seen(fake: FakeDiscord, bot: ThrowawayBot, message_id: int) -> discord.Message:
    """The message as the bot received it over the gateway."""
    return await fake.wait_for(
        lambda: next((m for m in bot.seen if m.id == message_id), None),
        what=f"the bot to receive message {message_id}",
    )


async def test_login_reaches_on_ready_with_the_guild(fake: FakeDiscord, bot: ThrowawayBot) -> None:
    await fake.wait_ready()
    assert bot.user is not None and bot.user.id == fake.bot_id
    assert fake.identify_payload is not None
    assert fake.identify_payload["intents"] & discord.Intents(message_content=True).value
    guild = bot.get_guild(fake.guild_id)
    assert guild is not None
    assert {c.name for c in guild.text_channels} == {"general", "random"}
    assert guild.me.guild_permissions.send_messages
    assert not guild.me.guild_permissions.administrator
    assert fake.unhandled == []


async def test_bot_sees_what_a_member_says(fake: FakeDiscord, bot: ThrowawayBot) -> None:
    message_id = fake.user_says(fake.general_id, fake.member, "hello there", mentions_bot=True)

    message = await _seen(fake, bot, message_id)
    assert message.content == f"<@{fake.bot_id}> hello there"
    assert isinstance(message.author, discord.Member)
    assert message.author.id == fake.member_id
    assert message.channel.id == fake.general_id
    assert bot.user in message.mentions


async def test_send_edit_reply_and_typing_are_recorded(
    fake: FakeDiscord, bot: ThrowawayBot
) -> None:
    question_id = fake.user_says(fake.general_id, fake.admin, "what is 2+2?")
    channel = bot.get_channel(fake.general_id)
    assert isinstance(channel, discord.TextChannel)

    async with channel.typing():
        draft = await channel.send("thinking")
        await draft.edit(content="it is 4")
    question = await channel.fetch_message(question_id)
    reply = await question.reply("four, to be exact", mention_author=False)
    log = await channel.send("log", file=discord.File(io.BytesIO(b"2+2=4"), "log.txt"))

    assert fake.typing_calls == [fake.general_id]
    said = fake.messages_in(fake.general_id)
    assert [m.id for m in said] == [question_id, draft.id, reply.id, log.id]
    assert said[1].history == ["thinking", "it is 4"] and said[1].edited
    assert said[2].reply_to == question_id
    assert said[2].allowed_mentions is not None
    assert said[2].allowed_mentions["replied_user"] is False
    assert fake.attachment_data(said[3].attachments[0]) == b"2+2=4"
    await _seen(fake, bot, reply.id)  # Discord echoes the bot's own posts
    assert fake.unhandled == []


async def test_threads_from_a_message_and_on_their_own(
    fake: FakeDiscord, bot: ThrowawayBot
) -> None:
    message_id = fake.user_says(fake.general_id, fake.member, "let's talk about cats")
    channel = bot.get_channel(fake.general_id)
    assert isinstance(channel, discord.TextChannel)

    thread = await (await channel.fetch_message(message_id)).create_thread(name="cats")
    await thread.send("meow")
    side = await channel.create_thread(name="dogs", type=discord.ChannelType.public_thread)
    user_thread = fake.create_thread(fake.random_id, "birds")

    assert thread.id == message_id
    assert [m.content for m in fake.bot_messages(thread.id)] == ["meow"]
    assert side.parent_id == fake.general_id
    await fake.wait_for(lambda: bot.get_channel(user_thread), what="THREAD_CREATE to arrive")


async def test_a_channel_overwrite_denying_threads_is_refused_like_discord(
    fake: FakeDiscord, bot: ThrowawayBot
) -> None:
    message_id = fake.user_says(fake.general_id, fake.member, "thread me")
    channel = bot.get_channel(fake.general_id)
    assert isinstance(channel, discord.TextChannel)
    fake.set_permission_overwrite(fake.general_id, fake.bot_id, deny=Perm.CREATE_PUBLIC_THREADS)
    await fake.wait_for(
        lambda: not channel.permissions_for(channel.guild.me).create_public_threads,
        what="CHANNEL_UPDATE to carry the overwrite",
    )

    message = await channel.fetch_message(message_id)
    with pytest.raises(discord.Forbidden) as from_message:
        await message.create_thread(name="no")
    with pytest.raises(discord.Forbidden) as on_its_own:
        await channel.create_thread(name="no", type=discord.ChannelType.public_thread)
    other = bot.get_channel(fake.random_id)
    assert isinstance(other, discord.TextChannel)
    await other.create_thread(name="yes", type=discord.ChannelType.public_thread)

    for refused in (from_message.value, on_its_own.value):
        assert (refused.status, refused.code, refused.text) == (403, 50013, "Missing Permissions")
    assert fake.messages_in(message_id) == []


async def test_thread_renames_are_recorded_and_checked_like_discord(
    fake: FakeDiscord, bot: ThrowawayBot
) -> None:
    channel = bot.get_channel(fake.general_id)
    assert isinstance(channel, discord.TextChannel)
    thread = await channel.create_thread(name="first", type=discord.ChannelType.public_thread)
    renamed = await thread.edit(name="second")
    assert renamed.name == "second"
    for name in ("", "x" * 101):
        with pytest.raises(discord.HTTPException) as refused:
            await thread.edit(name=name)
        assert (refused.value.status, refused.value.code) == (400, 50035)
    with pytest.raises(discord.HTTPException) as unsupported:
        await thread.edit(name="third", locked=True)  # beyond this fake: refused, not ignored
    assert unsupported.value.status == 400
    fake.rename_thread(thread.id, "a person's name", by=fake.admin)
    with pytest.raises(DiscordError, match="Missing Permissions"):  # not the owner, no right
        fake.rename_thread(thread.id, "a member's name", by=fake.member)
    assert fake.thread_names(thread.id) == ["first", "second", "a person's name"]
    await fake.wait_for(
        lambda: getattr(bot.get_channel(thread.id), "name", None) == "a person's name",
        what="THREAD_UPDATE to arrive",
    )
    fake.refuse_next("PATCH", f"/channels/{thread.id}", 403, 50013, "Missing Permissions")
    with pytest.raises(discord.Forbidden):
        await thread.edit(name="refused once")
    await thread.edit(name="then allowed")
    assert fake.thread_names(thread.id)[-1] == "then allowed"


async def test_uploaded_files_are_checked_like_discord(
    fake: FakeDiscord, bot: ThrowawayBot
) -> None:
    channel = bot.get_channel(fake.general_id)
    assert isinstance(channel, discord.TextChannel)
    big = io.BytesIO(b"x" * (ATTACHMENT_SIZE_LIMIT + 1))
    with pytest.raises(discord.HTTPException) as too_big:
        await channel.send("big", file=discord.File(big, "big.bin"))
    assert (too_big.value.status, too_big.value.code) == (413, 40005)
    route = Route("POST", "/channels/{channel_id}/messages", channel_id=channel.id)
    many: list[dict[str, Any]] = [{"name": "payload_json", "value": '{"content": "x"}'}]
    many += [{"name": f"files[{i}]", "value": b"x", "filename": f"{i}.txt"} for i in range(11)]
    unlisted: list[dict[str, Any]] = [
        {"name": "payload_json", "value": '{"content": "x", "attachments": [{"id": 1}]}'},
        {"name": "files[0]", "value": b"data", "filename": "a.txt"},
    ]
    for form in (many, unlisted):
        with pytest.raises(discord.HTTPException) as refused:
            await bot.http.request(route, form=form)
        assert (refused.value.status, refused.value.code) == (400, 50035)
    assert len(fake.refused) == 3 and fake.messages_in(fake.general_id) == []
    sent = await channel.send("fine", file=discord.File(io.BytesIO(b"ok"), "ok.txt"))
    assert fake.attachment_data(fake.message(sent.id).attachments[0]) == b"ok"


async def test_command_syncs_with_its_permissions(fake: FakeDiscord, bot: ThrowawayBot) -> None:
    commands = {c["name"]: c for c in fake.commands()}

    assert set(commands) == {"settings", "slow", "pick"}
    manage_guild = discord.Permissions(manage_guild=True).value
    assert commands["settings"]["default_member_permissions"] == str(manage_guild)
    assert commands["settings"]["dm_permission"] is False


async def test_admin_only_command_is_refused_to_a_member(
    fake: FakeDiscord, bot: ThrowawayBot
) -> None:
    with pytest.raises(CommandRefused):
        fake.invoke("settings", user=fake.member, channel_id=fake.general_id)
    with pytest.raises(CommandRefused):
        fake.invoke("settings", user=fake.admin, channel_id=fake.dm_channel(fake.admin))
    with pytest.raises(CommandRefused):
        fake.invoke("never-synced", user=fake.admin, channel_id=fake.general_id)

    interaction_id = fake.invoke("settings", user=fake.admin, channel_id=fake.general_id)
    reply = await fake.wait_interaction_reply(interaction_id)

    assert reply.ephemeral and reply.content == "settings changed"
    assert fake.messages_in(fake.general_id) == []  # nobody else sees an ephemeral reply
    assert [event for event, _ in fake.dispatched].count("INTERACTION_CREATE") == 1


async def test_deferred_reply_then_followup(fake: FakeDiscord, bot: ThrowawayBot) -> None:
    interaction_id = fake.invoke("slow", user=fake.member, channel_id=fake.general_id)

    reply = await fake.wait_interaction_reply(interaction_id)

    assert reply.deferred and reply.response_types == [5]
    assert reply.text == "done thinking" and not reply.ephemeral


async def test_options_arrive_and_autocomplete_offers_choices(
    fake: FakeDiscord, bot: ThrowawayBot
) -> None:
    choices = await fake.autocomplete("pick", "model", "gpt", fake.member, fake.general_id)
    interaction_id = fake.invoke(
        "pick", {"model": "openai/gpt-4o"}, user=fake.member, channel_id=fake.general_id
    )

    assert [c["value"] for c in choices] == ["openai/gpt-5.1", "openai/gpt-4o"]
    reply = await fake.wait_interaction_reply(interaction_id)
    assert reply.content == "picked openai/gpt-4o"
    assert [m.content for m in fake.bot_messages(fake.general_id)] == ["picked openai/gpt-4o"]


async def test_too_long_message_is_refused_like_discord(
    fake: FakeDiscord, bot: ThrowawayBot
) -> None:
    channel = bot.get_channel(fake.general_id)
    assert isinstance(channel, discord.TextChannel)

    with pytest.raises(discord.HTTPException) as refused:
        await channel.send("x" * 2001)

    assert (refused.value.status, refused.value.code) == (400, 50035)
    assert "content" in fake.refused[0].errors
    assert fake.messages_in(fake.general_id) == []


async def test_channel_history_pages_like_discord(fake: FakeDiscord, bot: ThrowawayBot) -> None:
    said = [fake.user_says(fake.general_id, fake.member, f"message {i}") for i in range(5)]
    channel = bot.get_channel(fake.general_id)
    assert isinstance(channel, discord.TextChannel)

    before = [m.id async for m in channel.history(limit=2, before=discord.Object(said[3]))]
    after = [m.id async for m in channel.history(limit=2, after=discord.Object(said[0]))]
    newest = [m.id async for m in channel.history(limit=3)]

    assert before == [said[2], said[1]]  # newest first, the ones just before
    assert after == [said[1], said[2]]  # the ones just after (discord.py reorders them)
    assert newest == [said[4], said[3], said[2]]
    assert [r.query for r in fake.history_reads(fake.general_id)] == [
        {"limit": "2", "before": str(said[3])},
        {"limit": "2", "after": str(said[0])},
        {"limit": "3"},
    ]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"before": "soon"}, "before"),
        ({"before": 5, "after": 1}, "before"),
    ],
)
async def test_a_bad_history_query_is_refused_like_discord(
    fake: FakeDiscord, bot: ThrowawayBot, query: dict[str, Any], field: str
) -> None:
    route = Route("GET", "/channels/{channel_id}/messages", channel_id=fake.general_id)
    with pytest.raises(discord.HTTPException) as refused:
        await bot.http.request(route, params=query)
    assert (refused.value.status, refused.value.code) == (400, 50035)
    assert field in str(refused.value.text)


async def test_history_without_read_message_history_is_empty(
    fake: FakeDiscord, bot: ThrowawayBot
) -> None:
    fake.user_says(fake.general_id, fake.member, "hidden")
    fake.set_permission_overwrite(fake.general_id, fake.bot_id, deny=Perm.READ_MESSAGE_HISTORY)
    channel = bot.get_channel(fake.general_id)
    assert isinstance(channel, discord.TextChannel)
    assert [m async for m in channel.history(limit=10)] == []


async def test_a_thread_from_a_members_message_starts_with_a_reference_to_it(
    fake: FakeDiscord, bot: ThrowawayBot
) -> None:
    topic = fake.user_says(fake.general_id, fake.member, "let's talk about cats")
    thread_id = fake.create_thread(fake.general_id, "cats", from_message=topic)
    thread = await fake.wait_for(lambda: bot.get_channel(thread_id), what="THREAD_CREATE")
    assert isinstance(thread, discord.Thread)

    [starter] = [m async for m in thread.history(limit=10)]
    assert thread_id == topic and starter.type is discord.MessageType.thread_starter_message
    original = starter.reference.resolved if starter.reference else None
    assert isinstance(original, discord.Message) and original.content == "let's talk about cats"


async def test_dm_and_attachment_reach_the_bot(fake: FakeDiscord, bot: ThrowawayBot) -> None:
    notes = fake.add_attachment("notes.txt", b"remember the milk", "text/plain")
    dm = fake.dm_channel(fake.member)

    said = fake.user_says(dm, fake.member, "read this", attachments=[notes])
    message = await _seen(fake, bot, said)
    await message.channel.send("got it")

    assert message.guild is None and isinstance(message.channel, discord.DMChannel)
    assert await message.attachments[0].read() == b"remember the milk"
    assert [m.content for m in fake.bot_messages(dm)] == ["got it"]


async def test_session_resumes_and_replays_missed_events(
    fake: FakeDiscord, bot: ThrowawayBot
) -> None:
    fake.request_reconnect()
    message_id = fake.user_says(fake.general_id, fake.member, "said while reconnecting")

    await _seen(fake, bot, message_id)
    await asyncio.wait_for(bot.resumed.wait(), 5)
    assert fake.resumes == 1
    assert [m.id for m in bot.seen].count(message_id) == 1  # replayed, not duplicated


async def test_unknown_route_is_404_and_recorded(fake: FakeDiscord, bot: ThrowawayBot) -> None:
    with pytest.raises(discord.NotFound):
        await bot.http.request(Route("GET", "/guilds/{guild_id}/bans", guild_id=fake.guild_id))

    assert fake.unhandled == [f"GET /api/v10/guilds/{fake.guild_id}/bans"]


async def test_without_the_content_intent_only_mentions_carry_content(
    fake: FakeDiscord,
) -> None:
    client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.1)
    seen: list[discord.Message] = []
    client.event(_recorder(seen))
    running = asyncio.create_task(client.start(fake.token))
    try:
        await fake.wait_ready()
        fake.user_says(fake.general_id, fake.member, "private thoughts")
        fake.user_says(fake.general_id, fake.member, "hey bot", mentions_bot=True)
        await fake.wait_for(lambda: len(seen) == 2, what="both messages to arrive")
    finally:
        await client.close()
        await running

    assert [m.content for m in seen] == ["", f"<@{fake.bot_id}> hey bot"]


def _recorder(
    seen: list[discord.Message],
) -> Callable[[discord.Message], Coroutine[Any, Any, None]]:
    async def on_message(message: discord.Message) -> None:
        seen.append(message)

    return on_message


async def test_wrong_token_is_a_login_failure(fake: FakeDiscord) -> None:
    client = discord.Client(intents=discord.Intents.default())
    try:
        with pytest.raises(discord.LoginFailure):
            await client.login("not-the-token")
    finally:
        await client.close()


async def test_a_privileged_intent_not_switched_on_closes_the_gateway_with_4014() -> None:
    with FakeDiscord(portal_intents=Intent.GUILD_MEMBERS) as fake, fake.point_discord_py_here():
        wanting_content = ThrowawayBot()
        try:
            with pytest.raises(discord.PrivilegedIntentsRequired):
                await asyncio.wait_for(wanting_content.start(fake.token), 10)
        finally:
            await wanting_content.close()
        assert fake.connected_sessions == 0

        without_content = discord.Client(intents=discord.Intents.default())
        running = asyncio.create_task(without_content.start(fake.token))
        try:
            await fake.wait_ready()
        finally:
            await without_content.close()
            await running


def test_ci_checks_requests_against_discords_spec() -> None:
    """Outside this workplace the spec may be absent (it is not ours to commit) and only the
    loose limits apply; in CI its absence would silently weaken every Discord test."""
    import os

    from tests.fakes.discord_validation import SPEC_PATH

    if os.environ.get("CI"):
        assert SPEC_PATH.is_file(), f"Discord's OpenAPI spec is missing at {SPEC_PATH}"
