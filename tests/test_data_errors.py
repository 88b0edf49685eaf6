"""A bad local data file is an error that names the file, the line and the cause.

One test per way a CSV / TSV / JSON / JSONL file can be wrong; each writes the file, loads it, and
reads the message as a user would. Good files load as before (tests/test_sources.py).
"""

import csv
import json

import pytest

from sharelora.cli import main
from sharelora.sources import SourceError, load_dataset


def error(tmp_path, name, content, **options) -> str:
    """The SourceError message of loading a file ``name`` holding ``content`` (text is written as UTF-8)."""
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    with pytest.raises(SourceError) as info:
        load_dataset(path, **options)
    message = str(info.value)
    assert "\n" not in message, "an error is one line"
    return message


# ---- CSV / TSV -------------------------------------------------------------------------------

def test_an_unclosed_quote_names_the_line_it_opened_on(tmp_path):
    msg = error(tmp_path, "data.csv", 'text,label\n"fine film,1\nbad film,0\ngood film,1\n')
    assert "data.csv, line 2: a quoted field is never closed (opened on line 2" in msg
    assert "check the quotes in that line" in msg and '"fine film,1' in msg
    assert "label" not in msg  # the cause, not a complaint about labels


def test_an_unclosed_quote_after_a_closed_multiline_field_names_where_it_opened(tmp_path):
    msg = error(tmp_path, "data.csv", 'text,label\n"two\nlines","and, open\n0\n')
    assert "data.csv, line 2: a quoted field is never closed (opened on line 3" in msg


def test_an_unclosed_quote_in_a_long_file_is_found_before_the_field_limit(tmp_path):
    limit = csv.field_size_limit()
    csv.field_size_limit(200)
    try:
        msg = error(tmp_path, "data.csv", 'text,label\nok,1\n"open,1\n' + "more text,0\n" * 50)
    finally:
        csv.field_size_limit(limit)
    assert "data.csv, line 3: a quoted field opened on line 3 is still open" in msg
    assert "a quote is probably never closed" in msg


def test_text_after_a_closing_quote_names_the_line(tmp_path):
    msg = error(tmp_path, "data.csv", 'text,label\nfine,1\n"great" film,1\n')
    assert "data.csv, line 3: text follows the closing quote of a quoted field" in msg
    assert 'twice ("")' in msg


def test_a_row_with_too_many_fields_names_the_line(tmp_path):
    msg = error(tmp_path, "data.csv", "text,label\nfine,1\nfine, really,1\n")
    assert "data.csv, line 3: 3 fields but the header (line 1) has 2 (text, label)" in msg
    assert "inside a quoted field" in msg


def test_a_row_with_too_few_fields_names_the_line(tmp_path):
    msg = error(tmp_path, "data.tsv", "text\tlabel\nfine\t1\nno label here\n")
    assert "data.tsv, line 3: 1 field but the header (line 1) has 2 (text, label)" in msg
    assert "a value is missing" in msg


def test_a_header_naming_a_column_twice_is_an_error(tmp_path):
    msg = error(tmp_path, "data.csv", "text,label,text\na,1,b\n")
    assert "data.csv, line 1: the header names column 'text' twice (columns 1 and 3)" in msg


def test_an_empty_csv_says_it_needs_a_header(tmp_path):
    msg = error(tmp_path, "data.csv", "\n\n")
    assert "data.csv is empty" in msg and "header" in msg


def test_a_csv_with_only_a_header_says_it_has_no_rows(tmp_path):
    msg = error(tmp_path, "data.csv", "text,label\n")
    assert "data.csv, line 1: the header (text, label) has no rows below it" in msg


def test_a_tab_separated_file_named_csv_says_so(tmp_path):
    msg = error(tmp_path, "data.csv", "text\tlabel\nfine\t1\n")
    assert "data.csv, line 1" in msg and "has tabs but no commas" in msg and ".tsv" in msg


# ---- JSON / JSONL ----------------------------------------------------------------------------

def test_a_jsonl_line_that_is_not_json_names_line_and_column(tmp_path):
    msg = error(tmp_path, "data.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": }\n')
    assert "data.jsonl, line 3 is not valid JSON (Expecting value at column 24)" in msg


def test_a_json_file_that_is_not_json_names_the_decoders_line_and_column(tmp_path):
    msg = error(tmp_path, "data.json", '[\n  {"text": "a", "label": 1},\n  {"text": "b" "label": 0}\n]\n')
    assert "data.json, line 3, column 16: not valid JSON (Expecting ',' delimiter)" in msg


def test_json_lines_named_json_are_told_to_be_named_jsonl(tmp_path):
    msg = error(tmp_path, "data.json", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert "data.json, line 2, column 1" in msg and "name the file .jsonl" in msg


def test_a_jsonl_row_that_is_not_an_object_names_the_line(tmp_path):
    msg = error(tmp_path, "data.jsonl", '{"text": "a", "label": 1}\n["b", 0]\n')
    assert "data.jsonl, line 2: the row is a JSON array, not an object" in msg


def test_a_json_row_that_is_not_an_object_names_its_line(tmp_path):
    msg = error(tmp_path, "data.json", '[\n {"text": "a", "label": 1},\n "b"\n]')
    assert "data.json, line 3: the row is a JSON string, not an object" in msg


def test_an_empty_jsonl_says_it_has_no_rows(tmp_path):
    msg = error(tmp_path, "data.jsonl", "\n  \n")
    assert "data.jsonl holds no rows" in msg


def test_an_empty_json_file_and_an_empty_list_say_so(tmp_path):
    assert "data.json is empty" in error(tmp_path, "data.json", "")
    assert "list.json holds no rows" in error(tmp_path, "list.json", "[]")


def test_a_json_field_named_twice_names_the_row(tmp_path):
    jsonl = error(tmp_path, "data.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "text": "c", "label": 0}\n')
    assert "data.jsonl, line 2: field 'text' appears twice in one object" in jsonl
    pretty = json.dumps([{"text": "a", "label": 1}, {"text": "b", "label": 0}], indent=1)
    pretty = pretty.replace('"text": "b"', '"text": "b", "text": "c"')
    assert "data.json, line 6: field 'text' appears twice" in error(tmp_path, "data.json", pretty)


# ---- columns and labels ----------------------------------------------------------------------

def test_a_missing_text_column_lists_the_columns_and_the_flag(tmp_path):
    msg = error(tmp_path, "data.csv", "body,label\nfine,1\n")
    assert "data.csv: no text column found among the columns ['body', 'label']" in msg
    assert "--text-column" in msg


def test_a_missing_label_column_suggests_the_near_one_and_the_flag(tmp_path):
    msg = error(tmp_path, "data.csv", "text,labels\nfine,1\n")
    assert "data.csv: column 'label' not found (did you mean 'labels'?); columns: ['text', 'labels']" in msg
    assert "--label-column" in msg


def test_a_row_missing_a_field_names_its_line(tmp_path):
    msg = error(tmp_path, "data.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c"}\n')
    assert "data.jsonl, line 3: the row has no 'label' field (its fields: ['text'])" in msg


def test_class_ids_mixed_with_class_names_name_the_first_offender_and_both_kinds(tmp_path):
    msg = error(tmp_path, "data.csv", "text,label\na,0\nb,1\nc,positive\nd,negative\n")
    assert "data.csv, line 4: the label 'positive' in column 'label' is text (a class name)" in msg
    assert "the labels before it are integer class ids (the first, '0', on line 2)" in msg
    assert "label_names=" in msg


def test_a_float_among_integer_labels_names_the_line_and_suggests_regression(tmp_path):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": 0.5}]
    msg = error(tmp_path, "data.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert "data.jsonl, line 3: the label 0.5 in column 'label' is a number with a fraction" in msg
    assert "integer class ids" in msg and "--task-type regression" in msg


def test_mixed_labels_in_a_json_file_name_the_line_of_the_row(tmp_path):
    data = {"train": [{"text": "a", "label": 1}, {"text": "b", "label": 0}], "dev": [{"text": "c", "label": "x"}]}
    msg = error(tmp_path, "data.json", json.dumps(data, indent=1))
    assert "data.json, line 13: the label 'x'" in msg and "integer class ids" in msg


def test_an_empty_label_names_the_line(tmp_path):
    msg = error(tmp_path, "data.csv", "text,label\na,1\nb,\n")
    assert "data.csv, line 3: the label in column 'label' is empty" in msg


def test_a_regression_label_that_is_not_a_number_names_the_line(tmp_path):
    msg = error(tmp_path, "data.csv", "text,label\na,0.5\nb,high\n", task_type="regression")
    assert "data.csv, line 3: the regression label 'high' in column 'label' is not a number" in msg


def test_a_split_value_that_is_not_a_split_names_the_line(tmp_path):
    msg = error(tmp_path, "data.csv", "text,label,split\na,1,train\nb,0,holdout\n", split_column="split")
    assert "data.csv, line 3: split value 'holdout' is not one of" in msg


def test_a_bad_file_in_a_folder_is_named(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,1\nb,0\n")
    (tmp_path / "dev.csv").write_text('text,label\n"c,1\n')
    with pytest.raises(SourceError, match=r"dev\.csv, line 2: a quoted field is never closed"):
        load_dataset(tmp_path)


# ---- encodings -------------------------------------------------------------------------------

def test_a_utf8_byte_order_mark_is_read_as_nothing(tmp_path):
    plain = "text,label\na,1\nb,0\n"
    for name, text in (("d.csv", plain), ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n'),
                       ("d.json", '[{"text": "a", "label": 1}, {"text": "b", "label": 0}]')):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        (tmp_path / ("no-bom-" + name)).write_text(text)
        with_bom, without = load_dataset(tmp_path / name), load_dataset(tmp_path / ("no-bom-" + name))
        assert with_bom.splits == without.splits and with_bom.splits["train"]


def test_a_utf16_file_is_told_to_be_saved_as_utf8(tmp_path):
    msg = error(tmp_path, "data.csv", "text,label\na,1\n".encode("utf-16"))
    assert "data.csv is UTF-16 text" in msg and "re-save it as UTF-8" in msg


def test_a_utf16_file_without_a_byte_order_mark_names_the_first_nul_byte(tmp_path):
    msg = error(tmp_path, "data.csv", "text,label\na,1\n".encode("utf-16-le"))
    assert "data.csv, line 1: byte 1 is a NUL byte" in msg and "re-save it as UTF-8" in msg


def test_a_latin1_file_names_the_line_and_the_byte_offset(tmp_path):
    msg = error(tmp_path, "data.csv", "text,label\nnice,1\ncafé au lait,0\n".encode("latin-1"))
    assert "data.csv, line 3: byte 21 (0xe9) is not UTF-8" in msg
    assert "'café au lait,0'" in msg and "re-save it as UTF-8" in msg


# ---- the command line ------------------------------------------------------------------------

def test_the_cli_prints_a_bad_file_as_one_line_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text('text,label\n"fine film,1\nbad film,0\n')
    assert main(["train", "--dataset", str(bad), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("sharelora train: error: ") and "bad.csv, line 2: a quoted field is never closed" in err
