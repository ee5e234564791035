"""Strings that are not text (half of a UTF-16 surrogate pair, escaped alone in the JSON) are refused with a 422
naming the field, on every API family, before a job is stored; a store that already holds one still answers.

A black-box session found `keywords: ["\\ud800"]` answered 500 while its job was stored and ran, after which
every listing holding the job answered 500, across restarts (api/text_check.py)."""

from __future__ import annotations

from pathlib import Path

import httpx
from service_helpers import ServerProcess

from imagesmith.jobs.store import JobStore

JSON = {"Content-Type": "application/json"}
LONE = "\\ud800"  # as the JSON text carries it: a backslash escape, valid JSON syntax


def post_raw(client: httpx.Client, path: str, body: str) -> httpx.Response:
    return client.post(path, content=body.encode("ascii"), headers=JSON)


def test_a_job_with_half_a_character_in_a_keyword_is_refused_and_not_stored(server: ServerProcess) -> None:
    with server.client() as client:
        before = client.get("/v1/jobs").json()["total"]
        response = post_raw(client, "/v1/jobs", f'{{"prompt": "a fox", "keywords": ["ok", "x{LONE}y"]}}')
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == "keywords.1"
        assert "half of a UTF-16 surrogate pair (\\ud800, at character 1)" in error["message"]
        assert "send the whole character" in error["message"]
        listing = client.get("/v1/jobs")
        assert listing.status_code == 200 and listing.json()["total"] == before


def test_a_whole_character_sent_as_an_escaped_pair_is_text(server: ServerProcess) -> None:
    with server.client() as client:
        body = (
            '{"prompt": "a bicycle \\ud83d\\udeb2", "num_inference_steps": 2, "keywords": ["\\ud83d\\udeb2"]}'
        )
        response = post_raw(client, "/v1/jobs", body)
        assert response.status_code == 202, response.text
        assert response.json()["request"]["keywords"] == ["\U0001f6b2"]


def test_each_api_family_refuses_it_in_its_own_dialect(server: ServerProcess) -> None:
    with server.client() as client:
        seed = post_raw(client, "/api/media/generate-image", f'{{"prompt": "x", "keywords": ["{LONE}"]}}')
        assert seed.status_code == 422 and seed.json()["error"]["field"] == "keywords.0"

        # A1111 accepts these and echoes them back in `parameters`: the image was made, then the answer was a 500.
        styles = post_raw(client, "/sdapi/v1/txt2img", f'{{"prompt": "x", "steps": 2, "styles": ["{LONE}"]}}')
        assert styles.status_code == 422 and styles.json()["field"] == "styles.0"
        assert styles.json()["detail"].startswith("styles.0: the text holds half of a UTF-16 surrogate pair")
        key = post_raw(
            client, "/sdapi/v1/txt2img", f'{{"prompt": "x", "override_settings": {{"{LONE}": 1}}}}'
        )
        assert key.status_code == 422 and key.json()["field"] == "override_settings.\\ud800"
        assert "this key holds half of a UTF-16 surrogate pair" in key.json()["detail"]

        openai = post_raw(client, "/v1/images/generations", f'{{"prompt": "x", "user": "{LONE}"}}')
        assert openai.status_code == 400 and openai.json()["error"]["param"] == "user"  # OpenAI says 400


def test_a_store_written_before_the_check_reads_such_a_string_as_a_replacement_character(
    tmp_path: Path,
) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    job, _ = store.submit({"prompt": "x", "keywords": ["a\ud800b"], "\udfff": 1}, "h", None, queue_max=4)
    stored = store.get(job.id)
    assert stored is not None
    assert stored.request == {"prompt": "x", "keywords": ["a\ufffdb"], "\ufffd": 1}
    assert [listed.request["keywords"] for listed in store.list_jobs(None, 10, 0)[0]] == [["a\ufffdb"]]
