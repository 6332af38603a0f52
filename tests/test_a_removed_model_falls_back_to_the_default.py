"""`ALLOWED_MODELS` can change on its own: the example settings do not pin `DEFAULT_MODEL`
(the first allowed model is the default), and a session whose model was removed from the list
is answered by the default, with a one-line note in /status and in the log."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_MODELS
from tests.discord_harness import Harness

ROOT = Path(__file__).resolve().parents[1]


def test_changing_only_allowed_models_in_the_example_settings_still_starts(
    tmp_path: Path,
) -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    changed = [
        f"ALLOWED_MODELS={TEST_MODELS[1]},{TEST_MODELS[2]}"
        if line.startswith("ALLOWED_MODELS=")
        else line
        for line in lines
    ]
    assert changed != lines
    (tmp_path / ".env").write_text("\n".join(changed) + "\n")
    said = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "sessions.json").write_text(json.dumps({"demo": said}))
    result = subprocess.run(  # an import reads every setting, as the bot does
        [sys.executable, "-m", "bot", "import", "sessions.json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


async def test_a_session_whose_model_was_removed_is_answered_by_the_default(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake, api = harness.discord, harness.api
    said = await harness.command(
        "model", {"name": TEST_MODELS[2]}, user=fake.admin, channel_id=fake.general_id
    )
    assert said == f"Switched to: {TEST_MODELS[2]}"

    harness.allowed_models = TEST_MODELS[:2]  # the admin removes it and restarts
    await harness.restart()
    status = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    assert f"Model: {TEST_MODELS[0]}" in status.splitlines()
    note = (
        f"Note: This session's model {TEST_MODELS[2]} is no longer allowed; {TEST_MODELS[0]}"
        " answers instead (/model picks another)."
    )
    assert note in status.splitlines()

    for n, text in enumerate(["first", "second"], 1):
        await harness.say(fake.general_id, fake.member, text, mentions_bot=True)
        await harness.answer(fake.general_id, n)
        assert api.last_request["model"] in (TEST_MODELS[0], [TEST_MODELS[0]])
    logged = [r.getMessage() for r in caplog.records if "no longer in ALLOWED_MODELS" in r.message]
    assert logged == [
        f"sessions stored with model {TEST_MODELS[2]}, no longer in ALLOWED_MODELS, are "
        f"answered by {TEST_MODELS[0]}"
    ]  # once, not once per turn

    listed = await harness.command("model", user=fake.admin, channel_id=fake.general_id)
    assert f"* 1. {TEST_MODELS[0]}" in listed

    harness.allowed_models = TEST_MODELS  # allowed again: the session's own choice is back
    await harness.restart()
    await harness.say(fake.general_id, fake.member, "third", mentions_bot=True)
    await harness.answer(fake.general_id, 3)
    assert api.last_request["model"] in (TEST_MODELS[2], [TEST_MODELS[2]])
    status = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    assert f"Model: {TEST_MODELS[2]}" in status and "Note:" not in status
