"""The one rule for the names of variants, teams and nodes: a bounded lower-case slug.

A name becomes a directory in the model store, a URL segment of the console and a
ledger target, so it is checked here before any of those sees it. The rule keeps
every name a single, portable path component: it cannot be empty, climb (``..``),
be absolute, hold a separator, a NUL, whitespace or a look-alike letter.
"""
import re

from django.core.exceptions import ValidationError

NAME_MAX = 64
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")
RULE = f"use 1 to {NAME_MAX} lower-case letters, digits, '-' or '_', starting with a letter or digit"
SHOWN_MAX = 40  # characters of a refused name quoted back in the message (a 10k-character name is not echoed)


class InvalidName(ValueError):
    """A name is not one the box accepts; the message names the field and what is wrong."""


def _shown(value: str) -> str:
    """Return value quoted for a message, cut short when long."""
    return repr(value if len(value) <= SHOWN_MAX else value[:SHOWN_MAX] + "…")


def _problem(value: str) -> str | None:
    """Return what is wrong with value as a name, or None when it is valid."""
    if not value:
        return "it is empty"
    for char in value:
        if char == "\x00":
            return "it contains a NUL character"
        if char in "/\\":
            return f"it contains the path separator {char!r}"
        if char.isspace():
            return f"it contains whitespace ({char!r})"
        if not char.isascii():
            return f"it contains the non-ASCII character {char!r} (U+{ord(char):04X})"
        if char.isupper():
            return f"it contains the upper-case letter {char!r}"
        if not (char.isalnum() or char in "-_"):
            return f"it contains the character {char!r}"
    if len(value) > NAME_MAX:
        return f"it is {len(value)} characters long, more than {NAME_MAX}"
    if not NAME_PATTERN.match(value):
        return "it does not start with a letter or digit"
    return None


def check_name(value, *, field: str) -> str:
    """Return value when it is a valid name, else raise InvalidName naming field (e.g. "variant name")."""
    if not isinstance(value, str):
        raise InvalidName(f"{field} must be text, not {type(value).__name__}")
    problem = _problem(value)
    if problem:
        raise InvalidName(f"{field} {_shown(value)} is refused: {problem}; {RULE}")
    return value


# The engines a deployment may ask for (appliance.models.Engine holds their labels); listed here so that the
# command line, the console and the actions refuse an unknown one with the same message.
ENGINE_NAMES = ("builtin", "vllm", "sglang", "auto")


def check_engine_name(value) -> str:
    """Return value when it names a known engine, else raise InvalidName listing the known ones."""
    if value not in ENGINE_NAMES:
        shown = _shown(value) if isinstance(value, str) else type(value).__name__
        raise InvalidName(f"engine {shown} is refused: use one of {', '.join(ENGINE_NAMES)}")
    return value


def is_valid_name(value) -> bool:
    """Return whether value passes check_name."""
    return isinstance(value, str) and _problem(value) is None


def validate_variant_name(value) -> None:
    """Raise Django's ValidationError when value is not a valid variant name (model and form validator)."""
    _validate(value, "variant name")


def validate_team_name(value) -> None:
    """Raise Django's ValidationError when value is not a valid team name (model and form validator)."""
    _validate(value, "team name")


def validate_node_name(value) -> None:
    """Raise Django's ValidationError when value is not a valid node name (model validator)."""
    _validate(value, "node name")


def default_node_name(hostname: str) -> str:
    """Return the node name a host gets when APPLIANCE_NODE is unset: its short host name, lower-cased."""
    # A DNS label (letters, digits, '-') lower-cased is already a valid name; the domain would add dots.
    return hostname.split(".", 1)[0].lower()


NODE_ADDRESS_PATTERN = re.compile(r"http://([a-z0-9][a-z0-9.-]{0,252}|\[[0-9a-f:]{2,39}\]):([0-9]{1,5})\Z")


def check_node_address(value, *, field: str) -> str:
    """Return value when it is http://HOST:PORT (how other nodes reach a node's web process), else raise InvalidName."""
    rule = "use http://HOST:PORT, e.g. http://10.0.0.2:8000 (lower-case host, no path)"
    if not isinstance(value, str):
        raise InvalidName(f"{field} must be text, not {type(value).__name__}")
    match = NODE_ADDRESS_PATTERN.match(value)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise InvalidName(f"{field} {_shown(value)} is refused; {rule}")
    return value


def _validate(value, field: str) -> None:
    try:
        check_name(value, field=field)
    except InvalidName as exc:
        raise ValidationError(str(exc), code="invalid_name") from exc


# Ollama model references, NAME[:TAG] with NAME = [[HOST/]NAMESPACE/]MODEL, as Ollama's own parser
# (types/model/name.go) allows each part: each becomes a directory under the Ollama models directory.
OLLAMA_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}\Z")
OLLAMA_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,349}(:[0-9]{1,5})?\Z")
OLLAMA_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,79}\Z")
OLLAMA_DEFAULTS = ("registry.ollama.ai", "library", None, "latest")


def check_ollama_ref(value) -> tuple[str, str, str, str]:
    """Return (host, namespace, model, tag) of an Ollama reference such as llama3.2:1b, or raise InvalidName."""
    field = "Ollama model"
    if not isinstance(value, str) or not value:
        raise InvalidName(f"{field} must be NAME[:TAG], e.g. llama3.2:1b")
    if "\x00" in value or "\\" in value or any(c.isspace() for c in value) or not value.isascii():
        raise InvalidName(f"{field} {_shown(value)} is refused: only ASCII letters, digits, '.', '-', '_', "
                          "'/' between parts and ':' before the tag")
    name, tag = value, OLLAMA_DEFAULTS[3]
    last = value.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = value.rsplit(":", 1)
    parts = name.split("/")
    if len(parts) > 3:
        raise InvalidName(f"{field} {_shown(value)} is refused: at most HOST/NAMESPACE/MODEL before the tag")
    host, namespace = OLLAMA_DEFAULTS[0], OLLAMA_DEFAULTS[1]
    if len(parts) == 3:
        host, namespace, model = parts
    elif len(parts) == 2:
        namespace, model = parts
    else:
        (model,) = parts
    for part, what, pattern in ((host, "host", OLLAMA_HOST), (namespace, "namespace", OLLAMA_PART),
                                (model, "model", OLLAMA_PART), (tag, "tag", OLLAMA_TAG)):
        if not pattern.match(part) or part in (".", "..") or ".." in part:
            raise InvalidName(f"{field} {_shown(value)} is refused: its {what} {_shown(part)} is not a valid "
                              "Ollama name part")
    return host, namespace, model, tag
