"""JSONL / JSON / CSV / text → tokenized, masked, batched examples.

Records come one JSON object per line (JSONL), as one JSON array of objects (a ``.json`` file as
many datasets ship), or as the rows of a CSV/TSV file with a header row (alpaca or text columns);
a leading UTF-8 byte-order mark is skipped. Record formats, detected from the
first record and then required of every record:

- alpaca:     {"instruction": str, "input"?: str, "output": str}
- chat:       {"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight"?: 0|1}, ...]}
              (an assistant message of weight 0 is context, not learned, as in OpenAI's format), or ShareGPT's
              {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
- completion: {"text": str}, or a plain .txt file (cut into --seq-len windows)

Alpaca and chat records are rendered with the tokenizer's chat template; the loss covers only the
assistant's tokens (labels of everything else are -100) unless ``train_on_prompt``. A template
without a system role (Gemma's) gets each system message at the start of the next user message.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import random
import zlib
from array import array
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

import torch
from jinja2.exceptions import TemplateError

from tinytune.errors import UserError

IGNORE = -100
MAX_RECORD_BYTES = 8 * 2**20
ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
CHAT_KEYS = {  # record key: (role key, text key, role names → chat roles, the names to list, an answer)
    "messages": ("role", "content", ROLES, "system, user or assistant", "assistant message"),
    "conversations": ("from", "value", SHAREGPT_ROLES, "system, human or gpt", "gpt turn"),
}


@dataclass
class Example:
    """Token ids, labels and positions are kept as int32 arrays: 4 bytes a token, where a list of
    Python ints takes ≈36 (a dataset of 250M tokens would hold 9 GiB of host memory as lists). Labels
    given as the ids themselves (text, --train-on-prompt) stay the same array."""

    input_ids: Sequence[int]
    labels: Sequence[int]
    position_ids: Sequence[int] | None = None
    """Set on packed rows: positions restart at 0 for each example (see ``pack``)."""

    def __post_init__(self) -> None:
        shared = self.labels is self.input_ids
        self.input_ids = _int32(self.input_ids)
        self.labels = self.input_ids if shared else _int32(self.labels)
        if self.position_ids is not None:
            self.position_ids = _int32(self.position_ids)


def _int32(values: Sequence[int]) -> array:
    return values if isinstance(values, array) else array("i", values)


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    format: str
    n_records: int
    n_truncated: int
    n_dropped: int
    sample_prompt: list[dict] | None
    """A held-out conversation (without its answer) for the before/after sample."""
    sample_answer: str | None
    n_folded: int = 0
    """Records whose system messages went into the next user message (see ``fold_system``)."""


def demo_path() -> Path:
    return Path(str(resources.files("tinytune") / "data" / "demo.jsonl"))


def read_records(path: Path) -> tuple[str, list]:
    """Read and validate a dataset file; returns (format, records) or raises a file:line UserError."""
    fmt, records, _lines = _read(path)
    return fmt, records


def _read(path: Path) -> tuple[str, list, list[int]]:
    """(format, records, the line each record starts on)."""
    raw, suffix = _file_bytes(path)
    if suffix == ".txt":
        text = _decode(raw, path)
        if not text.strip():
            raise UserError(f"--data {path}: the file is empty; it needs some text to train on")
        return "text-file", [text], [1]
    if suffix in (".csv", ".tsv"):
        found = _table_records(raw, path, "\t" if suffix == ".tsv" else ",")
        empty = "no rows under a header row", "add a header such as instruction,input,output and rows"
    elif raw.lstrip()[:1] == b"[":
        found, empty = _array_records(raw, path), ("the array is empty", "add objects to it")
    else:
        found, empty = _line_records(raw, path), ("the file is empty", "add one JSON object per line")
    fmt, records, lines = None, [], []
    for lineno, rec in found:
        kind = _record_format(rec, path, lineno)
        if fmt is None:
            fmt = kind
        elif kind != fmt:
            raise UserError(f"{path}:{lineno}: {_a(kind)} record in {_a(fmt)} dataset; keep one format per file")
        records.append(rec)
        lines.append(lineno)
    if not records:
        raise UserError(f"--data {path}: no records ({empty[0]}); {empty[1]}")
    return fmt, records, lines


def _file_bytes(path: Path) -> tuple[bytes, str]:
    """The file's bytes (ungzipped, without a byte-order mark) and the suffix that names their format."""
    if not path.exists():
        raise UserError(f"--data {path}: no such file")
    if path.is_dir():
        raise UserError(f"--data {path}: is a directory; pass a .jsonl, .json, .csv or .txt file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"--data {path}: cannot read ({e.strerror})") from None
    suffix = path.suffix.lower()
    if raw[:2] == b"\x1f\x8b":  # gzip (data.jsonl.gz): read what it holds, named by the inner suffix
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"--data {path}: a damaged gzip file ({e}); download or compress it again") from None
        suffix = Path(path.stem).suffix.lower()
    if suffix in (".parquet", ".arrow"):
        raise UserError(f"--data {path}: {suffix[1:].title()} files are not read; write the rows as JSON lines, "
                        "e.g. with: python -c \"import pandas as pd; pd.read_"
                        f"{'parquet' if suffix == '.parquet' else 'feather'}('{path}').to_json('data.jsonl', "
                        "orient='records', lines=True, force_ascii=False)\"")
    if b"\x00" in raw[:8192]:
        raise UserError(f"--data {path}: looks binary (NUL bytes); pass a UTF-8 .jsonl, .json, .csv or .txt file")
    return raw.removeprefix(codecs.BOM_UTF8), suffix


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text; re-save the file as UTF-8") from None


def _too_long(path: Path, lineno: int, what: str, size: int) -> UserError:
    return UserError(f"{path}:{lineno}: the {what} is {size / 2**20:.0f} MiB; records over "
                     f"{MAX_RECORD_BYTES // 2**20} MiB (≈2M tokens, beyond any context) are refused: split it")


def _line_records(raw: bytes, path: Path) -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank line of a JSONL file."""
    for lineno, line_bytes in enumerate(raw.split(b"\n"), start=1):
        if len(line_bytes) > MAX_RECORD_BYTES:
            raise _too_long(path, lineno, "line", len(line_bytes))
        try:
            line = line_bytes.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UserError(f"{path}:{lineno}: not UTF-8 text; re-save the file as UTF-8") from None
        if not line:
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                            "each line must be one JSON object") from None


def _array_records(raw: bytes, path: Path) -> Iterator[tuple[int, object]]:
    """(line number where it starts, value) of each element of a file holding one JSON array."""
    text = _decode(raw, path)
    decoder = json.JSONDecoder()
    hint = "the file must be one JSON array of objects, or one object per line"

    def fail(msg: str, pos: int):
        line = text.count("\n", 0, pos) + 1
        col = pos - text.rfind("\n", 0, pos)
        raise UserError(f"{path}:{line}: not valid JSON ({msg} at column {col}); {hint}")

    pos, line, counted = _skip_space(text, text.index("[") + 1), 1, 0
    while not text.startswith("]", pos):
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            fail(e.msg, e.pos)
        if end - pos > MAX_RECORD_BYTES:
            raise _too_long(path, line, "record", end - pos)
        yield line, value
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif not text.startswith("]", pos):
            fail("Expecting ',' delimiter", pos)
    pos = _skip_space(text, pos + 1)
    if pos < len(text):
        fail("Extra data after the array", pos)


def _table_records(raw: bytes, path: Path, delimiter: str) -> Iterator[tuple[int, object]]:
    """(line where it starts, {column: cell}) of each row under a CSV or TSV file's header row."""
    csv.field_size_limit(MAX_RECORD_BYTES)
    reader = csv.DictReader(io.StringIO(_decode(raw, path), newline=""), delimiter=delimiter, strict=True)
    try:
        for row in reader:
            cells = [v for v in row.values() if isinstance(v, str)] + row.get(None, [])
            start = reader.line_num - sum(v.count("\n") for v in cells)  # quoted cells may span lines
            if None in row:  # more cells than the header has columns
                raise UserError(f"{path}:{start}: the row has {len(cells)} cells and the header "
                                f"{len(reader.fieldnames)} columns; quote cells that hold the delimiter")
            yield start, {k: v for k, v in row.items() if v is not None}  # a short row lacks its last cells
    except csv.Error as e:
        # the reader counts a line once it parsed it: the bad one is the next
        raise UserError(f"{path}:{reader.line_num + 1}: not a valid {path.suffix[1:].upper()} row ({e}); "
                        "put a cell that holds quotes, the delimiter or line breaks in double quotes, "
                        "its own quotes doubled") from None


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _record_format(rec, path: Path, lineno: int) -> str:
    where = f"{path}:{lineno}"
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    key = _chat_key(rec)
    if key is not None:
        role, text, roles, names, answer = CHAT_KEYS[key]
        turns = rec[key]
        if not isinstance(turns, list) or not turns:
            raise UserError(f"{where}: \"{key}\" must be a non-empty list of {{\"{role}\", \"{text}\"}} objects")
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or not isinstance(t.get(text), str) or t.get(role) not in roles:
                raise UserError(f"{where}: {key}[{i}] needs \"{role}\" ({names}) and a string \"{text}\"")
            weight = t.get("weight", 1)
            if "weight" in t and (roles[t[role]] != "assistant" or weight not in (0, 1) or isinstance(weight, bool)):
                raise UserError(f"{where}: {key}[{i}] has \"weight\" {json.dumps(weight)[:20]}; "
                                f"it must be 0 (do not learn) or 1, and only on an {answer}")
        if not any(roles[t[role]] == "assistant" for t in turns):
            raise UserError(f"{where}: the conversation has no {answer} to learn from")
        if not any(roles[t[role]] == "assistant" and t.get("weight", 1) for t in turns):
            raise UserError(f"{where}: every {answer} has \"weight\" 0, so there is nothing to learn; "
                            "set one to 1 or drop the record")
        return "chat"
    if "instruction" in rec or "output" in rec:
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise UserError(f"{where}: an alpaca record needs a string \"{key}\"")
        if "input" in rec and not isinstance(rec["input"], (str, type(None))):
            raise UserError(f"{where}: \"input\" must be a string")
        return "alpaca"
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"].strip():
            raise UserError(f"{where}: \"text\" must be a non-empty string")
        return "text"
    names = sorted(str(k).encode("unicode_escape").decode()[:40] for k in rec)  # one line, whatever the keys hold
    keys = ", ".join(names[:8]) + (f", … ({len(names)} keys)" if len(names) > 8 else "") or "none"
    raise UserError(f"{where}: unknown record (keys: {keys}); "
                    "use \"instruction\"+\"output\", \"messages\", \"conversations\" or \"text\"")


def _chat_key(rec: dict) -> str | None:
    """The key of a chat record's turns ("messages" or ShareGPT's "conversations"), else None."""
    return next((k for k in CHAT_KEYS if k in rec), None)


def _learned(message: dict) -> bool:
    """Whether a chat message is an answer to learn: an assistant's, not of ``"weight": 0``."""
    return message["role"] == "assistant" and message.get("weight", 1) != 0


def to_messages(rec: dict) -> list[dict]:
    key = _chat_key(rec)
    if key is not None:
        role, text, roles = CHAT_KEYS[key][:3]
        return [{"role": roles[t[role]], "content": t[text], **({"weight": t["weight"]} if "weight" in t else {})}
                for t in rec[key]]
    prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]


def render_chat(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the chat template writes it, and the character spans of the assistant
    turns to learn: all but those of ``"weight": 0`` (OpenAI's fine-tuning format)."""
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if not _learned(m):
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        start = len(before) if full.startswith(before) else _common_prefix(full, before)
        spans.append((start, len(upto)))
    return full, sorted(spans)


def chat_example(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                 train_on_prompt: bool) -> Example:
    """Labels from character spans: a token is learned where it starts inside a span (sorted by start)."""
    if train_on_prompt:
        return Example(ids, ids)
    labels, j = [], 0
    for t, (a, _b) in zip(ids, offsets):  # token starts never go back, so the spans are walked once
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        labels.append(t if j < len(spans) and spans[j][0] <= a else IGNORE)
    return Example(ids, labels)


def encode_chat(tok, messages: list[dict], train_on_prompt: bool) -> Example:
    """Tokenize a conversation; labels cover the assistant turns to learn (see ``render_chat``)."""
    text, spans = render_chat(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return chat_example(enc["input_ids"], enc["offset_mapping"], spans, train_on_prompt)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def text_example(tok, ids: list[int]) -> Example:
    if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
        ids = [tok.bos_token_id] + ids
    ids = ids + [tok.eos_token_id]
    return Example(ids, ids)


def encode_text(tok, text: str) -> Example:
    return text_example(tok, tok(text, add_special_tokens=False)["input_ids"])


def takes_system(tok) -> bool:
    """False for a chat template that refuses a system message but takes the conversation without it."""
    convo = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    try:
        tok.apply_chat_template([{"role": "system", "content": "Be brief."}] + convo, tokenize=False)
        return True
    except TemplateError:
        pass
    try:
        tok.apply_chat_template(convo, tokenize=False)
    except TemplateError:
        return True  # it refuses more than the system role: each record's own error says what
    return False


def fold_system(messages: list[dict]) -> list[dict]:
    """System messages moved to the start of the next user message, as Gemma's model card advises
    for its template, which has no system role. One with no user message after it stays (and the
    template's refusal then names its record)."""
    out, pending = [], []
    for m in messages:
        if m["role"] == "system":
            pending.append(m)
            continue
        if pending and m["role"] == "user":
            m = {"role": "user", "content": "\n\n".join([p["content"] for p in pending] + [m["content"]])}
            pending = []
        out.append(m)
    return out + pending


ENCODE_BATCH = 1024
"""Records tokenized per call: the tokenizer spreads a batch over the CPU's cores."""


def _encode_records(tok, fmt: str, records: list, conversations: list, train_on_prompt: bool, path: Path,
                    lines: list[int]) -> Iterator[Example]:
    for first in range(0, len(records), ENCODE_BATCH):
        batch = range(first, min(first + ENCODE_BATCH, len(records)))
        if fmt == "text":
            for ids in tok([records[i]["text"] for i in batch], add_special_tokens=False)["input_ids"]:
                yield text_example(tok, ids)
            continue
        rendered = []
        for i in batch:
            try:
                rendered.append(render_chat(tok, conversations[i]))
            except TemplateError as e:
                reason = " ".join(str(e).split())
                raise UserError(f"{path}:{lines[i]}: the model's chat template refuses this conversation "
                                f"({reason}); change the record to the turns the template takes") from None
        enc = tok([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        for (_text, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
            yield chat_example(ids, offsets, spans, train_on_prompt)


def build(path: Path, tok, seq_len: int, eval_fraction: float, train_on_prompt: bool, seed: int,
          say=lambda _text: None) -> Dataset:
    """``say``: told when a large dataset (more than 4 batches) starts tokenizing."""
    fmt, records, lines = _read(path)
    if len(records) > 4 * ENCODE_BATCH:
        say(f"data: tokenizing {len(records):,} {fmt} records from {path.name} …")
    examples: list[Example] = []
    origins: list[int] = []  # record index of each example
    truncated = dropped = folded = 0
    conversations = [to_messages(rec) for rec in records] if fmt in ("alpaca", "chat") else []
    with_system = sum(any(m["role"] == "system" for m in c) for c in conversations)
    if with_system and not takes_system(tok):
        folded = with_system
        conversations = [fold_system(c) for c in conversations]
    if fmt == "text-file":
        ids = encode_text(tok, records[0]).input_ids
        for i in range(0, len(ids), seq_len):
            window = ids[i : i + seq_len]
            if len(window) > 1:
                examples.append(Example(window, window))
    else:
        for index, ex in enumerate(_encode_records(tok, fmt, records, conversations, train_on_prompt, path, lines)):
            if len(ex.input_ids) > seq_len:
                truncated += 1
                ids = ex.input_ids[:seq_len]
                ex = Example(ids, ids if ex.labels is ex.input_ids else ex.labels[:seq_len])
            if all(label == IGNORE for label in ex.labels[1:]):
                dropped += 1  # nothing left to learn after truncation
                continue
            examples.append(ex)
            origins.append(index)
    if not examples:
        raise UserError(f"--data {path}: no example has a token to learn from at --seq-len {seq_len}; raise --seq-len")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(examples) * eval_fraction)) if eval_fraction > 0 else 0
    if eval_fraction > 0 and len(examples) >= 4:
        n_eval = max(1, n_eval)
    n_eval = min(n_eval, len(examples) - 1)
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    sample_prompt = sample_answer = None
    if fmt in ("alpaca", "chat") and eval_idx:
        # The first held-out record, minus its last answer, is the before/after generation sample.
        msgs = conversations[origins[eval_idx[0]]]
        last = max(i for i, m in enumerate(msgs) if _learned(m))
        sample_prompt, sample_answer = msgs[:last], msgs[last]["content"]
    return Dataset(
        train=[examples[i] for i in train_idx], eval=[examples[i] for i in eval_idx], format=fmt,
        n_records=len(records), n_truncated=truncated, n_dropped=dropped,
        sample_prompt=sample_prompt, sample_answer=sample_answer, n_folded=folded,
    )


def pack(examples: list[Example], seq_len: int, seed: int) -> list[Example]:
    """Short examples packed into rows of at most ``seq_len`` tokens, none split or dropped.

    Positions restart at 0 for each example; given position ids and no attention mask, a token
    attends only within its own example (a run that packs attends per example:
    ``attention.sdpa_attention``; transformers alone would build a mask). The first label of each
    example is ignored, so no token is trained to predict the start of the next example. Examples
    are taken in a seeded shuffle and placed first-fit into the open rows.
    """
    order = list(range(len(examples)))
    random.Random(seed * 7_919 + 1).shuffle(order)
    rows: list[list[Example]] = []
    room: list[int] = []
    for i in order:
        e = examples[i]
        n = len(e.input_ids)
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([])
            room.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append(e)
        room[slot] -= n
    packed = []
    for row in rows:
        ids, labels, positions = [], [], []
        for e in row:
            ids += e.input_ids
            labels.append(IGNORE)
            labels += e.labels[1:]
            positions += range(len(e.input_ids))
        packed.append(Example(ids, labels, positions))
    return packed


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example, with no attention mask: attention is causal, so
    a real token never sees the pads after it, and a pad's label is ignored. The loss and gradients
    are those of the masked batch; without a mask transformers lets SDPA attend causally (its flash
    kernel on CUDA), where a padding mask would make it expand k and v to every head and keep the
    mask as an additive bias, batch × s² values per layer. Packed rows carry position ids, from which
    attention reads their examples (padding then reads as one more example)."""
    packed = batch[0].position_ids is not None
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    out = {"input_ids": ids, "labels": labels}
    if packed:
        out["position_ids"] = positions = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.frombuffer(e.input_ids, dtype=torch.int32)
        labels[row, :n] = torch.frombuffer(e.labels, dtype=torch.int32)
        if packed:
            positions[row, :n] = torch.frombuffer(e.position_ids, dtype=torch.int32)
            positions[row, n:] = torch.arange(width - n)
    return out


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def micro_batches(examples: list[Example], micro_batch: int, seed: int, start: int = 0) -> Iterator[list[Example]]:
    """Endless stream of micro-batches, reshuffled each epoch; ``start`` skips that many micro-batches."""
    per_epoch = micro_batches_per_epoch(len(examples), micro_batch)
    index = start
    while True:
        epoch, pos = divmod(index, per_epoch)
        order = epoch_order(len(examples), seed, epoch)
        chunk = order[pos * micro_batch : (pos + 1) * micro_batch]
        yield [examples[i] for i in chunk]
        index += 1


def micro_batches_per_epoch(n_examples: int, micro_batch: int) -> int:
    return max(1, n_examples // micro_batch)
