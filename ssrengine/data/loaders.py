"""Converters from public content-grounded QA formats into records (the format of `ssrengine.data.records`).

Every converter returns a list of record dicts that already passed `parse_record`, with ids that
are unique per file. Malformed input raises InputError naming the file, the line (JSONL) or
the JSON path of the record (JSON), and the field.

- MultiDoc2Dial v1.0 (Feng et al., EMNLP 2021): one example per agent turn. An agent turn is
  unanswerable when its dialogue act is ``respond_no_solution`` or it has no references (the
  dataset README: "references is empty if a turn is for indicating previous user query not
  answerable or irrelevant to the document"). Its response stays the agent's own utterance
  unless ``refusal`` is given.
- Natural Questions, simplified JSONL (optionally .gz): unanswerable when no long answer.
- MuSiQue v1.0 (ans or full): supporting paragraphs plus seeded distractors.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from ssrengine.core.errors import InputError
from ssrengine.core.io import iter_jsonl
from ssrengine.data.builtin import GOLD_REFUSAL
from ssrengine.data.records import parse_record

_HTML_TOKEN = re.compile(r"^</?[A-Za-z][^>]*>$")
_DETOK = re.compile(r" (?=[.,;:!?)%]|'s\b|n't\b)|(?<=\() ")


def _rng(seed: int, key: str) -> random.Random:
    # Per example, so the choice for one example does not depend on which others are converted.
    return random.Random(f"{seed}:{key}")


def _checked(records: list[dict[str, Any]], file: str, where: list[Any]) -> list[dict[str, Any]]:
    """parse_record on every output (a converter bug or odd input surfaces here, located)."""
    for rec, loc in zip(records, where):
        line = loc if isinstance(loc, int) else None
        try:
            parse_record(rec, file=file, line=line)  # type: ignore[arg-type]
        except InputError as e:
            src = "" if line is not None else f" (from {loc})"
            raise InputError(f"{e.message}{src}", file=file, line=line, field=e.field) from None
    return records


def _require(
    obj: dict[str, Any],
    key: str,
    typ: type | tuple[type, ...],
    *,
    file: str,
    line: int | None = None,
    path: str = "",
) -> Any:
    """obj[key] with the right type, or an InputError naming the field (JSON path if no line)."""
    fld = f"{path}.{key}" if path else key
    if not isinstance(obj, dict) or key not in obj:
        raise InputError("missing", file=file, line=line, field=fld)
    val = obj[key]
    if not isinstance(val, typ) or (isinstance(val, bool) and typ is not bool):
        want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise InputError(
            f"expected {want}, got {type(val).__name__}", file=file, line=line, field=fld
        )
    return val


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError("file not found", file=str(path))
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON: {e.msg}", file=str(path), line=e.lineno) from None


# ---------------------------------------------------------------------------- MultiDoc2Dial


def _md2d_passage(doc: dict[str, Any], span_ids: list[str], passage: str) -> str:
    """The document text, or (passage="section") the sections holding the referenced spans."""
    spans = doc.get("spans") or {}
    secs = {}
    for sid in span_ids:
        sp = spans.get(sid)
        if isinstance(sp, dict) and isinstance(sp.get("text_sec"), str):
            secs[sp.get("start_sec", 0)] = sp["text_sec"].strip()
    if passage == "document" or not secs:
        return doc["doc_text"].strip()
    return " ".join(secs[k] for k in sorted(secs))


def _md2d_title(doc: dict[str, Any]) -> str:
    return str(doc.get("title") or doc.get("doc_id") or "").split("#")[0].strip()


def _md2d_check(dial: Any, path: str, docs: dict[str, Any], file: str) -> list[dict[str, Any]]:
    """The dialogue's turns, each checked: role, utterance, references to known documents."""
    _require(dial, "dial_id", (str, int), file=file, path=path)
    turns = _require(dial, "turns", list, file=file, path=path)
    for ti, t in enumerate(turns):
        tp = f"{path}.turns[{ti}]"
        role = _require(t, "role", str, file=file, path=tp)
        if role not in ("user", "agent"):
            msg = f"expected 'user' or 'agent', got {role!r}"
            raise InputError(msg, file=file, field=f"{tp}.role")
        _require(t, "utterance", str, file=file, path=tp)
        refs = t.get("references") or []
        if not isinstance(refs, list):
            raise InputError("expected a list", file=file, field=f"{tp}.references")
        for ri, r in enumerate(refs):
            doc_id = _require(r, "doc_id", str, file=file, path=f"{tp}.references[{ri}]")
            if doc_id not in docs:
                msg = f"unknown document {doc_id!r} (not in the doc file for this domain)"
                raise InputError(msg, file=file, field=f"{tp}.references[{ri}].doc_id")
    return turns


def _md2d_history(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    """user -> user, agent -> assistant; one role in a row is merged (Mistral-style templates
    reject non-alternating roles)."""
    messages: list[dict[str, str]] = []
    for t in turns:
        text = t["utterance"].strip()
        role = "user" if t["role"] == "user" else "assistant"
        if not text:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += " " + text
        else:
            messages.append({"role": role, "content": text})
    return messages


def _md2d_documents(
    turns: list[dict[str, Any]],
    ti: int,
    docs: dict[str, Any],
    rng: random.Random,
    distractors: int,
    passage: str,
) -> list[dict[str, str]]:
    # This turn's references, else the nearest earlier turn's, else the nearest later turn's.
    order = [*range(ti, -1, -1), *range(ti + 1, len(turns))]
    refs = next((turns[j]["references"] for j in order if turns[j].get("references")), [])
    by_doc: dict[str, list[str]] = {}
    for r in refs:
        by_doc.setdefault(r["doc_id"], []).append(str(r.get("id_sp", "")))
    chosen = list(by_doc.items())
    others = sorted(d for d in docs if d not in by_doc)
    for d in rng.sample(others, min(distractors, len(others))):
        spans = sorted(docs[d].get("spans") or {})
        chosen.append((d, [rng.choice(spans)] if spans else []))
    return [
        {"title": _md2d_title(docs[d]), "text": _md2d_passage(docs[d], sps, passage)}
        for d, sps in chosen
    ]


def load_multidoc2dial(
    dial_path: str | Path,
    doc_path: str | Path,
    *,
    distractors: int = 0,
    passage: str = "section",
    refusal: str | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """MultiDoc2Dial dialogues -> one record per agent turn that answers a user turn.

    documents: the referenced document(s) first, then `distractors` others from the same
    domain (seeded; one random section each in section mode). passage="section" keeps only the
    sections holding the referenced spans (short prompts); "document" the whole doc_text. A
    turn without references is grounded in the nearest earlier turn that has some (else later).
    Unanswerable turns keep the agent's utterance as response unless `refusal` is given."""
    if passage not in ("section", "document"):
        raise InputError(f"expected 'section' or 'document', got {passage!r}", field="passage")
    dial_file, doc_file = str(dial_path), str(doc_path)
    doc_data = _require(_read_json(Path(doc_path)), "doc_data", dict, file=doc_file)
    for domain, docs in doc_data.items():
        if not isinstance(docs, dict):
            msg = "expected an object doc_id -> document"
            raise InputError(msg, file=doc_file, field=f"doc_data.{domain}")
        for doc_id, doc in docs.items():
            _require(doc, "doc_text", str, file=doc_file, path=f"doc_data.{domain}.{doc_id}")
    dial_data = _require(_read_json(Path(dial_path)), "dial_data", dict, file=dial_file)

    records, where = [], []
    for domain, dials in dial_data.items():
        if not isinstance(dials, list):
            msg = "expected a list of dialogues"
            raise InputError(msg, file=dial_file, field=f"dial_data.{domain}")
        docs = doc_data.get(domain, {})
        for di, dial in enumerate(dials):
            path = f"dial_data.{domain}[{di}]"
            turns = _md2d_check(dial, path, docs, dial_file)
            for ti, t in enumerate(turns):
                if t["role"] != "agent" or ti == 0 or turns[ti - 1]["role"] != "user":
                    continue
                if not t["utterance"].strip():
                    continue
                answerable = bool(t.get("references")) and t.get("da") != "respond_no_solution"
                messages = _md2d_history(turns[:ti])
                if not messages or messages[-1]["role"] != "user":
                    continue  # the user turn before it was blank
                rid = f"md2d-{dial['dial_id']}-{t.get('turn_id', ti + 1)}"
                rng = _rng(seed, rid)
                response = t["utterance"].strip()
                records.append(
                    {
                        "id": rid,
                        "documents": _md2d_documents(turns, ti, docs, rng, distractors, passage),
                        "messages": messages,
                        "response": refusal if not answerable and refusal else response,
                        "answerable": answerable,
                    }
                )
                where.append(f"{path}.turns[{ti}]")
    return _checked(records, dial_file, where)


# ---------------------------------------------------------------------- Natural Questions


def _nq_text(tokens: list[str], start: int, end: int) -> str:
    """Tokens [start, end) without HTML tokens, with NQ's spaces before punctuation undone."""
    text = " ".join(t for t in tokens[start:end] if not _HTML_TOKEN.match(t))
    return _DETOK.sub("", text).strip()


def _nq_title(url: Any) -> str:
    m = re.search(r"[?&]title=([^&]+)", url) if isinstance(url, str) else None
    return m.group(1).replace("_", " ") if m else ""


def _span(obj: Any, n_tokens: int, *, file: str, line: int, fld: str) -> tuple[int, int]:
    s = _require(obj, "start_token", int, file=file, line=line, path=fld)
    e = _require(obj, "end_token", int, file=file, line=line, path=fld)
    if not 0 <= s < e <= n_tokens:
        raise InputError(
            f"token span [{s}, {e}) outside the document ({n_tokens} tokens)",
            file=file,
            line=line,
            field=fld,
        )
    return s, e


def load_nq(path: str | Path, *, seed: int = 0) -> list[dict[str, Any]]:
    """Natural Questions simplified JSONL -> records.

    document: the long-answer candidate (HTML tokens stripped); for unanswerable questions a
    seeded choice among the top-level paragraph candidates. response: the short answer(s)
    (several joined by ", "), YES/NO answers as "Yes."/"No.", else the long answer text; with
    no long answer, GOLD_REFUSAL. The first annotation with a long answer is used."""
    file = str(path)
    records, lines = [], []
    for line, obj in iter_jsonl(path):
        req = {"file": file, "line": line}
        ex_id = _require(obj, "example_id", (int, str), **req)
        question = _require(obj, "question_text", str, **req).strip()
        if not question:
            raise InputError("empty question", field="question_text", **req)
        tokens = _require(obj, "document_text", str, **req).split(" ")
        annotations = _require(obj, "annotations", list, **req)
        cands = _require(obj, "long_answer_candidates", list, **req)
        for i, c in enumerate(cands):
            _span(c, len(tokens), file=file, line=line, fld=f"long_answer_candidates[{i}]")

        long_span, short, yes_no = None, [], "NONE"
        for i, ann in enumerate(annotations):
            fld = f"annotations[{i}]"
            la = _require(ann, "long_answer", dict, file=file, line=line, path=fld)
            if (
                _require(la, "start_token", int, file=file, line=line, path=f"{fld}.long_answer")
                < 0
            ):
                continue
            long_span = _span(la, len(tokens), file=file, line=line, fld=f"{fld}.long_answer")
            for j, sa in enumerate(ann.get("short_answers") or []):
                s, e = _span(sa, len(tokens), file=file, line=line, fld=f"{fld}.short_answers[{j}]")
                short.append(_nq_text(tokens, s, e))
            yes_no = ann.get("yes_no_answer", "NONE")
            break

        title = _nq_title(obj.get("document_url"))
        if long_span is not None:
            text = _nq_text(tokens, *long_span)
            if yes_no in ("YES", "NO"):
                response = "Yes." if yes_no == "YES" else "No."
            else:
                response = ", ".join(s for s in short if s) or text
        else:
            rid = f"nq-{ex_id}"
            paragraphs = [
                c for c in cands if c.get("top_level", True) and tokens[c["start_token"]] == "<P>"
            ]
            pool = paragraphs or cands
            text = ""
            if pool:
                c = _rng(seed, rid).choice(pool)
                text = _nq_text(tokens, c["start_token"], c["end_token"])
            response = GOLD_REFUSAL
        records.append(
            {
                "id": f"nq-{ex_id}",
                "documents": [{"title": title, "text": text}] if text else [],
                "messages": [{"role": "user", "content": question}],
                "response": response,
                "answerable": long_span is not None,
            }
        )
        lines.append(line)
    return _checked(records, file, lines)


# ------------------------------------------------------------------------------- MuSiQue


def load_musique(path: str | Path, *, distractors: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """MuSiQue v1.0 JSONL (ans or full) -> records.

    documents: the supporting paragraphs plus up to `distractors` non-supporting ones (seeded),
    in a seeded order so the position of the evidence carries no signal. Unanswerable
    examples (``answerable: false``, only in the full version) get GOLD_REFUSAL and the id
    suffix ``-unanswerable``, since the full version pairs them with an answerable twin."""
    file = str(path)
    records, lines = [], []
    for line, obj in iter_jsonl(path):
        req = {"file": file, "line": line}
        mid = _require(obj, "id", str, **req)
        question = _require(obj, "question", str, **req).strip()
        answerable = obj.get("answerable", True)
        if not isinstance(answerable, bool):
            raise InputError(f"expected true/false, got {answerable!r}", field="answerable", **req)
        answer = _require(obj, "answer", str, **req).strip() if answerable else GOLD_REFUSAL
        paras = _require(obj, "paragraphs", list, **req)
        support, other = [], []
        for i, p in enumerate(paras):
            fld = f"paragraphs[{i}]"
            doc = {
                "title": _require(p, "title", str, file=file, line=line, path=fld),
                "text": _require(p, "paragraph_text", str, file=file, line=line, path=fld),
            }
            (support if p.get("is_supporting") is True else other).append(doc)
        rid = f"musique-{mid}" + ("" if answerable else "-unanswerable")
        rng = _rng(seed, rid)
        docs = support + rng.sample(other, min(distractors, len(other)))
        rng.shuffle(docs)
        records.append(
            {
                "id": rid,
                "documents": docs,
                "messages": [{"role": "user", "content": question}],
                "response": answer,
                "answerable": answerable,
            }
        )
        lines.append(line)
    return _checked(records, file, lines)
