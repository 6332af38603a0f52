"""The container recipe: the image the Dockerfile describes starts and stops with the
one-line settings error, runs as a non-root user and carries no secret.

No container daemon runs here, so the test builds the same environment the Dockerfile
describes: the same Python minor version as its base image, the files its COPY lines copy,
its ENV, and its install commands run exactly as written, in a fresh venv. The Dockerfile is
linted by hadolint in `.ci/run`."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

Instruction = tuple[str, str]


def instructions(path: Path) -> list[Instruction]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    found: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        name, _, rest = line.partition(" ")
        found.append((name.upper(), rest.strip()))
    return found


def base_python(recipe: list[Instruction]) -> tuple[int, int]:
    (image,) = [args for name, args in recipe if name == "FROM"]
    repository, _, tag = image.partition(":")
    assert repository == "python", image
    major, minor = tag.split("-")[0].split(".")[:2]
    return int(major), int(minor)


def env_of(recipe: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for name, args in recipe:
        if name == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_the_image_runs_python_m_bot_as_a_user_with_no_secret_inside() -> None:
    recipe = instructions(ROOT / "Dockerfile")
    assert [args for name, args in recipe if name == "CMD"] == ['["python", "-m", "bot"]']
    (user,) = [args for name, args in recipe if name == "USER"]
    assert user not in ("root", "0")
    copied = [args.split()[:-1] for name, args in recipe if name in ("COPY", "ADD")]
    assert all(source not in (".", ".env") for sources in copied for source in sources)
    assert not any(
        word in key for key in env_of(recipe) for word in ("TOKEN", "KEY", "SECRET", "PASSWORD")
    )
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored  # a context copy of the whole tree would still leave it out


def test_compose_runs_the_bot_beside_redis_that_keeps_and_never_evicts_sessions() -> None:
    compose = (ROOT / "compose.yaml").read_text()
    assert '"--appendonly", "yes"' in compose
    assert '"--maxmemory-policy", "noeviction"' in compose
    assert "REDIS_URL: redis://redis:6379/0" in compose
    assert "env_file: .env" in compose


@pytest.mark.timeout(900)
def test_the_environment_the_dockerfile_describes_stops_with_the_one_line_settings_error(
    tmp_path: Path,
) -> None:
    recipe = instructions(ROOT / "Dockerfile")
    wanted = base_python(recipe)
    assert sys.version_info[:2] == wanted, (
        f"the Dockerfile's base image is Python {wanted}; this machine runs "
        f"{sys.version_info[:2]}, so it cannot stand in for the image"
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    app = tmp_path / "app"
    app.mkdir()
    image_env = env_of(recipe)
    path = f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"
    build_env = {**os.environ, **image_env, "PATH": path, "VIRTUAL_ENV": str(venv)}
    for secret in ("DISCORD_TOKEN", "DEDALUS_API_KEY", "REDIS_URL"):
        build_env.pop(secret, None)
    not_run: list[str] = []
    for name, args in recipe:
        if name == "COPY":
            *sources, target = args.split()
            for source in sources:
                destination = (
                    app / target / Path(source).name if target.endswith("/") else (app / target)
                )
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, destination, ignore=_no_caches)
                else:
                    shutil.copy(ROOT / source, destination)
        elif name == "RUN":
            if args.split()[0] in ("pip", "python"):
                done = subprocess.run(
                    ["bash", "-c", args], cwd=app, env=build_env, capture_output=True, text=True
                )
                assert done.returncode == 0, done.stderr[-3000:]
            else:
                not_run.append(args)
    # Creating the image's user is all that is left out: it changes nothing the bot runs on.
    assert [args.split()[0] for args in not_run] == ["useradd"]

    run_env = {**image_env, "PATH": path, "HOME": str(tmp_path)}
    done = subprocess.run(
        ["python", "-m", "bot"], cwd=app, env=run_env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: DISCORD_TOKEN is not set")


def _no_caches(_: str, names: list[str]) -> list[str]:
    return [name for name in names if name == "__pycache__"]
