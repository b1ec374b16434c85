"""Importers for the constitution formats people already have (see ``import_constitution``).

The public formats carry no placeholders, so imported text has its braces escaped; the
judge question (or critique and revision requests) a format lacks is derived generically
from what it has, and such principles are tagged ``judge-derived`` / ``critique-derived``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from factory.constitution import Constitution, ConstitutionError, _read, _validate, load_constitution
from factory.inputs import YAML_KINDS, kind


def _literal(text: str) -> str:
    """Imported text has no placeholders: escape every brace."""
    return text.replace("{", "{{").replace("}", "}}")


def _judge_from_critique(request: str) -> str:
    return (f'A reviewer will critique each response with this request:\n"{request}"\n'
            "Which response gives that reviewer less to object to?")


def _critique_from_judge(question: str) -> str:
    return (f'Your previous response will be compared with other answers by asking:\n"{question}"\n'
            "Critique your previous response from that point of view: say specifically where it would lose.")


def _revision_from_judge(question: str) -> str:
    return (f'Rewrite your previous response so that it would win when compared by asking:\n"{question}"\n'
            "Fix what the critique found, and reply with the rewritten response only.")


def _strings(obj: Any, keys: tuple[str, ...], where: str) -> list[str]:
    """The values of exactly ``keys`` in a JSON object, each a non-empty string."""
    if not isinstance(obj, dict):
        raise ConstitutionError(f"{where}: expected an object with keys {', '.join(keys)}, got {kind(obj, YAML_KINDS)}")
    for k in obj.keys() - set(keys):
        raise ConstitutionError(f"{where}.{k}: unexpected key; expected {', '.join(keys)}")
    for k in keys:
        if not isinstance(obj.get(k), str):
            raise ConstitutionError(f"{where}.{k}: expected a string, got {kind(obj.get(k), YAML_KINDS)}")
        if not obj[k].strip():
            raise ConstitutionError(f"{where}.{k}: must not be empty")
    return [obj[k] for k in keys]


def _from_critic_revision(data: dict) -> tuple[list[dict], list[dict], str]:
    for k in data.keys() - {"constitutions", "system_chat"}:
        raise ConstitutionError(f"{k}: unexpected key; expected constitutions, system_chat")
    entries, chats = data["constitutions"], data.get("system_chat", [])
    if not isinstance(entries, list) or not entries:
        got = "an empty list" if entries == [] else kind(entries, YAML_KINDS)
        raise ConstitutionError(f"constitutions: expected a list of {{critic, revision}} objects, got {got}")
    if not isinstance(chats, list):
        raise ConstitutionError(f"system_chat: expected a list of conversations, got {kind(chats, YAML_KINDS)}")
    principles, by_request = [], {}
    for i, entry in enumerate(entries):
        critic, revision = (s.strip() for s in _strings(entry, ("critic", "revision"), f"constitutions[{i}]"))
        by_request.setdefault(critic, f"principle-{i + 1}")
        principles.append({"id": f"principle-{i + 1}", "critique": _literal(critic), "revision": _literal(revision),
                           "judge": _literal(_judge_from_critique(critic)), "tags": ["judge-derived"]})
    examples, roles = [], ("user", "assistant") * 3
    for i, chat in enumerate(chats):
        if not isinstance(chat, list) or len(chat) != 6:
            got = f"{len(chat)} messages" if isinstance(chat, list) else kind(chat, YAML_KINDS)
            raise ConstitutionError(f"system_chat[{i}]: expected 6 messages alternating user/assistant (prompt, response, "
                                    f"critique request, critique, revision request, revision), got {got}")
        texts = []
        for j, (msg, want) in enumerate(zip(chat, roles)):
            role, content = _strings(msg, ("role", "content"), f"system_chat[{i}][{j}]")
            if role != want:
                raise ConstitutionError(f"system_chat[{i}][{j}].role: expected {want!r}, got {role!r}")
            texts.append(content)
        prompt, response, request, critique, _, revision = texts
        examples.append({"prompt": prompt, "response": response, "critique": critique, "revision": revision,
                         "principle": by_request.get(request.strip())})
    return principles, examples, "critique/revision pairs with few-shot chats"


def _between(text: str, head: str, tail: str, where: str) -> str:
    body = text.strip()
    if not body.startswith(head):
        raise ConstitutionError(f"{where}: expected text starting with {head!r}, got {text[:40]!r}")
    body = body[len(head):].strip()
    body = body[: -len(tail)].strip() if body.endswith(tail) else body
    if not body:
        raise ConstitutionError(f"{where}: nothing between {head!r} and {tail!r}")
    return body


def _from_edit_requests(data: dict) -> tuple[list[dict], list[dict], str]:
    principles, origin = [], {}
    for key, entry in data.items():
        if not isinstance(entry, dict) or entry.keys() != {"prompt", "edit_request"}:
            got = ", ".join(entry) if isinstance(entry, dict) else kind(entry, YAML_KINDS)
            raise ConstitutionError(f"{key}: expected an object with keys prompt, edit_request, got {got}")
        prompts, edit = entry["prompt"], entry["edit_request"]
        if not isinstance(prompts, list) or len(prompts) != 1 or not isinstance(prompts[0], str):
            raise ConstitutionError(f"{key}.prompt: expected a list of one string, got {kind(prompts, YAML_KINDS)}")
        if not isinstance(edit, str):
            raise ConstitutionError(f"{key}.edit_request: expected a string, got {kind(edit, YAML_KINDS)}")
        critique = _between(prompts[0], "CritiqueRequest:", "Critique:", f"{key}.prompt[0]")
        revision = _between(edit, "RevisionRequest:", "Revision:", f"{key}.edit_request")
        pid = re.sub(r"[^a-z0-9_-]+", "-", key.strip().lower()).strip("-_")
        if not pid:
            raise ConstitutionError(f"{key!r}: cannot make a principle id from this key")
        if pid in origin:
            raise ConstitutionError(f"{key!r}: keys {origin[pid]!r} and {key!r} both become the id {pid!r}; rename one")
        origin[pid] = key
        principles.append({"id": pid, "critique": _literal(critique), "revision": _literal(revision),
                           "judge": _literal(_judge_from_critique(critique)), "tags": ["judge-derived"]})
    return principles, [], "critique and edit requests"


def _from_judge_questions(data: list) -> tuple[list[dict], list[dict], str]:
    principles = []
    for i, q in enumerate(data):
        if not isinstance(q, str) or not q.strip():
            raise ConstitutionError(f"[{i}]: expected a non-empty question, got {q!r}")
        principles.append({"id": f"judge-{i + 1}", "critique": _literal(_critique_from_judge(q.strip())),
                           "revision": _literal(_revision_from_judge(q.strip())), "judge": _literal(q.strip()),
                           "tags": ["critique-derived"]})
    return principles, [], "judge questions"


def import_constitution(path: Path, name: str | None = None) -> Constitution:
    """Read a constitution in one of the public formats (detected by shape) as a ``Constitution``."""
    path = Path(path)
    data, _ = _read(path)
    if isinstance(data, dict) and "principles" in data:  # already ours
        c = load_constitution(path)
        return c.model_copy(update={"name": name}) if name else c
    try:
        if isinstance(data, dict) and "constitutions" in data:
            principles, examples, form = _from_critic_revision(data)
        elif isinstance(data, dict) and any(isinstance(v, dict) and "edit_request" in v for v in data.values()):
            principles, examples, form = _from_edit_requests(data)
        elif isinstance(data, list) and any(isinstance(q, str) for q in data):
            principles, examples, form = _from_judge_questions(data)
        else:
            raise ConstitutionError(
                f"not a format I can import (got {kind(data, YAML_KINDS)}); expected one of:\n"
                '  {"constitutions": [{"critic": ..., "revision": ...}], "system_chat": [[{"role", "content"}, ...]]}\n'
                '  {"<id>": {"prompt": ["CritiqueRequest: ... Critique:"], "edit_request": "RevisionRequest: ... Revision:"}}\n'
                '  ["<judge question>", ...]\n'
                "  or a factory principle file (name, description, principles)")
    except ConstitutionError as e:
        raise ConstitutionError(f"{path}: {e}") from None
    built = {"name": name or path.stem, "description": f"Imported from {path.name} ({form}).",
             "principles": principles, "examples": examples}
    return _validate(built, path)
