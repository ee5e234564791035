"""The pure parts of picking: the query, the orientation, the ranking, the CDN URL, the cache."""

from __future__ import annotations

import pytest
from pexels_standin import FakeClock

from imagesmith.sources.pexels_client import Orientation, PexelsPhoto, PexelsSearchPage
from imagesmith.sources.stock import (
    SearchCache,
    StockRequest,
    build_query,
    normalise_query,
    orientation_for,
    rank_photos,
    variant_url,
)


def photo(photo_id: int, width: int, height: int) -> PexelsPhoto:
    return PexelsPhoto.model_validate(
        {
            "id": photo_id,
            "width": width,
            "height": height,
            "url": f"https://www.pexels.com/photo/{photo_id}/",
            "photographer": "P",
            "photographer_url": "https://www.pexels.com/@p",
            "src": {"original": f"https://images.pexels.com/photos/{photo_id}/pexels-photo-{photo_id}.jpeg"},
        }
    )


def test_query_prefers_keywords_then_title_then_prompt() -> None:
    assert build_query("a prompt", "A Title", ["coffee", " cup ", "Coffee", ""]) == "coffee cup"
    assert build_query("a prompt", "  A Title ", []) == "A Title"
    assert build_query("a (red:1.3) fox in [snow], 8k, trending", None, None) == "a red fox in snow"
    assert build_query("sunset", None, None) == "sunset"  # one word: the whole prompt stays
    long = build_query("word " * 40)
    assert len(long) <= 80 and not long.endswith(" ")
    with pytest.raises(ValueError, match="keywords, a title or a prompt"):
        build_query("  ", None, None)
    assert StockRequest(keywords=["  "], title="t").query() == "t"


def test_normalise_query() -> None:
    assert normalise_query("  Mountain   LAKE! ") == normalise_query("mountain lake") == "mountain lake"
    # Punctuation alone stays itself: all three were "" and shared one cache entry and one repeat memory.
    assert len({normalise_query(query) for query in ("!!!", "???", "...")}) == 3


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1216, 832), Orientation.LANDSCAPE),
        ((1344, 768), Orientation.LANDSCAPE),
        ((1024, 1024), Orientation.SQUARE),
        ((1100, 1000), Orientation.SQUARE),
        ((832, 1216), Orientation.PORTRAIT),
    ],
)
def test_orientation_follows_the_size(size: tuple[int, int], expected: Orientation) -> None:
    assert orientation_for(*size) is expected


def test_ranking_aspect_then_coverage_then_relevance() -> None:
    photos = [
        photo(1, 1920, 1080),  # 16:9, most relevant
        photo(2, 900, 600),  # 3:2 but too small for 1216x832
        photo(3, 3000, 2000),  # 3:2 and big
        photo(4, 3000, 2010),  # 3:2 within the step, big, less relevant than 3
        photo(5, 1000, 1500),  # portrait
    ]
    assert [p.id for p in rank_photos(photos, 1216, 832)] == [3, 4, 2, 1, 5]
    assert rank_photos(photos, 1344, 768)[0].id == 1  # a 16:9 request wants the 16:9 photo


def test_variant_url_asks_the_cdn_for_the_crop_only_when_big_enough() -> None:
    big, small = photo(3, 3000, 2000), photo(2, 900, 600)
    assert variant_url(big, 1216, 832) == (
        "https://images.pexels.com/photos/3/pexels-photo-3.jpeg?auto=compress&cs=tinysrgb&fit=crop&w=1216&h=832"
    )
    assert variant_url(small, 1216, 832) == small.src.original


def test_cache_expires_and_evicts() -> None:
    clock = FakeClock()
    cache = SearchCache(ttl_s=10, max_entries=2, clock=clock)
    page = PexelsSearchPage(photos=[])
    cache.put(("a",), page)
    cache.put(("b",), page)
    assert cache.get(("a",)) is page  # "a" is now the most recently used
    cache.put(("c",), page)
    assert cache.get(("b",)) is None and len(cache) == 2
    clock.advance(10)
    assert cache.get(("a",)) is None
    off = SearchCache(ttl_s=0)
    off.put(("a",), page)
    assert off.get(("a",)) is None
