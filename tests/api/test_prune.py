"""`imagesmith prune`: old finished jobs and the images no job points at go; everything else stays.

A real SQLite store and real image files; the command run as users run it (a subprocess); a real server before and
after, and beside it (the prune refuses while one has the data dir open).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from polling import wait_for
from service_helpers import SRC, ServerProcess

from imagesmith.jobs.retention import prune
from imagesmith.jobs.store import JobStatus, JobStore
from imagesmith.storage.files import ImageFiles

DAY = 86400.0


def finished_job(store: JobStore, files: ImageFiles, *images: bytes, key: str | None = None) -> str:
    """A job run to success whose result points at `images` (stored as the worker stores them)."""
    job, _ = store.submit({"prompt": "x"}, f"hash-{key}", key, queue_max=100)
    (claimed,) = store.claim(1)
    assert claimed.id == job.id
    stored = [files.put(data, "image/png") for data in images]
    result = {"images": [{"url": f"/v1/images/{item.name}", "sha256": item.sha256} for item in stored]}
    assert store.finish(job.id, JobStatus.SUCCEEDED, result=result)
    return job.id


def age(path: Path, days: float) -> None:
    then = time.time() - days * DAY
    os.utime(path, (then, then))


def backdate(database: Path, job_id: str, days: float) -> None:
    """The job as if it had finished `days` ago (another connection, as an old store would hold it)."""
    with sqlite3.connect(database) as db:
        db.execute("UPDATE jobs SET finished_at = finished_at - ? WHERE id = ?", (days * DAY, job_id))


def test_prune_deletes_old_finished_jobs_and_only_the_images_no_job_keeps(tmp_path: Path) -> None:
    database = tmp_path / "jobs.sqlite3"
    store, files = JobStore(database), ImageFiles(tmp_path / "images")
    old = finished_job(store, files, b"old alone", b"shared", key="old-key")
    failed, _ = store.submit({"prompt": "f"}, "hf", None, queue_max=100)
    store.claim(1)
    store.finish(failed.id, JobStatus.FAILED, error={"code": "generation_failed"})
    canceled, _ = store.submit({"prompt": "c"}, "hc", None, queue_max=100)
    store.cancel_queued(canceled.id)
    recent = finished_job(store, files, b"shared", b"recent")
    running, _ = store.submit({"prompt": "r"}, "hr", None, queue_max=100)
    store.claim(1)
    queued, _ = store.submit({"prompt": "q"}, "hq", None, queue_max=100)
    for job_id in (old, failed.id, canceled.id, running.id, queued.id):
        backdate(database, job_id, 40)  # only the finished ones among these may go
    orphan_old = files.put(b"left by a crash", "image/png")
    orphan_new = files.put(b"written just now", "image/png")
    for data in (b"old alone", b"shared", b"recent", b"left by a crash"):
        age(files.path_for(files.put(data, "image/png").sha256, "png"), 40)
    names_before = sorted(path.name for path in files.stored())
    cutoff = time.time() - 30 * DAY

    dry = prune(store, files, cutoff, dry_run=True)
    assert sorted(path.name for path in files.stored()) == names_before  # a dry run deletes nothing
    assert store.get(old) is not None

    done = prune(store, files, cutoff)
    for report in (dry, done):
        assert report.jobs_by_status == {"succeeded": 1, "failed": 1, "canceled": 1}
        assert report.images_deleted == 2  # the old job's own image and the old orphan
        assert report.bytes_freed == len(b"old alone") + len(b"left by a crash")
        assert report.images_kept == 3  # shared (the recent job keeps it), recent, the young orphan
    assert [store.get(job_id) is None for job_id in (old, failed.id, canceled.id)] == [True] * 3
    assert {job_id for job_id in (recent, running.id, queued.id) if store.get(job_id)} == {
        recent,
        running.id,
        queued.id,
    }
    left = {path.name for path in files.stored()}
    assert left == {files.put(data, "image/png").name for data in (b"shared", b"recent")} | {orphan_new.name}
    assert orphan_old.name not in left
    # The deleted job's Idempotency-Key went with it: a retry now makes a new job.
    again, created = store.submit({"prompt": "x"}, "hash-old-key", "old-key", queue_max=100)
    assert created and again.id != old
    assert prune(store, files, cutoff).jobs_deleted == 0  # nothing left to prune
    store.close()


def prune_command(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "IMAGESMITH_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "imagesmith.cli", "prune", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def generated(client: httpx.Client, seed: int) -> dict[str, Any]:
    job = client.post("/v1/jobs", json={"prompt": "a fox", "num_inference_steps": 4, "seed": seed}).json()
    done = wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["status"] == "succeeded" and j, 120
    )
    return dict(done)


def test_the_command_prunes_a_stopped_servers_data_dir_and_refuses_while_it_runs(
    server_factory: Any, tmp_path: Path
) -> None:
    server: ServerProcess = server_factory(tmp_path / "data").start()
    with server.client() as client:
        old, recent = generated(client, 1), generated(client, 2)
    refused = prune_command(server.data_dir, "--older-than", "0s")
    assert refused.returncode == 2, refused.stderr
    assert f"pid {server.process.pid}" in refused.stderr and "stop it first" in refused.stderr  # type: ignore[union-attr]
    server.stop()

    old_image = server.data_dir / "images" / old["result"]["images"][0]["sha256"][:2]
    backdate(server.data_dir / "jobs.sqlite3", old["id"], 40)
    for path in old_image.iterdir():
        age(path, 40)
    dry = prune_command(server.data_dir, "--older-than", "30d", "--dry-run")
    assert dry.returncode == 0 and "would delete 1 job(s)" in dry.stdout, dry.stdout + dry.stderr
    pruned = prune_command(server.data_dir, "--older-than", "30d", "--json")
    assert pruned.returncode == 0, pruned.stderr
    report = json.loads(pruned.stdout)
    assert (report["jobs_deleted"], report["images_deleted"], report["dry_run"]) == (1, 1, False)

    server.start()  # the same data dir: the old job and its image are gone, the recent ones served
    with server.client() as client:
        assert client.get(f"/v1/jobs/{old['id']}").status_code == 404
        assert client.get(old["result"]["images"][0]["url"]).status_code == 404
        assert client.get(f"/v1/jobs/{recent['id']}").json()["status"] == "succeeded"
        assert client.get(recent["result"]["images"][0]["url"]).status_code == 200
        assert client.get("/v1/jobs").json()["total"] == 1


def test_the_command_names_the_option_to_fix(tmp_path: Path) -> None:
    bad_age = prune_command(tmp_path, "--older-than", "30")
    assert bad_age.returncode == 2
    assert "--older-than: '30' is not an age" in bad_age.stderr and "30d" in bad_age.stderr
    assert "Traceback" not in bad_age.stderr
    no_store = prune_command(tmp_path, "--older-than", "30d", "--data-dir", str(tmp_path / "typo"))
    assert no_store.returncode == 2
    assert f"--data-dir: {tmp_path / 'typo'} holds no job store" in no_store.stderr
    assert not (tmp_path / "typo").exists()  # a typo makes no folder and no empty store
