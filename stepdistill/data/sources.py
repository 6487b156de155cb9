"""Training data of any size, read one example at a time: captions and (when the source has them) images.

``--train_data_dir`` takes one of three layouts, told apart by what is there:

* a folder with ``metadata.jsonl`` rows ``{"file_name": ..., "text": ...}`` (diffusers' ImageFolder);
* a Hugging Face ``datasets`` dataset: a folder written by ``Dataset.save_to_disk`` (memory-mapped
  Arrow), or Parquet files (a ``.parquet`` file or a folder of them, converted to Arrow once in the
  ``datasets`` cache), with ``--image_column`` and ``--caption_column``;
* webdataset tar shards, as a brace pattern (``shards/{00000..00099}.tar``), each sample an image
  (``.jpg``/``.png``/``.webp``) and a caption (``.txt``, or ``.json`` with ``"caption"``/``"text"``),
  read by random access through ``wids``.

``--prompts_file`` (``.txt`` or ``.jsonl``) is read line by line through :class:`TextLines`.

Every source is indexable (``source[i]`` → :class:`Example`, ``source.caption(i)``), so one shuffled,
resumable order (:mod:`stepdistill.data.order`) serves them all, and nothing is read before it is asked for.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from stepdistill.data.lines import TextLines
from stepdistill.data.prompts import DataError, open_image, prompt_of_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_FIELDS = ("caption", "text", "prompt")


@dataclass(frozen=True)
class Example:
    """A caption and, when the source has images, a function that opens the image (``DataError``
    naming the file when it cannot be read)."""

    caption: str
    open_image: Callable[[], Image.Image] | None = None


class PromptsFile:
    """A ``.txt`` (one prompt a line) or ``.jsonl`` prompts file, blank lines skipped."""

    has_images = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"no prompts file at {self.path}")
        self.lines = TextLines(self.path)
        if not len(self.lines):
            raise DataError(f"{self.path} holds no prompts (it is empty or only blank lines)")

    def __len__(self) -> int:
        return len(self.lines)

    def caption(self, index: int) -> str:
        return prompt_of_line(self.path, *self.lines[index])

    def __getitem__(self, index: int) -> Example:
        return Example(self.caption(index))

    def __str__(self) -> str:
        return f"{len(self):,} prompts in {self.path}"


class ImageFolder:
    """A folder of images listed in ``metadata.jsonl`` (``file_name``, ``text``), read row by row."""

    has_images = True

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.metadata = self.folder / "metadata.jsonl"
        self.lines = TextLines(self.metadata)
        if not len(self.lines):
            raise DataError(f"{self.metadata} lists no images")

    def __len__(self) -> int:
        return len(self.lines)

    def _row(self, index: int) -> tuple[str, str]:
        number, line = self.lines[index]
        try:
            row = json.loads(line)
            file_name, caption = row["file_name"], row["text"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{self.metadata}:{number} is not a JSON object with 'file_name' and 'text'") from None
        return file_name, caption

    def caption(self, index: int) -> str:
        return self._row(index)[1]

    def __getitem__(self, index: int) -> Example:
        file_name, caption = self._row(index)
        path = self.folder / file_name
        return Example(caption, lambda: open_image(path, path))

    def __str__(self) -> str:
        return f"{len(self):,} images in {self.folder} (metadata.jsonl)"


class HubDataset:
    """A Hugging Face ``datasets`` dataset on disk (``save_to_disk`` folder or Parquet files)."""

    has_images = True

    def __init__(self, path: str | Path, image_column: str = "image", caption_column: str = "text") -> None:
        import datasets

        self.path = Path(path)
        try:
            if self.path.is_dir() and not any(self.path.glob("*.parquet")):
                dataset = datasets.load_from_disk(str(self.path))
            else:
                files = sorted(self.path.glob("*.parquet")) if self.path.is_dir() else [self.path]
                dataset = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
        except (FileNotFoundError, ValueError, OSError) as error:
            raise DataError(f"cannot open the dataset {self.path}: {str(error).strip().splitlines()[0]}") from None
        if isinstance(dataset, datasets.DatasetDict):
            if "train" not in dataset:
                raise DataError(f"{self.path} holds the splits {sorted(dataset)} and no 'train' split")
            dataset = dataset["train"]
        missing = [c for c in (image_column, caption_column) if c not in dataset.column_names]
        if missing:
            raise DataError(f"{self.path} has no column {missing[0]!r} (its columns: {', '.join(dataset.column_names)}); "
                            "name them with --image_column and --caption_column")
        self.dataset, self.image_column, self.caption_column = dataset, image_column, caption_column
        self.captions = dataset.select_columns([caption_column])

    def __len__(self) -> int:
        return len(self.dataset)

    def caption(self, index: int) -> str:
        return self.captions[index][self.caption_column]

    def __getitem__(self, index: int) -> Example:
        row = self.dataset[index]
        image, name = row[self.image_column], f"{self.path}[{index}]"
        if isinstance(image, Image.Image):
            return Example(row[self.caption_column], lambda: image.convert("RGB"))
        if isinstance(image, dict) and image.get("bytes"):  # an undecoded Image feature
            return Example(row[self.caption_column], lambda: open_image(io.BytesIO(image["bytes"]), name))
        raise DataError(f"{name}: column {self.image_column!r} holds {type(image).__name__}, not an image")

    def __str__(self) -> str:
        return f"{len(self):,} rows of the dataset {self.path} ({self.image_column!r}, {self.caption_column!r})"


class TarShards:
    """Webdataset tar shards named by a brace pattern, indexed once at opening (``wids``)."""

    has_images = True

    def __init__(self, pattern: str) -> None:
        import braceexpand
        import wids

        self.pattern = pattern
        paths = list(braceexpand.braceexpand(pattern))
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise DataError(f"{len(missing)} of the {len(paths)} shards of {pattern} do not exist (the first: {missing[0]})")
        shards = []
        for path in paths:
            try:
                shards.append({"url": path, "nsamples": wids.wids.compute_num_samples(path)})
            except Exception as error:  # wids raises what its tar reader meets
                raise DataError(f"cannot index the tar shard {path}: {error}") from None
        with contextlib.redirect_stderr(io.StringIO()):  # wids prints a summary line on every opening
            self.dataset = wids.ShardListDataset(shards, localname=str, transformations=[])

    def __len__(self) -> int:
        return len(self.dataset)

    def _sample(self, index: int) -> tuple[dict, str]:
        sample = self.dataset[index]
        name = f"{sample['__shard__']}:{sample['__key__']}"
        if ".txt" in sample:
            return sample, sample[".txt"].read().decode("utf-8").strip()
        if ".json" in sample:
            row = json.loads(sample[".json"].read())
            caption = next((row[f] for f in CAPTION_FIELDS if isinstance(row.get(f), str)), None)
            if caption is not None:
                return sample, caption
        raise DataError(f"{name} has no caption (a .txt file, or a .json one with a 'caption' or 'text' field)")

    def caption(self, index: int) -> str:
        return self._sample(index)[1]

    def __getitem__(self, index: int) -> Example:
        sample, caption = self._sample(index)
        name = f"{sample['__shard__']}:{sample['__key__']}"
        stream = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        if stream is None:
            raise DataError(f"{name} has no image (one of {', '.join(IMAGE_EXTENSIONS)})")
        return Example(caption, lambda: open_image(stream, name))

    def __str__(self) -> str:
        return f"{len(self):,} samples in {len(self.dataset.shards)} tar shards {self.pattern}"


Source = PromptsFile | ImageFolder | HubDataset | TarShards


LAYOUTS = ("a folder with metadata.jsonl, a datasets folder (save_to_disk) or Parquet files, or tar shards "
           "('shards/{00000..00099}.tar')")


def layout_of(train_data_dir: str) -> str | None:
    """Which layout ``--train_data_dir`` has, ``"tar"``, ``"imagefolder"`` or ``"datasets"``, told
    without reading it; ``None`` for none of them."""
    path = Path(train_data_dir)
    if "{" in train_data_dir or train_data_dir.endswith(".tar"):
        return "tar"
    if (path / "metadata.jsonl").is_file():
        return "imagefolder"
    saved = any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))  # save_to_disk's
    if saved or (path.suffix == ".parquet" and path.is_file()) or (path.is_dir() and next(path.glob("*.parquet"), None)):
        return "datasets"
    return None


def layout_problem(train_data_dir: str) -> str | None:
    """Why ``--train_data_dir`` cannot be read, in one line, checked without reading it; ``None`` if it may be."""
    layout = layout_of(train_data_dir)
    if layout is None:
        return f"{train_data_dir} is none of the data layouts: {LAYOUTS}"
    if layout == "tar":
        import braceexpand

        first = next(iter(braceexpand.braceexpand(train_data_dir)))
        if not Path(first).is_file():
            return f"{train_data_dir}: its first shard {first} does not exist"
    return None


def open_source(train_data_dir: str | None = None, prompts_file: str | None = None, image_column: str = "image",
                caption_column: str = "text") -> Source:
    """The source ``--train_data_dir`` or ``--prompts_file`` names; :class:`DataError` saying what is wrong."""
    if prompts_file:
        return PromptsFile(prompts_file)
    layout = layout_of(train_data_dir)
    if layout == "tar":
        return TarShards(train_data_dir)
    if layout == "imagefolder":
        return ImageFolder(train_data_dir)
    if layout == "datasets":
        return HubDataset(train_data_dir, image_column, caption_column)
    raise DataError(layout_problem(train_data_dir))
