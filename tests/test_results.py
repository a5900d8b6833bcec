"""The results store: atomic run folders, manifests, exact data round trips, checked reads."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import instab_core as ic
from instab_core import results
from instab_core.results import ResultsError, load_run, start_run
from randmodels import SESSION_SEED, random_model_dir

EXP = "exp99"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two random models with different weights (so different weights hashes)."""
    a = ic.load_model(random_model_dir(tmp_path_factory.mktemp("a"), "llama", seed=SESSION_SEED))
    b = ic.load_model(random_model_dir(tmp_path_factory.mktemp("b"), "llama", seed=SESSION_SEED + 1))
    assert a.weights_hash != b.weights_hash
    return a, b


@pytest.fixture
def root(tmp_path, monkeypatch):
    r = tmp_path / "results"
    monkeypatch.setenv(results.RESULTS_ENV, str(r))
    monkeypatch.delenv(results.RUN_RECORD_ENV, raising=False)
    return r


def _special_float32(rng: np.random.Generator) -> np.ndarray:
    """Random float32 values of every magnitude plus the values that text formats lose."""
    bits = rng.integers(0, 2**32, size=500, dtype=np.uint64).astype(np.uint32).view(np.float32)
    bits = bits[np.isfinite(bits)]
    special = np.array([0.0, -0.0, np.inf, -np.inf], dtype=np.float32)
    subnormal = np.array([1, 2, 0x7FFFFF, 0x80000001, 12345], dtype=np.uint32).view(np.float32)
    return np.concatenate([bits, special, subnormal]).astype(np.float32)


# --- a run's life --------------------------------------------------------------------------------

def test_partial_until_finish_then_manifest(root, models):
    h, _ = models
    params = {"prompt": "The capital", "scales": [1e-6, 2e-6], "seed": SESSION_SEED, "device": "cpu"}
    t0 = time.time()
    run = start_run(EXP, params, model=h)
    assert not run.resumed
    assert run.partial_path.is_dir() and run.partial_path.name == run.run_id + ".partial"
    assert run.partial_path.parent == root / EXP
    assert not run.path.exists()
    run.save_arrays("a", x=np.arange(5))
    run.save_table("t", pd.DataFrame({"v": [1.5, 2.5]}))
    run.save_json("j", {"k": [1, 2]})
    with pytest.raises(ResultsError, match="incomplete run"):
        load_run(run.partial_path, EXP)
    final = run.finish(n=3)
    elapsed = time.time() - t0
    assert final == run.path == root / EXP / run.run_id and final.is_dir()
    assert not run.partial_path.exists()
    names = sorted(p.name for p in final.iterdir())
    assert names == ["a.npz", "j.json", "manifest.json", "t.csv"]  # no temp files, no resume key

    m = json.loads((final / "manifest.json").read_text())
    assert m["status"] == "complete" and m["experiment"] == EXP
    assert m["parameters"] == params
    assert m["params_hash"] == results.params_hash(params)
    assert m["summary"] == {"n": 3}
    assert m["model"]["weights_hash"] == h.weights_hash and m["model"]["model"] == h.name
    assert m["model"]["dtype"] == "float32"
    env = m["environment"]
    import transformers
    assert env["torch"] == torch.__version__ and env["transformers"] == transformers.__version__
    assert env["numpy"] == np.__version__ and env["pandas"] == pd.__version__ and env["python"]
    assert "deterministic_algorithms" in env
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=results.__file__.rsplit("/", 2)[0],
                          capture_output=True, text=True).stdout.strip()
    assert m["git"]["commit"] == head and isinstance(m["git"]["dirty"], bool)
    assert 0 <= m["wall_seconds"] <= elapsed + 0.01
    files = {p.name: "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
             for p in final.iterdir() if p.name != "manifest.json"}
    assert m["files"] == files

    loaded = load_run(final, EXP, model=h)
    assert loaded.run_id == run.run_id and loaded.parameters == params and loaded.experiment == EXP
    assert loaded.arrays("a")["x"].tolist() == [0, 1, 2, 3, 4]
    assert json.loads((final / "j.json").read_text()) == {"k": [1, 2]}
    with pytest.raises(ResultsError, match="has no"):
        loaded.arrays("missing")
    with pytest.raises(ResultsError, match="has no"):
        loaded.table("missing")


def test_npz_keeps_exact_bits(root):
    rng = np.random.default_rng(SESSION_SEED)
    x32 = _special_float32(rng)
    nan_payload = np.array([0x7FC00001, 0xFFC12345, 0x7F800001], dtype=np.uint32).view(np.float32)
    x32 = np.concatenate([x32, nan_payload])
    x64 = rng.standard_normal(50) * 10.0 ** rng.integers(-300, 300, 50)
    t = torch.from_numpy(rng.standard_normal((3, 4)).astype(np.float32))
    run = start_run(EXP, {"case": "npz"})
    run.save_arrays("data", x32=x32, x64=x64, t=t, ids=np.arange(7, dtype=np.int64))
    back = load_run(run.finish(), EXP).arrays("data")
    assert back["x32"].dtype == np.float32 and back["t"].dtype == np.float32
    np.testing.assert_array_equal(back["x32"].view(np.uint32), x32.view(np.uint32))
    np.testing.assert_array_equal(back["x64"].view(np.uint64), x64.view(np.uint64))
    np.testing.assert_array_equal(back["t"].view(np.uint32), t.numpy().view(np.uint32))
    np.testing.assert_array_equal(back["ids"], np.arange(7))


def test_csv_round_trips_float32_values(root):
    rng = np.random.default_rng(SESSION_SEED + 1)
    x = _special_float32(rng)
    df = pd.DataFrame({"x32": x, "x64": x.astype(np.float64) * np.pi, "i": np.arange(len(x)),
                       "s": ["a,b", "q\"uote"] * (len(x) // 2) + ["z"] * (len(x) % 2)})
    run = start_run(EXP, {"case": "csv"})
    run.save_table("tab", df)
    back = load_run(run.finish(), EXP).table("tab")
    np.testing.assert_array_equal(back["x32"].to_numpy().astype(np.float32).view(np.uint32), x.view(np.uint32))
    np.testing.assert_array_equal(back["x64"].to_numpy().view(np.uint64), df["x64"].to_numpy().view(np.uint64))
    assert back["i"].tolist() == df["i"].tolist() and back["s"].tolist() == df["s"].tolist()


def test_nan_in_csv_reads_back_as_nan(root):
    run = start_run(EXP, {"case": "csv-nan"})
    run.save_table("tab", pd.DataFrame({"v": np.array([np.nan, 1.0], dtype=np.float32)}))
    v = load_run(run.finish(), EXP).table("tab")["v"].to_numpy()
    assert np.isnan(v[0]) and v[1] == 1.0


def test_run_record_gets_final_path_appended(root, tmp_path, monkeypatch):
    record = tmp_path / "record.txt"
    record.write_text("earlier\n")
    monkeypatch.setenv(results.RUN_RECORD_ENV, str(record))
    a = start_run(EXP, {"i": 1}).finish()
    b = start_run(EXP, {"i": 2}).finish()
    assert record.read_text().splitlines() == ["earlier", str(a), str(b)]


def test_results_env_sets_root(tmp_path, monkeypatch):
    monkeypatch.setenv(results.RESULTS_ENV, str(tmp_path / "elsewhere"))
    assert results.results_root() == (tmp_path / "elsewhere").resolve()
    final = start_run(EXP, {"i": 1}).finish()
    assert final.parent == (tmp_path / "elsewhere" / EXP).resolve()
    monkeypatch.delenv(results.RESULTS_ENV)
    assert results.results_root() != (tmp_path / "elsewhere").resolve()


def test_explicit_root_overrides_env(root, tmp_path):
    other = tmp_path / "other"
    final = start_run(EXP, {"i": 1}, root=other).finish()
    assert final.parent == other.resolve() / EXP
    assert load_run("latest", EXP, root=other).path == final
    with pytest.raises(ResultsError, match="no finished"):
        load_run("latest", EXP)  # nothing under $INSTAB_RESULTS


@pytest.mark.parametrize("name", ["", "a/b"])
def test_bad_experiment_name(root, name):
    with pytest.raises(ValueError, match="bad experiment name"):
        start_run(name, {})


# --- load_run checks -----------------------------------------------------------------------------

def test_load_missing_folder(root):
    with pytest.raises(ResultsError, match="does not exist"):
        load_run(root / EXP / "20990101-000000-deadbeef", EXP)


def test_load_partial_folder(root):
    run = start_run(EXP, {"i": 1})
    run.save_arrays("a", x=np.zeros(2))
    with pytest.raises(ResultsError, match="incomplete run"):
        load_run(run.partial_path, EXP)


def test_load_folder_without_manifest(root, tmp_path):
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    (folder / "data.npz").write_bytes(b"")
    with pytest.raises(ResultsError, match="manifest.json"):
        load_run(folder, EXP)


def test_load_folder_with_unfinished_status(root):
    final = start_run(EXP, {"i": 1}).finish()
    m = json.loads((final / "manifest.json").read_text())
    m["status"] = "running"
    (final / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ResultsError, match="not complete"):
        load_run(final, EXP)


def test_load_wrong_experiment(root):
    final = start_run(EXP, {"i": 1}).finish()
    with pytest.raises(ResultsError, match=f"holds a run of '{EXP}', expected 'exp98'"):
        load_run(final, "exp98")


def test_load_with_other_model_weights(root, models):
    a, b = models
    final = start_run(EXP, {"i": 1}, model=a).finish()
    assert load_run(final, EXP, model=a).path == final
    with pytest.raises(ResultsError, match="computed with model weights") as exc:
        load_run(final, EXP, model=b)
    assert a.weights_hash in str(exc.value) and b.weights_hash in str(exc.value)


def test_latest_is_the_newest_complete_run(root):
    with pytest.raises(ResultsError, match="no finished exp99 run"):
        load_run("latest", EXP)
    rng = np.random.default_rng(SESSION_SEED)
    finals = [start_run(EXP, {"i": int(v)}).finish() for v in rng.permutation(5)]  # same second, any hash order
    assert load_run("latest", EXP).path == finals[-1]
    pending = start_run(EXP, {"i": 99})  # newer but unfinished: ignored
    pending.save_arrays("a", x=np.zeros(1))
    assert load_run("latest", EXP).path == finals[-1]
    newest = start_run(EXP, {"i": 100}).finish()
    assert load_run("latest", EXP).path == newest


def test_latest_filters_by_model(root, models):
    a, b = models
    ra = start_run(EXP, {"i": 1}, model=a).finish()
    rb = start_run(EXP, {"i": 1}, model=b).finish()
    assert load_run("latest", EXP).path == rb
    assert load_run("latest", EXP, model=a).path == ra
    assert load_run("latest", EXP, model=b).path == rb
    with pytest.raises(ResultsError, match="no finished"):
        load_run("latest", "exp98", model=a)


# --- resume and overwrite ------------------------------------------------------------------------

def test_resume_same_params_and_model(root, models):
    a, b = models
    params = {"rays": 8, "s_max": 1e-6}
    first = start_run(EXP, params, model=a)
    first.save("ray0", {"s": np.array([1.5e-7], dtype=np.float32)})
    first.save_arrays("partial_data", x=np.ones(3))
    busy = start_run(EXP, params, model=a)  # the first run's process still writes it: not shared
    assert not busy.resumed and busy.run_id != first.run_id
    busy.release()
    shutil.rmtree(busy.partial_path)
    first.release()  # the process that wrote it is gone (an interruption)
    again = start_run(EXP, dict(reversed(list(params.items()))), model=a)  # key order does not matter
    assert again.resumed and again.run_id == first.run_id and again.partial_path == first.partial_path
    assert again.load("ray0")["s"].tolist() == [np.float32(1.5e-7)]
    assert again.load("absent") is None
    other_params = start_run(EXP, {**params, "rays": 9}, model=a)
    assert not other_params.resumed and other_params.run_id != first.run_id
    other_model = start_run(EXP, params, model=b)
    assert not other_model.resumed and other_model.run_id not in (first.run_id, other_params.run_id)
    fresh = start_run(EXP, params, model=a, resume=False)
    assert not fresh.resumed and fresh.run_id != first.run_id
    final = again.finish()
    assert not (final / "checkpoints").exists()  # checkpoints are dropped at finish
    assert (final / "partial_data.npz").is_file()
    # a finished run is not resumed
    assert start_run(EXP, params, model=a).run_id != first.run_id


def test_same_params_many_times_in_one_second(root):
    """Repeated runs of identical parameters get distinct folders (no FileExistsError)."""
    finals = [start_run(EXP, {"i": 1}, resume=False).finish() for _ in range(4)]
    assert len(set(finals)) == 4 and all(f.is_dir() for f in finals)


def test_finish_refuses_to_overwrite(root):
    run = start_run(EXP, {"i": 1})
    run.save_arrays("a", x=np.arange(3))
    run.path.mkdir(parents=True)
    (run.path / "keep.txt").write_text("earlier run")
    with pytest.raises(ResultsError, match="refusing to overwrite"):
        run.finish()
    assert (run.path / "keep.txt").read_text() == "earlier run"
    assert (run.partial_path / "a.npz").is_file()  # the new data is still there


def test_failed_write_leaves_no_file(root):
    run = start_run(EXP, {"i": 1})
    with pytest.raises(TypeError, match="not JSON serialisable"):
        run.save_json("j", {"x": object()})
    assert not (run.partial_path / "j.json").exists()
    assert [p.name for p in run.partial_path.iterdir() if p.name.startswith(".")] == [results.LOCK]  # no temp file


# --- damaged data is named, damaged checkpoints are recomputed, concurrent runs never share a folder ----------

def _finished_run(rng: np.random.Generator) -> tuple[results.LoadedRun, np.ndarray]:
    run = start_run(EXP, {"i": int(rng.integers(1 << 30))})
    S = rng.standard_normal(16).astype(np.float32)
    run.save_arrays("directions", S=S)
    run.save_table("t", pd.DataFrame({"x": S}))
    return load_run(run.finish(), EXP), S


def test_load_run_refuses_a_file_changed_after_the_run(root):
    """A valid npz whose values changed (the seed's S scaled by 10) no longer matches the manifest's hash."""
    done, S = _finished_run(np.random.default_rng(SESSION_SEED))
    f = done.path / "directions.npz"
    with open(f, "wb") as fh:
        np.savez(fh, S=S * 10)
    with pytest.raises(ResultsError, match=r"directions\.npz does not match the hash its manifest recorded.*re-run"):
        load_run(done.path, EXP)


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete"])
def test_load_run_names_a_damaged_file(root, damage):
    done, _ = _finished_run(np.random.default_rng(SESSION_SEED + 1))
    f = done.path / "directions.npz"
    if damage == "delete":
        f.unlink()
    else:
        f.write_bytes(f.read_bytes()[: 40 if damage == "truncate" else 0])
    with pytest.raises(ResultsError, match=r"directions\.npz (is missing|does not match).*re-run exp99"):
        load_run(done.path, EXP)
    manifest = json.loads((done.path / "manifest.json").read_text())
    manifest["files"].pop("directions.npz")  # without the hash to catch it, the read itself names the file
    (done.path / "manifest.json").write_text(json.dumps(manifest))
    if damage != "delete":
        with pytest.raises(ResultsError, match=r"directions\.npz is damaged or truncated.*re-run exp99"):
            load_run(done.path, EXP).arrays("directions")


def test_load_run_names_a_truncated_manifest(root):
    done, _ = _finished_run(np.random.default_rng(SESSION_SEED + 2))
    mf = done.path / "manifest.json"
    mf.write_text(mf.read_text()[:50])
    with pytest.raises(ResultsError, match=r"manifest\.json is damaged or truncated"):
        load_run(done.path, EXP)
    with pytest.raises(ResultsError, match=r"manifest\.json is damaged or truncated"):
        load_run("latest", EXP)  # never a silent fall back to an older run


def _damage_checkpoint(run: results.Run, key: str, how: str, rng: np.random.Generator) -> None:
    f = run.partial_path / "checkpoints" / f"{key}.npz"
    if how == "truncated":
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    elif how == "zero bytes":
        f.write_bytes(b"")
    elif how == "right shapes, wrong values":
        with np.load(f) as z:
            arrays = {k: z[k] for k in z.files}
        with open(f, "wb") as fh:
            np.savez(fh, **{k: (v * 0 if v.dtype.kind == "f" else v) for k, v in arrays.items()})
    elif how == "no sidecar":
        (run.partial_path / "checkpoints" / f"{key}.check.json").unlink()
    elif how == "garbage sidecar":
        (run.partial_path / "checkpoints" / f"{key}.check.json").write_text("{")


DAMAGES = ["truncated", "zero bytes", "right shapes, wrong values", "no sidecar", "garbage sidecar"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_checkpoint_is_discarded_with_a_warning(root, how):
    rng = np.random.default_rng(SESSION_SEED)
    run = start_run(EXP, {"ckpt": how})
    good = {"s": rng.standard_normal(7).astype(np.float32), "n": np.arange(7)}
    run.save("block-0", good)
    run.save("block-1", good)
    _damage_checkpoint(run, "block-0", how, rng)
    run.release()  # the interrupted process is gone
    again = start_run(EXP, {"ckpt": how})
    assert again.resumed
    with pytest.warns(UserWarning, match=r"discarding damaged checkpoint .*block-0\.npz.*recomputing"):
        assert again.load("block-0") is None
    assert not (again.partial_path / "checkpoints" / "block-0.npz").exists()
    kept = again.load("block-1")  # the undamaged one is still used
    assert kept is not None and all(np.array_equal(kept[k], good[k]) for k in good)


@pytest.mark.parametrize("how", ["truncated", "zero bytes", "right shapes, wrong values"])
def test_boundary_resume_recomputes_a_damaged_block_to_the_same_answer(root, how, tmp_path):
    """An interrupted exp12-style run whose first block checkpoint was damaged resumes to the uninterrupted answer."""
    h = ic.load_model(random_model_dir(tmp_path / "m", "llama", seed=SESSION_SEED))
    probe = ic.Probe(h, "The capital of France is", batch_size=8)
    rng = np.random.default_rng(SESSION_SEED)
    D = torch.from_numpy(rng.standard_normal((6, probe.d)).astype(np.float32))
    D = D / D.norm(dim=1, keepdim=True)
    kw = dict(s_max=1e-5, ray_block=3, progress=False, audit=False)
    plain = ic.boundary.first_output_change(probe, D, **kw)
    run = start_run(EXP, {"boundary": how})
    ic.boundary.first_output_change(probe, D, checkpoint=run, **kw)
    key = next(p.stem for p in sorted((run.partial_path / "checkpoints").glob("*.npz")))
    _damage_checkpoint(run, key, how, rng)
    run.release()
    again = start_run(EXP, {"boundary": how})
    with pytest.warns(UserWarning, match="discarding damaged checkpoint"):
        resumed = ic.boundary.first_output_change(probe, D, checkpoint=again, **kw)
    for k, v in plain.arrays().items():
        np.testing.assert_array_equal(resumed.arrays()[k], v)


def test_damaged_run_json_does_not_block_other_runs(root):
    """A truncated run.json in an interrupted folder is skipped with a warning; runs with any parameters proceed."""
    run = start_run(EXP, {"a": 1})
    (run.partial_path / "run.json").write_text('{"params_hash": "ab')
    run.release()
    for params in ({"a": 1}, {"a": 2}):
        with pytest.warns(UserWarning, match=r"ignoring the interrupted run .*run\.json is damaged"):
            fresh = start_run(EXP, params)
        assert not fresh.resumed and fresh.finish().is_dir()


_CONCURRENT = """
import sys, time
from instab_core.results import start_run
run = start_run("exp99", {"same": True})
print(run.run_id, run.resumed, flush=True)
time.sleep(float(sys.argv[1]))
run.finish()
"""


def test_concurrent_runs_with_the_same_parameters_get_their_own_folders(root, tmp_path):
    """Two processes started at once with the same parameters (one even finding the other's .partial) never share it."""
    first = start_run(EXP, {"same": True})  # an interrupted-looking folder, but its writer is alive
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, "1.5"], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].splitlines()[-1].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    ids = {o[0] for o in outs}
    assert len(ids) == 2 and first.run_id not in ids and all(o[1] == "False" for o in outs)
    assert first.finish().is_dir()
    assert len(results._complete_runs(root / EXP)) == 3
