"""What a media response's headers say about the object."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from service.clients.storage.media import MediaInfo, media_info


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


async def test_cloud_storage_headers() -> None:
    info = media_info(
        headers(
            ("Content-Length", "12"),
            ("Content-Type", "text/plain"),
            ("ETag", '"CKih16GjycICEAE="'),
            ("X-Goog-Generation", "1700000000000000"),
            ("X-Goog-Hash", "crc32c=n03x6A=="),
            ("X-Goog-Hash", "md5=Ojk9c3dhfxgoKVVHYwFbHQ=="),
        )
    )
    assert info == MediaInfo(
        size=12, etag="CKih16GjycICEAE=", content_type="text/plain", generation="1700000000000000"
    )


async def test_emulator_headers_give_the_md5_as_etag() -> None:
    info = media_info(
        headers(
            ("Content-Length", "0"),
            ("X-Goog-Hash", "crc32c=AAAAAA==,md5=1B2M2Y8AsgTpgAmY7PhCfg=="),
        )
    )
    assert info == MediaInfo(
        size=0,
        etag="1B2M2Y8AsgTpgAmY7PhCfg==",
        content_type="application/octet-stream",
        generation=None,
    )


@pytest.mark.parametrize(
    "pairs",
    [
        [("ETag", '"e"')],
        [("Content-Length", "x"), ("ETag", '"e"')],
        [("Content-Length", "3"), ("X-Goog-Hash", "crc32c=AAAAAA==")],
        [("Content-Length", "3"), ("ETag", '"e"'), ("Content-Encoding", "gzip")],
    ],
    ids=["no length", "bad length", "no etag nor md5", "encoded"],
)
async def test_not_enough_said(pairs: list[tuple[str, str]]) -> None:
    assert media_info(headers(*pairs)) is None
