"""onnxopt sweep: grids, the process pool with its cache, failures, the front, Ray (real or fake)."""

from __future__ import annotations

import json
import logging
import os
import sys
import types

import pytest

from onnxopt import OptionError, Recipe, runtime
from onnxopt.sweep import (SweepEntry, _mark_front, build_recipe, dominates, expand_grid, latency_compare, load_grid,
                           pareto_flags, run_sweep)

DIGITS = os.path.abspath("models/digits/digits_cnn.onnx")
TEST = os.path.abspath("models/digits/digits_test.npz")
BASE = {"passes": ["simplify", "fold-bn", "share-init"]}
GRID = {"base": BASE, "cluster_bits": ["none", 4], "prune": ["none", 0.25]}
FAILING = {"fix_dims": {"nosuch": 1}}  # the model has no such dim: optimize() refuses it in the worker


# -- the grid ---------------------------------------------------------------------------------------


def test_a_grid_is_the_product_of_its_lists_over_base_and_none_is_none():
    recipes = expand_grid({"base": {"data": "x.npz", "passes": ["simplify"]}, "prune": ["none", 0.25, 0.5],
                           "quantize": ["none", "int8"], "calibrate": ["minmax"]})
    assert len(recipes) == 6
    assert {(r.prune, r.quantize) for r in recipes} == {(p, q) for p in (None, 0.25, 0.5) for q in (None, "int8")}
    assert all(r.data == "x.npz" and list(r.passes) == ["simplify"] for r in recipes)


def test_recipe_tables_list_recipes_one_by_one_and_duplicates_are_kept_once():
    recipes = expand_grid({"base": BASE, "recipe": [{"cluster_bits": 3}, {"sparsity": 0.5}, {"cluster_bits": 3}]})
    assert [(r.cluster_bits, r.sparsity) for r in recipes] == [(3, None), (None, 0.5)]
    both = expand_grid({"base": BASE, "passes": [["simplify"], ["simplify", "fold-bn"]], "recipe": [{"prune": 0.1}]})
    assert [list(r.passes) for r in both] == [["simplify"], ["simplify", "fold-bn"], BASE["passes"]]
    assert both[2].prune == 0.1


@pytest.mark.parametrize("table, words", [
    ({"prunee": [0.1]}, "unknown option 'prunee'"),
    ({"base": {"nosuch": 1}, "prune": [0.1]}, "[base]: unknown option 'nosuch'"),
    ({"recipe": [{"prune": 0.1}, {"bits": 2}]}, "[[recipe]] 2: unknown option 'bits'"),
    ({"passes": ["simplify", "fold-bn"]}, "passes: give a list of lists"),
    ({"cluster_bits": [4, 9]}, "recipe 2 (cluster_bits=9): --cluster-bits 9"),
    ({"prune": []}, "an empty list"),
    ({}, "no recipes"),
])
def test_a_bad_grid_is_one_line_naming_the_key_or_recipe(table, words):
    with pytest.raises(OptionError) as info:
        expand_grid(table)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_load_grid_reads_toml_and_refuses_a_bad_file(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text('prune = ["none", 0.25]\n[base]\npasses = ["simplify"]\n')
    assert [r.prune for r in load_grid(grid)] == [None, 0.25]
    grid.write_text("prune = [")
    with pytest.raises(OptionError, match="not valid TOML"):
        load_grid(grid)
    with pytest.raises(OptionError, match="no such file"):
        load_grid(tmp_path / "none.toml")


def test_pareto_flags_keep_exactly_the_non_dominated_points():
    points = [(1, 1), (2, 0), (0, 2), (1, 0), (2, 0), (0.5, 0.5)]
    assert pareto_flags(points) == [True, True, True, False, True, False]


def _point(acc, ratio, low=None, high=None, size=1000):
    return {"accuracy": acc, "latency_ratio": ratio, "latency_low": low, "latency_high": high, "file_bytes": size}


def test_latency_ratios_count_apart_only_beyond_5_percent_and_beyond_their_intervals():
    assert latency_compare(_point(1, 0.90, 0.88, 0.92), _point(1, 1.00, 0.97, 1.03)) == -1  # 10% and apart: a faster
    assert latency_compare(_point(1, 1.00, 0.97, 1.03), _point(1, 0.90, 0.88, 0.92)) == 1
    assert latency_compare(_point(1, 0.90, 0.80, 0.99), _point(1, 1.00, 0.97, 1.03)) == 0  # 10%, intervals overlap
    # narrow intervals apart, but within 5%: one run's paired blocks resolve it, the next run need not
    assert latency_compare(_point(1, 1.00, 0.995, 1.005), _point(1, 1.04, 1.035, 1.045)) == 0
    assert latency_compare(_point(1, 1.00), _point(1, 1.04, 1.03, 1.05)) == 0  # an interval missing: medians, 5%
    assert latency_compare(_point(1, 1.00), _point(1, 1.06)) == -1
    assert latency_compare(_point(1, 1.06), _point(1, 1.00, 0.99, 1.01)) == 1


def test_a_latency_within_noise_does_not_decide_dominance():
    chosen = [("accuracy", 1), ("latency_ratio", -1), ("file_bytes", -1)]
    noisy_fast, noisy_slow = _point(0.95, 0.97, 0.965, 0.975), _point(0.95, 1.01, 1.005, 1.015)  # 4% apart
    assert not dominates(noisy_fast, noisy_slow, chosen) and not dominates(noisy_slow, noisy_fast, chosen)
    assert dominates(_point(0.96, 1.02, 0.99, 1.05), noisy_fast, chosen)  # better accuracy, latency a tie
    assert not dominates(_point(0.96, 1.20, 1.15, 1.25), noisy_fast, chosen)  # but truly slower
    assert dominates(_point(0.95, 0.80, 0.78, 0.82), noisy_fast, chosen)  # as good, truly faster


def _entries(points):
    return [SweepEntry(recipe=Recipe(prune=0.1 * i), key=str(i), metrics=m) for i, m in enumerate(points)]


def test_the_front_is_the_same_for_two_engines_whose_ratios_differ_by_noise():
    # same accuracy and bytes (deterministic builds); latency ratios from two runs, shuffled by noise
    figures = [(0.95, 2000), (0.95, 1500), (0.94, 1500), (0.90, 900), (0.90, 1000)]
    # narrow intervals, as paired timing gives; the same recipe moves by a few percent between runs
    run_a = [(1.00, 0.998, 1.002), (0.99, 0.988, 0.992), (1.01, 1.008, 1.012), (1.02, 1.018, 1.022), (0.98, 0.978, 0.982)]
    run_b = [(0.99, 0.988, 0.992), (1.02, 1.018, 1.022), (0.98, 0.978, 0.982), (1.00, 0.998, 1.002), (1.01, 1.008, 1.012)]
    fronts = []
    for run in (run_a, run_b):
        entries = _entries([_point(acc, *lat, size=size) for (acc, size), lat in zip(figures, run)])
        assert _mark_front(entries) == "accuracy"
        fronts.append([e.pareto for e in entries])
    assert fronts[0] == fronts[1] == [False, True, False, True, False]
    # without the tie rule the second run's front differs: (0.94, 1500, 0.98) beats (0.95, 1500, 1.02) on latency
    strict = [pareto_flags([(acc, -lat[0], -size) for (acc, size), lat in zip(figures, run)]) for run in (run_a, run_b)]
    assert strict[0] != strict[1]


def test_ties_that_do_not_chain_still_leave_a_front():
    # a ties b, b ties c, a is faster than c: c is dominated, a and b stay
    entries = _entries([_point(0.9, 1.00, 0.99, 1.01), _point(0.9, 1.04, 1.03, 1.05), _point(0.9, 1.08, 1.07, 1.09)])
    _mark_front(entries)
    assert [e.pareto for e in entries] == [True, True, False]


# -- a sweep on the process pool --------------------------------------------------------------------


def _latency_worse(a: dict, b: dict) -> bool:
    """a's latency ratio beyond b's noise: more than 5% higher, and its interval above b's where both exist."""
    apart = a["latency_ratio"] - b["latency_ratio"] > 0.05 * a["latency_ratio"]
    return apart and (None in (a["latency_low"], b["latency_high"]) or a["latency_low"] > b["latency_high"])


def _dominates(a: dict, b: dict) -> bool:
    """The tie rule, written out: a at least as good everywhere, latency within noise as good."""
    if a["accuracy"] < b["accuracy"] or a["file_bytes"] > b["file_bytes"] or _latency_worse(a, b):
        return False
    return a["accuracy"] > b["accuracy"] or a["file_bytes"] < b["file_bytes"] or _latency_worse(b, a)


@pytest.fixture(scope="module")
def pool_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    recipes = expand_grid({**GRID, "recipe": [FAILING]})
    result = run_sweep(DIGITS, recipes, eval=TEST, out_dir=out, workers=2, latency_budget=0.3)
    return out, recipes, result


def test_a_sweep_records_every_recipe_a_failing_one_with_its_error(pool_sweep):
    out, recipes, result = pool_sweep
    assert len(result.entries) == 5
    failed = [e for e in result.entries if e.error]
    assert len(failed) == 1 and "--fix-dim nosuch" in failed[0].error and failed[0].recipe.fix_dims == {"nosuch": 1}
    assert not failed[0].pareto and failed[0].model is None
    for e in result.entries[:4]:
        assert e.error is None and not e.cached and os.path.isfile(e.model)
        m = e.metrics
        assert m["file_bytes"] == os.path.getsize(e.model) and 0 <= m["accuracy"] <= 1 and m["macs"] > 0
        assert m["latency_ratio"] > 0  # its interval is None where the budget gave too few blocks
        assert m["latency_low"] is None or m["latency_low"] <= m["latency_ratio"] <= m["latency_high"]
    plain, pruned = result.entries[0], result.entries[1]
    assert plain.metrics["accuracy"] == plain.metrics["accuracy_before"]  # lossless passes only
    assert pruned.metrics["macs"] < plain.metrics["macs"]
    data = json.loads((out / "sweep.json").read_text())
    assert [set(r) >= {"recipe", "metrics", "model", "cached", "pareto", "error"} for r in data["results"]] == [True] * 5
    assert data["results"][2]["recipe"] == {**BASE, "data": TEST, "cluster_bits": 4}


def test_every_sweep_writes_its_html_page_a_circle_per_good_result(pool_sweep):
    out, _, result = pool_sweep
    page = (out / "sweep.html").read_text(encoding="utf-8")
    good = [e for e in result.entries if not e.error]
    assert page.count("<circle ") == len(good) == 4
    assert page.count('<circle class="point front"') == len(result.front)
    assert "http://" not in page and "https://" not in page  # self-contained
    assert not list(out.glob(".sweep.html.*.tmp"))  # written through a temporary file, moved into place


def test_pareto_flags_match_a_brute_force_dominance_check(pool_sweep):
    _, _, result = pool_sweep
    good = [e for e in result.entries if not e.error]
    for e in good:
        assert e.pareto == (not any(_dominates(o.metrics, e.metrics) for o in good if o is not e))
    assert result.quality == "accuracy" and any(e.pareto for e in good)


def test_front_recipes_replay_with_dash_dash_recipe(pool_sweep, tmp_path, monkeypatch):
    from onnxopt.cli import main

    out, _, result = pool_sweep
    front = sorted(out.glob("front-*.toml"))
    assert len(front) == len(result.front) == len(result.fronts)
    monkeypatch.chdir(tmp_path)  # the data paths in a front recipe do not depend on the folder
    replayed = Recipe.from_toml(front[0])
    entry = next(e for e in result.front if e.recipe.replace(data=TEST).to_toml() == replayed.to_toml())
    assert main([DIGITS, "--recipe", str(front[0]), "--no-latency", "-o", "replay.onnx", "-q"]) == 0
    assert os.path.getsize("replay.onnx") == entry.metrics["file_bytes"]


def test_a_rerun_builds_nothing_and_an_extended_grid_builds_only_the_new_recipes(pool_sweep):
    out, recipes, first = pool_sweep
    stamps = {e.key: e.built for e in first.entries if not e.error}
    good = recipes[:4]
    again = run_sweep(DIGITS, good, eval=TEST, out_dir=out, workers=2, latency_budget=0.3)
    assert all(e.cached for e in again.entries)
    assert [e.built for e in again.entries] == [stamps[e.key] for e in again.entries]  # no build ran
    assert [e.metrics for e in again.entries] == [e.metrics for e in first.entries[:4]]
    extended = expand_grid({**GRID, "cluster_bits": ["none", 4, 3]})
    third = run_sweep(DIGITS, extended, eval=TEST, out_dir=out, workers=2, latency_budget=0.3)
    new = [e for e in third.entries if e.built not in stamps.values()]
    assert [e.recipe.cluster_bits for e in new] == [3, 3] and not any(e.cached for e in new)
    assert sum(e.cached for e in third.entries) == 4


def test_byte_identical_results_are_timed_once_and_share_their_figures(tmp_path, monkeypatch):
    import onnxopt.latency

    calls = []
    real = onnxopt.latency.compare_latency

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxopt.latency, "compare_latency", counting)
    # digits has no duplicate weights: with or without share-init, the same model
    recipes = expand_grid({"passes": [["simplify", "fold-bn", "share-init"], ["simplify", "fold-bn"]]})
    result = run_sweep(DIGITS, recipes, eval=TEST, out_dir=tmp_path, workers=2, latency_budget=0.2)
    a, b = result.entries
    assert a.key != b.key and open(a.model, "rb").read() == open(b.model, "rb").read()
    assert len(calls) == 1
    assert {k: v for k, v in a.metrics.items() if k.startswith("latency")} == \
           {k: v for k, v in b.metrics.items() if k.startswith("latency")}
    assert a.pareto and b.pareto  # equal everywhere: neither dominates


def die_on_sparsity(model, recipe, out):
    """A build that kills its worker process for a recipe with sparsity (a crash, an OOM kill)."""
    if recipe.sparsity is not None:
        os._exit(3)
    return build_recipe(model, recipe, out)


def test_a_worker_that_dies_fails_its_recipe_only(tmp_path):
    recipes = expand_grid({"base": BASE, "recipe": [{"sparsity": 0.5}, {"cluster_bits": 4}]})
    result = run_sweep(DIGITS, recipes, eval=TEST, out_dir=tmp_path, workers=2, latency_budget=0,
                       _build=die_on_sparsity)
    dead, ok = result.entries
    assert "worker process died" in dead.error
    assert ok.error is None and os.path.isfile(ok.model)


def test_bad_input_to_the_command_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    from onnxopt.sweep_cli import main

    grid = tmp_path / "grid.toml"
    grid.write_text("cluster_bits = [4]\n")
    assert main([DIGITS, "--grid", str(tmp_path / "none.toml")]) == 2
    assert main([DIGITS, "--grid", str(grid), "--eval", str(tmp_path / "none.npz")]) == 2
    assert main([DIGITS, "--grid", str(grid), "--workers", "0", "--out", str(tmp_path / "o")]) == 2
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    assert main([DIGITS, "--grid", str(grid), "--ray", "auto", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("onnxopt: error: ") for line in err)
    assert err[3] == "onnxopt: error: --ray needs the ray package: pip install 'onnxopt[ray]'"


def test_the_command_prints_the_front_first(tmp_path, capsys, pool_sweep):
    from onnxopt.sweep_cli import main

    out, _, _ = pool_sweep
    grid = tmp_path / "grid.toml"
    grid.write_text('cluster_bits = ["none", 4]\nprune = ["none", 0.25]\n[base]\npasses = ["simplify", "fold-bn", '
                    '"share-init"]\n')
    assert main([DIGITS, "--grid", str(grid), "--eval", TEST, "--out", str(out), "--workers", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if "(cached)" in line]
    assert len(rows) == 4  # all four built before: nothing new
    marks = [row.startswith("*") for row in rows]
    assert marks == sorted(marks, reverse=True)  # front points first


# -- Ray --------------------------------------------------------------------------------------------


class FakeRay(types.ModuleType):
    """Ray's calls that onnxopt.sweep_ray makes, run at once in this process; ``crash`` names a
    recipe whose task dies as a worker would."""

    class WorkerCrashedError(Exception):
        pass

    def __init__(self, crash):
        super().__init__("ray")
        self.crash, self.store, self.puts, self.started = crash, {}, 0, False

    def is_initialized(self):
        return self.started

    def init(self, **kwargs):
        self.started, self.init_kwargs = True, kwargs

    def shutdown(self):
        self.started = False

    def put(self, value):
        self.puts += 1
        return self._keep(("ok", value))

    class Ref:
        pass

    def _keep(self, value):
        ref = FakeRay.Ref()
        self.store[ref] = value
        return ref

    def remote(self, **options):
        def wrap(fn):
            fake = self

            class Task:
                def remote(self, *args):
                    args = [fake.store[a][1] if isinstance(a, FakeRay.Ref) else a for a in args]
                    if fake.crash(args[2]):
                        return fake._keep(("err", FakeRay.WorkerCrashedError("the worker died")))
                    return fake._keep(("ok", fn(*args)))
            return Task()
        return wrap

    def wait(self, refs, num_returns=1):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        kind, value = self.store[ref]
        if kind == "err":
            raise value
        return value


def test_the_ray_path_ships_model_and_data_once_and_records_a_dead_task(tmp_path, monkeypatch):
    fake = FakeRay(crash=lambda recipe: recipe.cluster_bits == 3)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(runtime, "DEFAULT_INTRA_OP_THREADS", None)
    level = logging.getLogger().level
    try:
        recipes = expand_grid({"base": BASE, "cluster_bits": [4, 3], "prune": ["none", 0.25]})
        result = run_sweep(DIGITS, recipes, eval=TEST, out_dir=tmp_path, ray="auto", latency_budget=0)
    finally:
        logging.getLogger().setLevel(level)
    assert fake.puts == 2 and not fake.started  # model once, data once; the cluster it started, shut down
    assert result.engine == "ray"
    for e in result.entries:
        if e.recipe.cluster_bits == 3:
            assert "WorkerCrashedError" in e.error
        else:
            assert e.error is None and os.path.getsize(e.model) == e.metrics["file_bytes"]
    direct = build_recipe(DIGITS, recipes[0].replace(data=TEST), str(tmp_path / "direct.onnx"))
    assert direct["metrics"]["accuracy"] == result.entries[0].metrics["accuracy"]


def test_an_unreachable_ray_address_is_one_line_with_the_token_hint_where_it_applies(tmp_path, monkeypatch):
    class Refusing(FakeRay):
        def init(self, **kwargs):
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:1")

    monkeypatch.setitem(sys.modules, "ray", Refusing(crash=lambda recipe: False))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    recipes = expand_grid({"base": BASE, "cluster_bits": [4]})
    messages = []
    for token in (False, True):
        if token:
            (tmp_path / ".ray").mkdir()
            (tmp_path / ".ray" / "auth_token").write_text("x" * 32)
        with pytest.raises(OptionError) as info:
            run_sweep(DIGITS, recipes, eval=TEST, out_dir=tmp_path / "out", ray="127.0.0.1:1", latency_budget=0)
        messages.append(str(info.value))
    assert messages[0] == "--ray 127.0.0.1:1: cannot start or reach a Ray cluster: Failed to connect to Ray cluster " \
                          "at 127.0.0.1:1"
    assert messages[1] == messages[0] + " (if the cluster uses token authentication, set RAY_AUTH_MODE=token for " \
                                        "this command)"


def test_a_local_ray_cluster_gives_the_pools_results(pool_sweep, tmp_path):
    pytest.importorskip("ray")
    _, recipes, pool = pool_sweep
    result = run_sweep(DIGITS, recipes, eval=TEST, out_dir=tmp_path, ray="auto", latency_budget=0)
    assert [e.error is None for e in result.entries] == [e.error is None for e in pool.entries]
    assert not any(e.cached for e in result.entries)
    for a, b in zip(result.entries, pool.entries):
        if a.error is None:
            assert (a.metrics["accuracy"], a.metrics["file_bytes"]) == (b.metrics["accuracy"], b.metrics["file_bytes"])


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cluster_pids(folder: str) -> list[int]:
    """The processes of the cluster started in ``folder``: those whose command line names it (its
    temporary folder) or which run in it (Ray's agents rename their command line)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                named = folder.encode() in f.read()
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if named or cwd == folder or cwd.startswith(folder + os.sep):
            pids.append(int(entry))
    return pids


def _stop_cluster(folder: str) -> None:
    """Stop the processes of the cluster this test started, by pid (``ray stop`` would end every
    Ray process of the user on the machine, other people's clusters too)."""
    import signal
    import time

    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = _cluster_pids(folder)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = [p for p in pids if p in _cluster_pids(folder)]
        if not pids:
            return


def _fronts(result):
    return [e.key for e in result.entries if e.pareto]


def test_ray_start_head_on_localhost_gives_the_pools_results_and_front(pool_sweep, monkeypatch):
    """The address form, against a real cluster: ``ray start --head`` on 127.0.0.1, then the
    same 4 recipes with ``ray=ADDRESS``; accuracy and bytes as the pool's, and the same front
    (latency ratios within each other's noise are a tie)."""
    import shutil
    import subprocess
    import tempfile

    pytest.importorskip("ray")
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_cli is None:
        pytest.skip("no ray command beside this Python")
    _, recipes, pool = pool_sweep
    good = [e for e in pool.entries if not e.error]
    folder = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    # Ray >= 2.5x turns token authentication on for `ray start` where ~/.ray/auth_token exists, and a
    # driver given an address then needs RAY_AUTH_MODE=token too: this test's cluster, on 127.0.0.1
    # only, runs without, whatever the user's ~/.ray holds.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        started = subprocess.run(
            [ray_cli, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
             "--include-dashboard=false", f"--temp-dir={folder}", "--disable-usage-stats"],
            capture_output=True, text=True, timeout=120, env=env, cwd=folder)
        assert started.returncode == 0, started.stdout + started.stderr
        out = os.path.join(folder, "out")
        result = run_sweep(DIGITS, [e.recipe for e in good], eval=TEST, out_dir=out, ray=f"127.0.0.1:{port}",
                           latency_budget=0.3)
    finally:
        _stop_cluster(folder)
        shutil.rmtree(folder, ignore_errors=True)
    assert result.engine == "ray" and not result.failed and not any(e.cached for e in result.entries)
    for a, b in zip(result.entries, good):
        assert a.key == b.key
        assert (a.metrics["accuracy"], a.metrics["file_bytes"]) == (b.metrics["accuracy"], b.metrics["file_bytes"])
    assert _fronts(result) == _fronts(pool), [(e.metrics["latency_ratio"], e.metrics["latency_low"],
                                               e.metrics["latency_high"]) for e in [*good, *result.entries]]


def test_the_grid_in_docs_sweeps_md_expands(tmp_path):
    text = open("docs/sweeps.md", encoding="utf-8").read()
    grid = text.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "grid.toml").write_text(grid)
    assert len(load_grid(tmp_path / "grid.toml")) == 14


@pytest.mark.parametrize("grid,extra,words", [
    ("prune = [" + ",".join(str(i / 1000) for i in range(1, 1000)) + "]\nsparsity = ["
     + ",".join(str(i / 1000) for i in range(1, 1000)) + "]\n", [], "998,001 recipes"),
    ("[[recipe]]\nprune = 0.1\n" * 1001, [], "1,001 recipes"),
    ('providers = [["nope"]]\n', [], "unknown provider 'nope'"),
    ('fix_dims = [{N = 0}]\n', [], "the size must be positive"),
    ("prune = [0.5]\n", ["--workers", "100000"], "--workers 100000"),
    ("prune = [0.5]\n", ["--out", "FILE"], "exists and is not a folder"),
    ("prune = [0.5]\n", ["--eval", "/dev/zero"], "not a regular file"),
    ("prune = [0.5]\n", ["--latency-budget", "nan"], "--latency-budget nan"),
], ids=["product", "listed", "provider", "fix-dims", "workers", "out-file", "eval-device", "budget-nan"])
def test_adversarial_sweep_input_is_one_line_before_any_build(tmp_path, capsys, monkeypatch, grid, extra, words):
    """A 10^6-recipe grid filled the memory before a line was printed; an unknown provider or a
    zero fixed dim failed in every worker (exit 1); --workers 100000 was taken."""
    import onnxopt.sweep as sweep
    from onnxopt.sweep_cli import main

    monkeypatch.setattr(sweep, "_build_on_pool", lambda *a, **k: pytest.fail("a recipe was built"))
    path = tmp_path / "grid.toml"
    path.write_text(grid)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    args = [a if a != "FILE" else str(afile) for a in extra]
    out = [] if "--out" in args else ["--out", str(tmp_path / "sw")]
    assert main([DIGITS, "--grid", str(path), *out, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxopt: error: ") and words in err[0], err
    assert not (tmp_path / "sw").exists() and afile.read_text() == "mine"
