"""List-valued settings are read one way: comma-separated, blanks and spaces ignored, sizes checked at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from imagesmith.config import Settings


def test_list_settings_ignore_spaces_and_empty_items(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        api_keys=" key-one, ,key-two ,",
        warmup_sizes="1024x1024, 832x1216,",
        pexels_allowed_hosts="images.pexels.com, ,http://127.0.0.1:9000",
    )
    assert settings.api_key_list() == ["key-one", "key-two"]
    assert settings.warmup_size_list() == [(1024, 1024), (832, 1216)]
    assert settings.pexels_allowed_hosts == ["images.pexels.com", "http://127.0.0.1:9000"]


def test_a_bad_size_in_a_list_is_refused_at_start_naming_the_form(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="a size looks like 1216x832"):
        Settings(_env_file=None, data_dir=tmp_path, warmup_sizes="1024x1024, 1024")


@pytest.mark.parametrize("value", ["", " , "])
def test_an_empty_warm_up_size_list_is_refused_naming_the_fix(tmp_path: Path, value: str) -> None:
    """Empty, a compiled server warmed up nothing and then ran every pass uncompiled, saying it compiled."""
    with pytest.raises(ValidationError, match="IMAGESMITH_WARMUP_SIZES lists no size: give at least one WxH"):
        Settings(_env_file=None, data_dir=tmp_path, warmup_sizes=value)
    # The fix it names works: without a warm-up the list is not read.
    assert (
        Settings(_env_file=None, data_dir=tmp_path, warmup_sizes=value, warmup=False).warmup_size_list() == []
    )


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("warmup_sizes", "1024x1024,1001x1024", "width must be a multiple of 8"),
        ("stock_default_size", "4096x4096", "width must be between 64 and 2048"),
        ("default_height", 1020, "multiple of 8"),
    ],
)
def test_sizes_in_settings_follow_the_request_rules_at_start(
    tmp_path: Path, setting: str, value: object, says: str
) -> None:
    """A size no request could have is refused when the settings load, not at warm-up or on a request."""
    with pytest.raises(ValidationError, match=says):
        Settings(_env_file=None, data_dir=tmp_path, **{setting: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "variable"), [("fp8_convs", "FP8_CONVS"), ("fp8_fused_geglu", "FP8_FUSED_GEGLU")]
)
def test_fp8_extras_need_static_fp8_linears(field: str, variable: str) -> None:
    """fp8 convolutions and the fused GEGLU take scales calibrated with the static fp8 linears'."""
    with pytest.raises(
        ValidationError, match=f"IMAGESMITH_{variable}=true needs fp8 linears with static scales"
    ):
        Settings(**{field: True})
    with pytest.raises(ValidationError, match=f"IMAGESMITH_FP8=true.*unset IMAGESMITH_{variable}"):
        Settings(**{"fp8": True, "fp8_scales": "dynamic", field: True})
    assert getattr(Settings(**{"fp8": True, field: True}), field)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        # Taken as the host name "images.pexels.com:443", which no URL has: every download was refused, in a
        # message that named the entry as allowed.
        ("images.pexels.com:443", "for a port write 'https://images.pexels.com:443'"),
        ("127.0.0.1:8099", "for a port write 'https://127.0.0.1:8099'"),
        ("images.pexels.com/photos", "must be a host name"),
        ("ftp://images.pexels.com", "http(s)://host[:port] origin"),
        ("http://127.0.0.1:99999", "http(s)://host[:port] origin"),
        # A path was dropped without a word, and credentials kept and printed by doctor.
        ("http://127.0.0.1:8099/photos", "with no user, password or path: write 'http://127.0.0.1:8099'"),
        ("https://user:secret@cdn.example.com", "'https://...@cdn.example.com'"),
        ("https://cdn.example.com/?x=1", "with no query"),
        ("", "is empty, so every photo download would be refused"),
        (" , ", "is empty"),
    ],
)
def test_an_allowed_host_no_download_could_match_stops_the_start(
    tmp_path: Path, entries: str, message: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None, data_dir=tmp_path, pexels_allowed_hosts=entries)  # type: ignore[arg-type]
    text = str(raised.value)
    assert "IMAGESMITH_PEXELS_ALLOWED_HOSTS" in text and message in text, text
    assert "secret" not in text.split("input_value")[0]  # the message itself does not repeat a password


def test_allowed_hosts_that_downloads_can_match_are_kept(tmp_path: Path) -> None:
    entries = "images.pexels.com, http://127.0.0.1:8099, https://cdn.example.com:8443/"
    settings = Settings(_env_file=None, data_dir=tmp_path, pexels_allowed_hosts=entries)  # type: ignore[arg-type]
    assert settings.pexels_allowed_hosts == [
        "images.pexels.com",
        "http://127.0.0.1:8099",
        "https://cdn.example.com:8443/",
    ]


@pytest.mark.parametrize("url", ["notaurl", "ftp://api.pexels.com/v1", "https://", "api.pexels.com/v1"])
def test_a_pexels_base_url_that_cannot_be_called_stops_the_start(tmp_path: Path, url: str) -> None:
    with pytest.raises(
        ValidationError, match=r"must be an http\(s\) URL such as https://api\.pexels\.com/v1"
    ):
        Settings(_env_file=None, data_dir=tmp_path, pexels_api_base_url=url)
    kept = Settings(_env_file=None, data_dir=tmp_path, pexels_api_base_url=" http://127.0.0.1:8099/v1 ")
    assert kept.pexels_api_base_url == "http://127.0.0.1:8099/v1"


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ('IMAGESMITH_PEXELS_API_KEY="abc123', " (IMAGESMITH_PEXELS_API_KEY)"),  # a quote left open
        ("IMAGESMITH_API_KEYS c2VjcmV0X3Rva2Vu==", ""),  # no "=" after the name: the key's padding is not one
        ("IMAGESMITH_API_KEYS: s3cr3t=", ""),
        ('IMAGESMITH_PEXELS_API_KEY "abc=def"', ""),
    ],
)
def test_a_settings_file_line_is_named_by_its_setting_never_by_its_value(
    tmp_path: Path, line: str, named: str
) -> None:
    from imagesmith.config import env_file_problem

    env_file = tmp_path / ".env"
    env_file.write_text(f"IMAGESMITH_DEVICE=cpu\n{line}\n")
    problem = env_file_problem(env_file)
    assert problem is not None and f"line 2{named} cannot be read as NAME=value" in problem, problem
    for secret in ("abc123", "c2VjcmV0", "s3cr3t", "abc="):
        assert secret not in problem


def test_an_empty_data_dir_is_refused_not_taken_as_the_current_folder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Path('') is '.': the job store and images went wherever the process started."""
    monkeypatch.setenv("IMAGESMITH_DATA_DIR", " ")
    with pytest.raises(
        ValidationError, match=r"data_dir\n.*is empty, which would put the data in whatever folder"
    ):
        Settings()


def test_an_empty_compile_cache_dir_means_its_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("IMAGESMITH_COMPILE_CACHE_DIR", "")
    assert Settings(data_dir=tmp_path).compile_cache_dir is None


@pytest.mark.parametrize(
    ("sizes", "named"),
    [
        (
            {"default_width": 128, "default_height": 128, "stock_default_size": ""},
            "IMAGESMITH_DEFAULT_WIDTH x IMAGESMITH_DEFAULT_HEIGHT (128x128",
        ),
        (
            {"default_width": 64, "default_height": 64, "stock_default_size": "128x96"},
            "IMAGESMITH_STOCK_DEFAULT_SIZE (128x96",
        ),
    ],
)
def test_a_pixel_limit_below_a_default_size_is_refused_at_start(
    tmp_path: Path, sizes: dict[str, object], named: str
) -> None:
    """Every request without a size was refused by the server (400), which an OpenAI client cannot fix."""
    with pytest.raises(ValidationError, match=r"max_total_pixels\n") as caught:
        Settings(data_dir=tmp_path, max_total_pixels=64 * 64 * 2, **sizes)
    assert f"8192 pixels is less than one image of {named}" in str(caught.value)
    assert "so every request without a size would be refused; raise it, or lower that size" in str(
        caught.value
    )
    # Room for one image of each default is enough (a request for more is the request's to lower).
    Settings(data_dir=tmp_path, max_total_pixels=128 * 128, **sizes)


def test_a_pexels_locale_is_checked_when_the_settings_load(tmp_path: Path) -> None:
    """IMAGESMITH_PEXELS_LOCALE=german was sent to Pexels as typed, where `search --locale german` was refused."""
    with pytest.raises(ValidationError, match=r"pexels_locale[\s\S]*'german' is not a locale: write it as"):
        Settings(_env_file=None, data_dir=tmp_path, pexels_locale="german")
    assert Settings(_env_file=None, data_dir=tmp_path, pexels_locale=" de-DE ").pexels_locale == "de-DE"
    assert Settings(_env_file=None, data_dir=tmp_path).pexels_locale == ""  # Pexels' own default


def test_a_cpu_thread_count_no_machine_has_is_refused_at_start(tmp_path: Path) -> None:
    """99999 threads segfaulted the process inside libgomp, naming no setting; 3 or 1024 are taken."""
    with pytest.raises(ValidationError, match="less than or equal to 1024"):
        Settings(data_dir=tmp_path, cpu_threads=99999)
    assert Settings(data_dir=tmp_path, cpu_threads=1024).cpu_threads == 1024


def test_a_model_path_with_a_name_no_file_system_takes_is_refused_at_start(tmp_path: Path) -> None:
    """A 300-byte folder name was a traceback from the first `exists()` that met it (doctor, generate)."""
    with pytest.raises(ValidationError, match="is 300 bytes, more than the 255 a file system takes"):
        Settings(data_dir=tmp_path, base_model=f"/tmp/{'m' * 300}")
    assert Settings(data_dir=tmp_path, base_model="stabilityai/stable-diffusion-xl-base-1.0").base_model


def test_the_photo_pixel_cap_stops_at_pillows_own_limit() -> None:
    """Above Pillow's limit the setting had no effect: Image.open refuses first, whatever it says."""
    from pydantic import ValidationError

    from imagesmith.config import PILLOW_PIXEL_LIMIT

    assert Settings(pexels_max_image_pixels=PILLOW_PIXEL_LIMIT).pexels_max_image_pixels == PILLOW_PIXEL_LIMIT
    with pytest.raises(ValidationError, match="pexels_max_image_pixels"):
        Settings(pexels_max_image_pixels=PILLOW_PIXEL_LIMIT + 1)
