"""Problem sets in every supported format (JSON Lines, JSON, Parquet, saved datasets), nested fields, chat-message
questions, and errors that name the file, the record and the field."""

from __future__ import annotations

import json

import pytest

from vpgea.data import Example, load_dataset

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

ROWS = [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
     "reward_model": {"ground_truth": "2"}, "extra_info": {"question": "What is 1+1?", "answer": 2}},
    {"prompt": [{"role": "user", "content": "2+2?"}],
     "reward_model": {"ground_truth": "4"}, "extra_info": {"question": "What is 2+2?", "answer": 4}},
]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check_verl(ex, where0, where1):
    assert [(e.question, e.answer) for e in ex] == [("1+1?", "2"), ("2+2?", "4")]
    assert ex[0].history == ({"role": "system", "content": "Be brief."},) and ex[1].history == ()
    assert (ex[0].source, ex[1].source) == (where0, where1)
    assert ex[0].record["extra_info"]["question"] == "What is 1+1?"


def test_every_format_reads_the_same_records(tmp_path):
    j = _jsonl(tmp_path / "d.jsonl", ROWS)
    _check_verl(load_dataset(j), f"{j}:1", f"{j}:2")
    a = tmp_path / "d.json"
    a.write_text(json.dumps(ROWS))
    _check_verl(load_dataset(a), f"{a}:row 0", f"{a}:row 1")
    jl = _jsonl(tmp_path / "lines.json", ROWS)  # JSON Lines under a .json name
    _check_verl(load_dataset(jl), f"{jl}:1", f"{jl}:2")
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    _check_verl(load_dataset(p), f"{p}:row 0", f"{p}:row 1")
    odd = tmp_path / "d.data"  # Parquet under another name: recognised by its magic bytes
    odd.write_bytes(p.read_bytes())
    _check_verl(load_dataset(odd), f"{odd}:row 0", f"{odd}:row 1")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    _check_verl(load_dataset(saved), f"{saved}:row 0", f"{saved}:row 1")
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(dd))
    assert len(load_dataset(dd)) == 2  # one split: that one
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS)}
                         ).save_to_disk(str(tmp_path / "dd2"))
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\]; pass one split's directory"):
        load_dataset(tmp_path / "dd2")
    assert len(load_dataset(tmp_path / "dd2" / "test", limit=1)) == 1


def test_nested_fields_and_numbers(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    ex = load_dataset(p, question_field="extra_info.question", answer_field="extra_info.answer")
    assert [(e.question, e.answer, e.history) for e in ex] == [("What is 1+1?", "2", ()), ("What is 2+2?", "4", ())]
    assert load_dataset(p, question_field="prompt.0.content")[0].question == "Be brief."
    f = _jsonl(tmp_path / "n.jsonl", [{"q": "a", "a": 27.0}, {"q": "b", "a": 0.5}, {"q": "c", "a": -3}])
    assert [e.answer for e in load_dataset(f, question_field="q", answer_field="a")] == ["27", "0.5", "-3"]
    f = _jsonl(tmp_path / "dotted.jsonl", [{"x.y": "literal key", "answer": "1"}])
    assert load_dataset(f, question_field="x.y")[0] == Example("literal key", "1", f"{f}:1")


@pytest.mark.parametrize("row,fields,match", [
    ({"question": 12, "answer": "1"}, {}, r":1: field 'question' must be a string or a list of chat messages.*got int"),
    ({"question": {"text": "q"}, "answer": "1"}, {}, "must be a string or a list of chat messages"),
    ({"question": [], "answer": "1"}, {}, "got an empty list"),
    ({"question": "q", "answer": ["1", "2"]}, {}, r"field 'answer' must be a string or a number, got list"),
    ({"question": "q", "answer": True}, {}, "must be a string or a number, got bool"),
    ({"question": "q", "answer": {"v": 1}}, {}, "got dict"),
    ({"question": "q", "answer": None}, {}, "field 'answer' is null"),
    ({"question": "q", "answer": "  "}, {}, "field 'answer' is empty"),
    ({"question": "q", "answer": float("nan")}, {}, "finite number"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "1"}, {},
     "the last chat message must be the user's"),
    ({"prompt": [{"role": "user", "content": [{"type": "text", "text": "q"}]}], "answer": "1"}, {},
     r"message 0: expected \{'role': str, 'content': str\}, got role str and content list"),
    ({"prompt": [{"role": "user"}], "answer": "1"}, {}, "content NoneType"),
    ({"extra_info": {"question": "q"}, "answer": "1"}, {"question_field": "extra_info.q"},
     r"missing field 'extra_info.q': 'extra_info' has no 'q' \(fields present: \['question'\]\)"),
])
def test_bad_records_name_file_row_and_field(tmp_path, row, fields, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=match) as e:
        load_dataset(f, **fields)
    assert f"{f}:1: " in str(e.value)


def test_bad_parquet_rows_and_files(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "a", "answer": "1"}, {"question": "b", "answer": None}]), p)
    with pytest.raises(ValueError, match=rf"{p}:row 1: field 'answer' is null"):
        load_dataset(p)
    pq.write_table(pa.Table.from_pylist([{"question": "a", "answer": [1, 2]}]), p)
    with pytest.raises(ValueError, match=rf"{p}:row 0: field 'answer' must be a string or a number, got list"):
        load_dataset(p)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=rf"{broken}: not a readable Parquet file"):
        load_dataset(broken)
    binary = tmp_path / "x.jsonl"
    binary.write_bytes(b'{"question": "a", "answer": "1"}\n\xff\xfe\x00garbage\n')
    with pytest.raises(ValueError, match=rf"{binary}:2: not UTF-8 text.*Parquet \(\.parquet\)"):
        load_dataset(binary)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="not a saved Hugging Face dataset"):
        load_dataset(tmp_path / "emptydir")
    a = tmp_path / "obj.json"
    a.write_text('[{"question": "a", "answer": "1"}, 3]')
    with pytest.raises(ValueError, match=rf"{a}:row 1: expected a JSON object, got int"):
        load_dataset(a)
    a.write_text('"just a string"')
    with pytest.raises(ValueError, match="expected a JSON array of objects"):
        load_dataset(a)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_dataset(tmp_path / "nope.parquet")


def test_bad_data_exits_2_naming_the_row(tiny_model_dir, tmp_path, capsys):
    from vpgea import train

    p = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "3 +4", "answer": 7.0}, {"question": "1 +1", "answer": 2.5}]),
                   p)
    ok = train.main(["--model", str(tiny_model_dir), "--train-data", str(p), "--output-dir", str(tmp_path / "o"),
                     "--max-steps", "0"])
    assert ok == 0  # a numeric answer column is fine ("7", "2.5")
    pq.write_table(pa.Table.from_pylist([{"question": [{"role": "user", "content": "3 +4"}], "answer": "7"},
                                         {"question": [{"role": "assistant", "content": "x"}], "answer": "2"}]), p)
    assert train.main(["--model", str(tiny_model_dir), "--train-data", str(p), "--output-dir",
                       str(tmp_path / "o")]) == 2
    assert f"{p}:row 1: field 'question': the last chat message must be the user's" in capsys.readouterr().err
