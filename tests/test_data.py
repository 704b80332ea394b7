import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from conftest import write_jsonl
from tinytune import data
from tinytune.errors import UserError


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def label_text(tok, ex):
    return tok.decode([t for t in ex.labels if t != data.IGNORE])


def test_alpaca_loss_covers_only_the_response(tok):
    msgs = data.to_messages({"instruction": "Say hi.", "input": "to Ana", "output": "Hi Ana!"})
    assert msgs[0]["content"] == "Say hi.\n\nto Ana"
    ex = data.encode_chat(tok, msgs, train_on_prompt=False)
    assert label_text(tok, ex).strip() == "Hi Ana!<|im_end|>"
    full = data.encode_chat(tok, msgs, train_on_prompt=True)
    assert full.labels == full.input_ids and full.input_ids == ex.input_ids


def test_chat_loss_covers_every_assistant_turn_and_nothing_else(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
            {"role": "assistant", "content": "Uno."}, {"role": "user", "content": "Two?"},
            {"role": "assistant", "content": "Dos."}]
    ex = data.encode_chat(tok, msgs, train_on_prompt=False)
    text = label_text(tok, ex)
    assert "Uno." in text and "Dos." in text
    for prompt_word in ("Be brief", "One?", "Two?", "system", "user"):
        assert prompt_word not in text


def test_an_assistant_message_of_weight_0_is_context_not_learned(tok):
    msgs = [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "Uno.", "weight": 0},
            {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "Dos.", "weight": 1}]
    assert data.to_messages({"messages": msgs}) == msgs
    ex = data.encode_chat(tok, msgs, train_on_prompt=False)
    assert label_text(tok, ex).strip() == "Dos.<|im_end|>"
    unweighted = data.encode_chat(tok, [{k: v for k, v in m.items() if k != "weight"} for m in msgs], False)
    assert ex.input_ids == unweighted.input_ids and "Uno." in label_text(tok, unweighted)


@settings(max_examples=200, deadline=None)
@given(starts=st.lists(st.integers(0, 60), max_size=40),
       spans=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 30)).map(lambda s: (s[0], s[0] + s[1])), max_size=5))
def test_a_token_is_learned_where_it_starts_inside_a_span(starts, spans):
    """The one-pass walk over sorted spans labels exactly what testing every span for every token does."""
    starts = sorted(starts)
    ids = list(range(100, 100 + len(starts)))
    ex = data.chat_example(ids, [(a, a + 1) for a in starts], sorted(spans), train_on_prompt=False)
    assert list(ex.labels) == [t if any(s <= a < e for s, e in spans) else data.IGNORE for t, a in zip(ids, starts)]


def test_text_records_train_on_everything_and_end_with_eos(tok):
    ex = data.encode_text(tok, "plain text")
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id


def test_build_splits_truncates_and_reports(tmp_path, tok, demo_rows):
    rows = demo_rows + [{"instruction": "x " * 400, "output": "long"}]
    ds = data.build(write_jsonl(tmp_path / "d.jsonl", rows), tok, seq_len=96, eval_fraction=0.1,
                    train_on_prompt=False, seed=0)
    assert ds.format == "alpaca" and ds.n_records == 49
    assert ds.n_dropped == 1  # the long prompt leaves no response tokens within 96 tokens
    assert len(ds.train) + len(ds.eval) == 48 and len(ds.eval) == 5
    assert all(len(e.input_ids) <= 96 for e in ds.train + ds.eval)
    assert ds.sample_prompt[-1]["role"] == "user" and ds.sample_answer.startswith("{")
    ds_short = data.build(write_jsonl(tmp_path / "d.jsonl", demo_rows), tok, 72, 0.1, False, 0)
    assert ds_short.n_truncated > 0


def test_txt_file_is_cut_into_windows(tmp_path, tok):
    p = tmp_path / "book.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    ds = data.build(p, tok, seq_len=32, eval_fraction=0.0, train_on_prompt=False, seed=0)
    assert ds.format == "text-file" and all(len(e.input_ids) <= 32 for e in ds.train) and len(ds.train) > 5


def test_examples_keep_4_bytes_a_token(tmp_path, tok, demo_rows):
    """Int32 arrays, not lists of Python ints (≈36 bytes a token); labels equal to the ids are shared."""
    chat = data.build(write_jsonl(tmp_path / "d.jsonl", demo_rows), tok, 128, 0.0, False, 0).train
    text = data.build(write_jsonl(tmp_path / "t.jsonl", [{"text": "one two"}] * 4), tok, 128, 0.0, False, 0).train
    for e in chat + text + data.pack(chat, 128, 0):
        assert all(a.typecode == "i" and a.itemsize == 4 for a in (e.input_ids, e.labels))
    assert all(e.labels is e.input_ids for e in text) and not any(e.labels is e.input_ids for e in chat)


def test_collate_pads_right_and_ignores_the_pads_labels(tok):
    """No attention mask: attention is causal, so no real token sees the pads after it
    (test_train checks the loss and gradients against the masked batch's)."""
    batch = data.collate([data.Example([5, 6, 7], [-100, 6, 7]), data.Example([8], [8])], pad_id=2)
    assert batch.keys() == {"input_ids", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_micro_batches_are_seeded_and_resumable():
    examples = [data.Example([i], [i]) for i in range(10)]
    a = [b[0].input_ids[0] for _, b in zip(range(12), data.micro_batches(examples, 2, seed=3))]
    b = [b[0].input_ids[0] for _, b in zip(range(12), data.micro_batches(examples, 2, seed=3))]
    c = [b[0].input_ids[0] for _, b in zip(range(7), data.micro_batches(examples, 2, seed=3, start=5))]
    assert a == b and a[5:] == c


@pytest.mark.parametrize("name,content,expected", [
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{not json}\n', ":2: not valid JSON"),
    ("bad.jsonl", '[1, 2]\n', ":1: expected a JSON object"),
    ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n', ":1: unknown record (keys: completion, prompt)"),
    ("bad.jsonl", '{"instruction": "a"}\n', ":1: an alpaca record needs a string \"output\""),
    ("bad.jsonl", '{"messages": []}\n', ":1: \"messages\" must be a non-empty list"),
    ("bad.jsonl", '{"messages": [{"role": "bot", "content": "x"}]}\n', ":1: messages[0] needs \"role\""),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', ":1: the conversation has no assistant message"),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": "x", "weight": 0}, {"role": "assistant", "content": "y"}]}\n',
     ':1: messages[0] has "weight" 0; it must be 0 (do not learn) or 1, and only on an assistant message'),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0.5}]}\n',
     ':1: messages[1] has "weight" 0.5'),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": true}]}\n',
     ':1: messages[1] has "weight" true'),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]}\n',
     ':1: every assistant message has "weight" 0, so there is nothing to learn'),
    ("bad.jsonl", '{"text": ""}\n', ":1: \"text\" must be a non-empty string"),
    ("bad.jsonl", '{"text": "a"}\n{"instruction": "a", "output": "b"}\n', ":2: an alpaca record in a text dataset"),
    ("bad.jsonl", '\n\n', "no records"),
    # one JSON array of records: the line a bad record starts on
    ("bad.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]',
     ":3: not valid JSON (Expecting ',' delimiter at column 22)"),
    ("bad.json", '[\n {"instruction": "a", "output": "b"}\n {"instruction": "c", "output": "d"}\n]',
     ":3: not valid JSON (Expecting ',' delimiter at column 2)"),
    ("bad.json", '[\n {"instruction": "a", "output": "b"},\n\n  {"text": "c"}\n]', ":4: a text record in an alpaca dataset"),
    ("bad.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c"}]',
     ":3: an alpaca record needs a string \"output\""),
    ("bad.json", '[{"instruction": "a", "output": "b"},', ":1: not valid JSON (Expecting value at column 38)"),
    ("bad.json", '[{"instruction": "a", "output": "b"}]\n[]', ":2: not valid JSON (Extra data after the array at column 1)"),
    ("bad.json", '[\n\n  "text"]', ":3: expected a JSON object, got str"),
    ("bad.json", ' [ ]\n', "no records (the array is empty); add objects to it"),
    # a CSV or TSV file with a header row: the line a bad row starts on
    ("bad.csv", 'instruction,output\n\n"multi\nline",b\nx,y,z\n', ":5: the row has 3 cells and the header 2 columns"),
    ("bad.csv", 'instruction,output\nfine,ok\n"a"b,c\n', ":3: not a valid CSV row (',' expected after '\"')"),
    ("bad.csv", 'instruction,output\n"open quote,b\n', ":2: not a valid CSV row (unexpected end of data)"),
    ("bad.tsv", 'instruction\toutput\nx\n', ':2: an alpaca record needs a string "output"'),
    ("bad.csv", 'prompt,completion\na,b\n', ":2: unknown record (keys: completion, prompt)"),
    ("bad.csv", 'instruction,input,output\n', "no records (no rows under a header row)"),
    ("train-00000-of-00001.parquet", "PAR1", "Parquet files are not read; write the rows as JSON lines, e.g. with: "
                                             "python -c \"import pandas as pd; pd.read_parquet("),
    ("sharegpt.jsonl", '{"conversations": []}',
     ':1: "conversations" must be a non-empty list of {"from", "value"} objects'),
    ("sharegpt.jsonl", '{"conversations": [{"from": "bot", "value": "x"}]}',
     ':1: conversations[0] needs "from" (system, human or gpt)'),
    ("sharegpt.jsonl", '{"conversations": [{"from": "human", "value": 3}]}',
     ':1: conversations[0] needs "from" (system, human or gpt) and a string "value"'),
    ("sharegpt.jsonl", '{"conversations": [{"from": "human", "value": "x"}]}', ':1: the conversation has no gpt turn to learn from'),
])
def test_bad_records_name_file_and_line(tmp_path, name, content, expected):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(UserError) as e:
        data.read_records(p)
    assert f"{p}" in str(e.value) and expected in str(e.value) and "\n" not in str(e.value)


def test_non_utf8_and_binary_and_missing(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin1.jsonl:2: not UTF-8"):
        data.read_records(p)
    b = tmp_path / "blob.jsonl"
    b.write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(UserError, match="binary"):
        data.read_records(b)
    with pytest.raises(UserError, match="no such file"):
        data.read_records(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="is a directory"):
        data.read_records(tmp_path)


def test_a_json_array_reads_as_its_records_would_line_by_line(tmp_path, demo_rows):
    rows = demo_rows[:5]
    array = tmp_path / "alpaca_data.json"
    array.write_text(json.dumps(rows, indent=4, ensure_ascii=False))  # as the Stanford Alpaca file ships
    assert data.read_records(array) == data.read_records(write_jsonl(tmp_path / "rows.jsonl", rows))
    windows = "[\r\n" + ",\r\n".join(json.dumps(r) for r in rows) + "\r\n]\r\n"
    array.write_bytes(b"\xef\xbb\xbf" + windows.encode())  # as Notepad saves it
    assert data.read_records(array) == ("alpaca", rows)


def test_csv_and_tsv_rows_read_as_records(tmp_path):
    rows = [{"instruction": "Say hi", "input": "", "output": "Hi!"},
            {"instruction": "Two\nlines, one comma", "input": 'a "quote"', "output": "ok"}]
    table = tmp_path / "excel.csv"  # as Excel saves "CSV UTF-8": a byte-order mark and Windows line ends
    table.write_bytes(b"\xef\xbb\xbfinstruction,input,output\r\nSay hi,,Hi!\r\n"
                      b'"Two\nlines, one comma","a ""quote""",ok\r\n')
    assert data.read_records(table) == ("alpaca", rows)
    tsv = tmp_path / "corpus.tsv"
    tsv.write_text("text\tsource\nOnce upon a time.\tbook\n")
    assert data.read_records(tsv) == ("text", [{"text": "Once upon a time.", "source": "book"}])
    packed = tmp_path / "excel.csv.gz"  # gzip: read as the file it holds
    packed.write_bytes(gzip.compress(table.read_bytes()))
    assert data.read_records(packed) == ("alpaca", rows)
    damaged = tmp_path / "rows.jsonl.gz"
    damaged.write_bytes(gzip.compress(b'{"text": "a"}\n')[:-6])
    with pytest.raises(UserError, match=r"rows.jsonl.gz: a damaged gzip file \(Compressed file ended"):
        data.read_records(damaged)


def test_a_byte_order_mark_is_skipped(tmp_path, tok):
    rows = [{"text": "one"}, {"text": "two"}]
    bom = tmp_path / "notepad.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r) for r in rows).encode())
    assert data.read_records(bom) == ("text", rows)
    book = tmp_path / "book.txt"
    book.write_bytes(b"\xef\xbb\xbfOnce upon a time.")
    assert data.read_records(book) == ("text-file", ["Once upon a time."])


def test_sharegpt_conversations_train_as_the_same_messages_would(tok):
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "One?"},
                                  {"from": "gpt", "value": "Uno."}, {"from": "human", "value": "Two?"},
                                  {"from": "gpt", "value": "Dos."}]}
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
                         {"role": "assistant", "content": "Uno."}, {"role": "user", "content": "Two?"},
                         {"role": "assistant", "content": "Dos."}]}
    assert data._record_format(sharegpt, "x", 1) == data._record_format(chat, "x", 1) == "chat"
    assert data.to_messages(sharegpt) == data.to_messages(chat)
    assert data.encode_chat(tok, data.to_messages(sharegpt), False) == data.encode_chat(tok, data.to_messages(chat), False)


# Gemma's chat template as it ships: no system role, and user/assistant turns must alternate.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


@pytest.fixture
def gemma_tok(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = GEMMA_TEMPLATE
    return tok


def test_a_template_without_a_system_role_gets_the_system_message_in_the_first_user_turn(tmp_path, tok, gemma_tok):
    rows = [{"messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": "un deux"}]} for i in range(6)]
    p = write_jsonl(tmp_path / "chat.jsonl", rows + [{"messages": [{"role": "user", "content": "Hi."},
                                                                  {"role": "assistant", "content": "Salut."}]}])
    assert data.takes_system(tok) and not data.takes_system(gemma_tok)
    ds = data.build(p, gemma_tok, seq_len=200, eval_fraction=0.3, train_on_prompt=False, seed=0)
    assert ds.n_folded == 6 and ds.n_records == 7
    folded = [{"role": "user", "content": "Answer in French.\n\nCount to 0."}, {"role": "assistant", "content": "un deux"}]
    assert data.fold_system(data.to_messages(rows[0])) == folded
    expected = data.encode_chat(gemma_tok, folded, train_on_prompt=False)
    assert expected in ds.train + ds.eval
    assert label_text(gemma_tok, expected) == "un deux<end_of_turn>\n"
    assert [m["role"] for m in ds.sample_prompt] == ["user"]  # the sample's prompt is folded too
    # a template with a system role keeps the records as they are
    assert data.build(p, tok, 200, 0.3, False, 0).n_folded == 0


def test_fold_system_keeps_every_turn_in_order():
    s, u, a = ({"role": r, "content": r[0]} for r in ("system", "user", "assistant"))
    assert data.fold_system([u, a]) == [u, a]
    assert data.fold_system([s, s, u, a]) == [{"role": "user", "content": "s\n\ns\n\nu"}, a]
    assert data.fold_system([u, a, s, u, a]) == [u, a, {"role": "user", "content": "s\n\nu"}, a]
    assert data.fold_system([u, a, s]) == [u, a, s]  # nothing to fold into: the template's refusal names the record


def test_a_conversation_the_template_refuses_names_its_line(tmp_path, gemma_tok):
    rows = [{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}] * 3
    rows.append({"messages": [{"role": "user", "content": "Hi."}, {"role": "user", "content": "Hey?"},
                              {"role": "assistant", "content": "Hello."}]})
    p = tmp_path / "chat.jsonl"
    p.write_text("\n\n".join(json.dumps(r) for r in rows))
    with pytest.raises(UserError) as e:
        data.build(p, gemma_tok, 200, 0.0, False, 0)
    assert str(e.value) == (f"{p}:7: the model's chat template refuses this conversation (Conversation roles must "
                            "alternate user/assistant/user/assistant/...); change the record to the turns the template takes")


def test_demo_dataset_ships_and_is_valid():
    fmt, records = data.read_records(data.demo_path())
    assert fmt == "alpaca" and len(records) >= 200
    assert all(json.loads(r["output"])["city"].isupper() for r in records)


# --- properties ---------------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=12)
FIELDS = st.sampled_from(["instruction", "input", "output", "messages", "text", "role", "content", "prompt"])
RECORDS = st.dictionaries(FIELDS, JSON | st.text(max_size=30), max_size=4) | JSON


def _one_line_or_records(path):
    try:
        fmt, records = data.read_records(path)
    except UserError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return None
    assert fmt in ("alpaca", "chat", "text", "text-file") and records
    return fmt, records


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=400), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]))
def test_any_bytes_give_records_or_one_line(tmp_path, blob, suffix):
    p = tmp_path / f"any{suffix}"
    p.write_bytes(blob)
    _one_line_or_records(p)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(RECORDS, min_size=0, max_size=6))
def test_any_json_lines_give_records_of_one_format_or_one_line(tmp_path, rows):
    p = write_jsonl(tmp_path / "rows.jsonl", [json.dumps(r) for r in rows])
    got = _one_line_or_records(p)
    if got is not None:
        fmt, records = got
        assert all(data._record_format(r, p, 0) == fmt for r in records)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.dictionaries(FIELDS, JSON | st.text(max_size=30), max_size=4), max_size=6),
       indent=st.sampled_from([None, 1, "\t"]))
def test_a_json_array_gives_what_its_lines_give(tmp_path, rows, indent):
    lines = _one_line_or_records(write_jsonl(tmp_path / "rows.jsonl", [json.dumps(r) for r in rows]))
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(rows, indent=indent))
    assert _one_line_or_records(array) == lines


TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=60).filter(str.strip)
ALPACA = st.fixed_dictionaries({"instruction": TEXT, "output": TEXT}, optional={"input": TEXT})
CHAT = st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3).map(
    lambda turns: {"messages": [m for u, a in turns for m in ({"role": "user", "content": u},
                                                                {"role": "assistant", "content": a})]})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.one_of(st.lists(ALPACA, min_size=1, max_size=8), st.lists(CHAT, min_size=1, max_size=8)),
       seq_len=st.integers(8, 200), eval_fraction=st.sampled_from([0.0, 0.25]), seed=st.integers(0, 3))
def test_built_examples_fit_and_learn_only_answer_tokens(tmp_path, tok, rows, seq_len, eval_fraction, seed):
    p = write_jsonl(tmp_path / "gen.jsonl", rows)
    try:
        ds = data.build(p, tok, seq_len, eval_fraction, train_on_prompt=False, seed=seed)
    except UserError as e:  # every example truncated to nothing to learn
        assert "raise --seq-len" in str(e)
        return
    examples = ds.train + ds.eval
    assert len(examples) + ds.n_dropped == ds.n_records == len(rows)
    assert ds.train  # there is always something to train on
    for e in examples:
        assert 1 < len(e.input_ids) <= seq_len and len(e.labels) == len(e.input_ids)
        assert all(label in (data.IGNORE, token) for label, token in zip(e.labels, e.input_ids))
        assert any(label != data.IGNORE for label in e.labels[1:])
        assert e.labels[0] == data.IGNORE  # the prompt comes first


@given(n=st.integers(1, 40), mb=st.integers(1, 8), seed=st.integers(0, 10), start=st.integers(0, 30))
def test_micro_batch_stream_resumes_anywhere_and_never_repeats_within_an_epoch(n, mb, seed, start):
    examples = [data.Example([i], [i]) for i in range(n)]
    ids = lambda stream, k: [[e.input_ids[0] for e in b] for _, b in zip(range(k), stream)]  # noqa: E731
    per_epoch = data.micro_batches_per_epoch(n, mb)
    full = ids(data.micro_batches(examples, mb, seed), max(start + 10, per_epoch))
    assert ids(data.micro_batches(examples, mb, seed, start=start), 10) == full[start:start + 10]
    epoch = [i for b in full[:per_epoch] for i in b]
    assert len(epoch) == len(set(epoch)) == per_epoch * min(mb, n)


def test_pack_keeps_every_example_whole_and_restarts_positions():
    examples = [data.Example(list(range(10 * i, 10 * i + n)), list(range(10 * i, 10 * i + n))) for i, n in
                enumerate([5, 3, 7, 2, 8, 4, 6, 2])]
    rows = data.pack(examples, seq_len=10, seed=0)
    assert all(len(r.input_ids) <= 10 for r in rows) and len(rows) < len(examples)
    segments = []
    for r in rows:
        starts = [i for i, p in enumerate(r.position_ids) if p == 0] + [len(r.input_ids)]
        for a, b in zip(starts, starts[1:]):
            segments.append(tuple(r.input_ids[a:b]))
            assert list(r.position_ids[a:b]) == list(range(b - a)) and r.labels[a] == data.IGNORE
            assert r.labels[a + 1:b] == r.input_ids[a + 1:b]
    assert sorted(segments) == sorted(tuple(e.input_ids) for e in examples)  # none split, dropped or repeated
    batch = data.collate(rows[:2], pad_id=0)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
