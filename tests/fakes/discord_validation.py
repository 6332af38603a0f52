"""Refuse request bodies the way Discord does, so a bot that passes here passes there.

Bodies are checked against the `requestBody` schemas of Discord's own OpenAPI description
(kept outside the project in `../shared/reference/`), plus the limits that document leaves
looser than the real API (2,000 characters of bot message content, embed sizes). When the
document is missing the schema part is skipped and only those limits apply.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[3] / "shared" / "reference" / "discord-openapi.json"
_SPEC_URI = "urn:discord:openapi"

MAX_CONTENT = 2000
MAX_EMBED_DESCRIPTION = 4096
MAX_EMBEDS_TOTAL = 6000
MAX_CHOICES = 25
MAX_COMMAND_DESCRIPTION = 100
MAX_CHANNEL_NAME = 100

# The spec writes snowflakes as strings only, but Discord (and discord.py, which sends e.g.
# `message_reference.message_id` as an int) also uses JSON integers for them.
_SNOWFLAKE = {
    "anyOf": [
        {"type": "string", "pattern": "^(0|[1-9][0-9]*)$"},
        {"type": "integer", "minimum": 0},
    ]
}


@functools.cache
def _registry() -> Registry | None:
    """Load the spec once per process; None when it is not on this machine."""
    if not SPEC_PATH.is_file():
        return None
    spec = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    spec["components"]["schemas"]["SnowflakeType"] = _SNOWFLAKE
    resource: Resource[Any] = Resource.from_contents(spec, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(_SPEC_URI, resource)
    return registry


@functools.cache
def _validator(spec_path: str, method: str) -> Draft202012Validator | None:
    registry = _registry()
    if registry is None:
        return None
    paths = registry.contents(_SPEC_URI)["paths"]
    body = paths.get(spec_path, {}).get(method, {}).get("requestBody", {})
    if "application/json" not in body.get("content", {}):
        return None
    pointer = spec_path.replace("~", "~0").replace("/", "~1")
    ref = f"{_SPEC_URI}#/paths/{pointer}/{method}/requestBody/content/application~1json/schema"
    return Draft202012Validator({"$ref": ref}, registry=registry)


def spec_available() -> bool:
    return _registry() is not None


def _deepest(errors: Iterable[ValidationError]) -> ValidationError | None:
    """The error nearest to the offending field, descending through anyOf/oneOf unions.

    `best_match` stops at a union's root ("is not valid under any of the given schemas"),
    which tells a test author nothing. The branch with the fewest errors is the one the body
    meant (a 26-choice autocomplete answer fails the string-choices branch once, the
    integer-choices branch 26 times), unless its `type` discriminator says it is not; within
    it, the deepest error names the field.
    """

    def wrong_kind(errs: list[ValidationError]) -> bool:
        return any(
            e.validator in ("enum", "const") and list(e.absolute_path)[-1:] == ["type"]
            for e in errs
        )

    error = best_match(errors)
    while error is not None and error.context:
        branches: dict[Any, list[ValidationError]] = {}
        for candidate in error.context:
            branches.setdefault(candidate.schema_path[0], []).append(candidate)
        branch = min(
            branches.values(),
            key=lambda errs: (
                wrong_kind(errs),
                len(errs),
                -max(len(e.absolute_path) for e in errs),
            ),
        )
        error = max(branch, key=lambda e: len(e.absolute_path))
    return error


def _discord_wording(error: ValidationError) -> tuple[str, str]:
    """Discord's code and message for the common cases; the value itself is never echoed."""
    limit = error.validator_value
    if error.validator in ("maxLength", "maxItems"):
        return "BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length."
    if error.validator in ("minLength", "minItems"):
        return "BASE_TYPE_MIN_LENGTH", f"Must be {limit} or more in length."
    if error.validator == "required":
        return "BASE_TYPE_REQUIRED", "This field is required"
    return f"SCHEMA_{str(error.validator).upper()}", error.message[:200]


def _error_tree(path: Iterable[str | int], code: str, message: str) -> dict[str, Any]:
    """Discord's nested `errors` shape: {"embeds": {"0": {"description": {"_errors": [...]}}}}."""
    tree: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
    for part in reversed(list(path)):
        tree = {str(part): tree}
    return tree


def _merge(into: dict[str, Any], tree: dict[str, Any]) -> None:
    for key, value in tree.items():
        if key == "_errors":
            into.setdefault("_errors", []).extend(value)
        else:
            _merge(into.setdefault(key, {}), value)


def _message_limits(body: dict[str, Any], prefix: tuple[str | int, ...]) -> list[dict[str, Any]]:
    trees = []
    content = body.get("content")
    if isinstance(content, str) and len(content) > MAX_CONTENT:
        trees.append(
            _error_tree(
                (*prefix, "content"),
                "BASE_TYPE_MAX_LENGTH",
                f"Must be {MAX_CONTENT} or fewer in length.",
            )
        )
    embeds = body.get("embeds") or []
    total = 0
    for index, embed in enumerate(embeds if isinstance(embeds, list) else []):
        if not isinstance(embed, dict):
            continue
        description = embed.get("description") or ""
        if len(description) > MAX_EMBED_DESCRIPTION:
            trees.append(
                _error_tree(
                    (*prefix, "embeds", index, "description"),
                    "BASE_TYPE_MAX_LENGTH",
                    f"Must be {MAX_EMBED_DESCRIPTION} or fewer in length.",
                )
            )
        total += len(description) + len(embed.get("title") or "")
        total += len((embed.get("footer") or {}).get("text") or "")
        total += len((embed.get("author") or {}).get("name") or "")
        for field in embed.get("fields") or []:
            total += len(field.get("name") or "") + len(field.get("value") or "")
    if total > MAX_EMBEDS_TOTAL:
        trees.append(
            _error_tree(
                (*prefix, "embeds"),
                "MAX_EMBED_SIZE_EXCEEDED",
                f"Embed size exceeds maximum size of {MAX_EMBEDS_TOTAL}",
            )
        )
    return trees


def _extra_limits(spec_path: str, body: Any) -> list[dict[str, Any]]:
    """The real API's limits that the spec leaves looser (or does not state at all)."""
    if spec_path.endswith("/commands") and isinstance(body, list):
        trees = []
        for index, command in enumerate(body):
            description = command.get("description") if isinstance(command, dict) else None
            if isinstance(description, str) and len(description) > MAX_COMMAND_DESCRIPTION:
                trees.append(
                    _error_tree(
                        (index, "description"),
                        "BASE_TYPE_BAD_LENGTH",
                        f"Must be between 1 and {MAX_COMMAND_DESCRIPTION} in length.",
                    )
                )
        return trees
    if not isinstance(body, dict):
        return []
    if spec_path == "/channels/{channel_id}":
        name = body.get("name")
        if isinstance(name, str) and not 1 <= len(name) <= MAX_CHANNEL_NAME:
            message = f"Must be between 1 and {MAX_CHANNEL_NAME} in length."
            return [_error_tree(("name",), "BASE_TYPE_BAD_LENGTH", message)]
        return []
    if spec_path.endswith("/callback"):
        data = body.get("data")
        if not isinstance(data, dict):
            return []
        choices = data.get("choices")
        if isinstance(choices, list) and len(choices) > MAX_CHOICES:
            return [
                _error_tree(
                    ("data", "choices"),
                    "BASE_TYPE_MAX_LENGTH",
                    f"Must be {MAX_CHOICES} or fewer in length.",
                )
            ]
        return _message_limits(data, ("data",))
    if "/messages" in spec_path or spec_path.startswith("/webhooks/"):
        return _message_limits(body, ())
    return []


def body_errors(spec_path: str, method: str, body: Any) -> dict[str, Any] | None:
    """Discord's `errors` object for a refused body, or None when Discord would accept it.

    `spec_path` is the spec's route template (e.g. `/channels/{channel_id}/messages`).
    """
    errors: dict[str, Any] = {}
    for tree in _extra_limits(spec_path, body):
        _merge(errors, tree)
    validator = _validator(spec_path, method.lower())
    error = None if validator is None else _deepest(validator.iter_errors(body))
    if error is not None:
        path = list(error.absolute_path)
        if error.validator == "required" and isinstance(error.instance, dict):
            path += [k for k in error.validator_value if k not in error.instance][:1]
        tree = _error_tree(path, *_discord_wording(error))
        node: Any = errors
        for part in path:
            node = node.get(str(part), {}) if isinstance(node, dict) else {}
        if "_errors" not in node:  # our own limit already named this field
            _merge(errors, tree)
    return errors or None
