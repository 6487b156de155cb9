"""The cache's storage: rows written in batches come back one by one across shard boundaries, captions and all."""

from __future__ import annotations

import pytest
import torch

from stepdistill.data.cache import MANIFEST, CachedExamples, CacheWriter
from stepdistill.data.prompts import DataError

CAPTIONS = ["a cat", "", "un café", "a dog", "🐈 emoji", "six", "seven"]


def fill(folder, with_latents: bool) -> tuple[torch.Tensor, torch.Tensor]:
    latents, embeds = torch.randn(7, 4, 2, 2), torch.randn(7, 3, 5)
    writer = CacheWriter(folder, {"resolution": 16}, shard_size=3)
    for start in range(0, 7, 2):
        rows = slice(start, start + 2)
        writer.add(CAPTIONS[rows], latents[rows] if with_latents else None, {"prompt_embeds": embeds[rows]})
    manifest = writer.close()
    assert [shard["count"] for shard in manifest["shards"]] == [3, 3, 1] and manifest["count"] == 7
    return latents, embeds


@pytest.mark.parametrize("with_latents", [True, False])
def test_rows_come_back_in_order_across_shards(tmp_path, with_latents):
    latents, embeds = fill(tmp_path, with_latents)
    cached = CachedExamples(tmp_path)
    assert len(cached) == 7 and cached.manifest["has_images"] == with_latents
    for index in range(7):
        row = cached[(index, 0)]
        assert row["caption"] == CAPTIONS[index] == cached.caption(index)
        assert torch.equal(row["condition"]["prompt_embeds"], embeds[index])
        assert torch.equal(row["latents"], latents[index]) if with_latents else "latents" not in row


def test_a_cache_whose_writing_did_not_finish_is_refused(tmp_path):
    fill(tmp_path, True)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(DataError, match="not a finished cache .*python -m stepdistill cache"):
        CachedExamples(tmp_path)
