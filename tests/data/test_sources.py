"""Every ``--train_data_dir`` layout reads the same examples, lazily; large text files are read by line number."""

from __future__ import annotations

import pytest
import torch

from stepdistill.data import sources
from stepdistill.data.lines import TextLines
from stepdistill.data.loader import TrainingExamples, collate
from digits_layouts import quantised_digits, write_layouts

COUNT = 12


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return write_layouts(tmp_path_factory.mktemp("layouts"), COUNT)


@pytest.mark.parametrize("layout", ["imagefolder", "datasets", "parquet", "tar"])
def test_every_layout_reads_the_digits_in_order(layouts, layout):
    source = sources.open_source(layouts[layout])
    assert len(source) == COUNT and source.has_images
    images, captions = quantised_digits(COUNT)
    examples = TrainingExamples(source, 32)
    batch = collate([examples[(index, index)] for index in range(COUNT)])
    assert batch["captions"] == captions == [source.caption(index) for index in range(COUNT)]
    assert torch.equal(batch["images"], images)


def test_a_layout_is_told_without_reading_it(layouts, tmp_path):
    assert [sources.layout_of(layouts[name]) for name in ("imagefolder", "datasets", "parquet", "tar")] == [
        "imagefolder", "datasets", "datasets", "tar"]
    assert "none of the data layouts" in sources.layout_problem(str(tmp_path))
    assert "shard-{5..6}.tar: its first shard" in sources.layout_problem(str(tmp_path / "shard-{5..6}.tar"))


def test_a_missing_column_names_the_columns_there(layouts):
    with pytest.raises(sources.DataError, match="no column 'caption' .*columns: image, text.*--caption_column"):
        sources.open_source(layouts["datasets"], caption_column="caption")


def test_text_lines_are_read_by_number_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(TextLines, "BLOCK", 3)
    lines = ["", "one", "two", "  ", "three", "four", "", "", "five", "six", "seven"]
    (tmp_path / "p.txt").write_text("\n".join(lines))
    text = TextLines(tmp_path / "p.txt")
    expected = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    assert len(text) == len(expected) and [text[index] for index in range(len(text))] == expected
