"""The configuration and command-line layer against the project rule: "Bad input gets a clear
error that names the field or argument and the accepted values, and nothing is lost or
half-written"; configs: every invalid field gets an error naming the field, the bad value and
what is accepted; no Python traceback to a CLI user; usage errors exit 2. Each case was found
by an audit, failing before its fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ringenv.config import ConfigError, load_host_profile, load_scenario

ROOT = Path(__file__).resolve().parents[1]
FAST_TRAIN = ["--timesteps", "1", "--n-envs", "1", "--evals", "0", "--checkpoints", "0", "--no-progress",
              "--no-tensorboard"]


def ringenv(*args, timeout=240, extra_path=None, stdin=None):
    env = dict(os.environ)
    paths = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "ringenv", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def clean_usage_error(p) -> bool:
    return p.returncode == 2 and "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real (tiny) trained model: ~5 s."""
    out = tmp_path_factory.mktemp("runs")
    p = ringenv("train", *FAST_TRAIN, "--hp", "n_steps=8", "batch_size=8", "--out", out, "--name", "tiny")
    assert p.returncode == 0, p.stderr
    return out / "tiny"


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------ 1. non-UTF-8 config files
def test_non_utf8_scenario_file_is_a_config_error(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"name: x\xff\xfe\nvm: {memory: 1GiB, vcpus: 2}\nworkload: oltp\n")
    with pytest.raises(ConfigError, match="bin.yaml"):
        load_scenario(p)


def test_migrate_with_non_utf8_scenario_exits_2_without_traceback(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"name: x\xff\xfe\nvm: {memory: 1GiB, vcpus: 2}\nworkload: oltp\n")
    r = ringenv("migrate", "--scenario", p)
    assert clean_usage_error(r), (r.returncode, r.stderr[-600:])
    assert "bin.yaml" in r.stderr


def test_replay_with_non_utf8_trace_exits_2_without_traceback(tmp_path):
    p = tmp_path / "bin.json"
    p.write_bytes(b"\xff\xfe{}")
    r = ringenv("replay", p)
    assert clean_usage_error(r), (r.returncode, r.stderr[-600:])
    assert "bin.json" in r.stderr


# ------------------------------------------------------------- 2. hyperparameter file shapes
@pytest.mark.parametrize("text", [
    "ringenv/Migration-v0: {n_steps: [1\n",   # YAML syntax error
    "- 1\n- 2\n",                            # top level a list
    "ringenv/Migration-v0: 5\n",             # the entry a scalar
    "ringenv/Migration-v0:\n",               # the entry null
])
def test_load_hyperparams_bad_file_is_a_reported_error_naming_the_file(tmp_path, text):
    """The errors run_reporting turns into 'PREFIX: message' + exit 2 are ValueError, KeyError
    and FileNotFoundError; a YAML error or a TypeError is a traceback."""
    from agents.common import load_hyperparams

    f = tmp_path / "hp.yaml"
    f.write_text(text)
    with pytest.raises((ValueError, KeyError, FileNotFoundError)) as ei:
        load_hyperparams("ppo", "ringenv/Migration-v0", f)
    assert "hp.yaml" in str(ei.value)


def test_load_hyperparams_top_level_string_is_not_listed_character_by_character(tmp_path):
    from agents.common import load_hyperparams

    f = tmp_path / "hp.yaml"
    f.write_text("just text\n")
    with pytest.raises((ValueError, KeyError)) as ei:
        load_hyperparams("ppo", "ringenv/Migration-v0", f)
    assert "entries: j, u, s, t" not in str(ei.value)


def test_train_with_hyperparams_yaml_syntax_error_exits_2(tmp_path):
    f = tmp_path / "hp.yaml"
    f.write_text("ringenv/Migration-v0: {n_steps: [1\n")
    r = ringenv("train", *FAST_TRAIN, "--hyperparams", f, "--out", tmp_path / "runs")
    assert clean_usage_error(r), (r.returncode, r.stderr[-600:])
    assert "hp.yaml" in r.stderr


# --------------------------------------------------------- 3. KEY=VALUE with bad YAML syntax
@pytest.mark.parametrize("flag", ["--set", "--hp"])
def test_parse_overrides_bad_yaml_value_names_the_flag(flag):
    from agents.common import parse_overrides

    with pytest.raises(ValueError, match=flag):
        parse_overrides(["vm=[1"], flag=flag)


def test_evaluate_set_with_bad_yaml_value_exits_2(tmp_path):
    r = ringenv("evaluate", "--set", "vm=[1", "--workloads", "idle", "--seeds", 1, "--workers", 1, "--no-progress",
                "--out", tmp_path)
    assert clean_usage_error(r), (r.returncode, r.stderr[-600:])
    assert "--set" in r.stderr


# ------------------------------------------------------ 4. repeated list flags drop values
@pytest.mark.parametrize("argv, dest, first", [
    (["train", "--hp", "n_steps=8", "--hp", "batch_size=8"], "hp", "n_steps=8"),
    (["evaluate", "--set", "max_episode_s=1", "--set", "vm.vcpus=2"], "set", "max_episode_s=1"),
    (["evaluate", "--policies", "qemu", "--policies", "random"], "policies", "qemu"),
    (["compare", "--models", "runs/a", "--models", "runs/b"], "models", "runs/a"),
])
def test_a_repeated_list_flag_does_not_silently_drop_the_earlier_values(argv, dest, first):
    """`--hp a=1 --hp b=2` keeps only b=2 (argparse's nargs='*' store): the user's a=1 is lost
    without a word. Either keep both (action='extend') or refuse the repetition (exit 2)."""
    from ringenv.cli import build_parser

    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 2
        return
    assert first in getattr(ns, dest), getattr(ns, dest)


# ----------------------------------------------------- 5. env_wrapper keywords not checked
@pytest.mark.parametrize("value", ["env_wrapper=gymnasium.wrappers.TimeLimit",
                                   "env_wrapper={gymnasium.wrappers.TimeLimit: {foo: 1}}"])
def test_train_env_wrapper_with_wrong_keywords_exits_2_naming_it(tmp_path, value):
    r = ringenv("train", *FAST_TRAIN, "--hp", "n_steps=8", "batch_size=8", value, "--out", tmp_path / "runs")
    assert clean_usage_error(r), (r.returncode, r.stderr[-600:])
    assert "env_wrapper" in r.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------ 6. a model's record it cannot use
def _with_record(model: Path, **changes) -> None:
    """Rewrite the training record saved in ``model`` (MODEL_RECORD) with ``changes``."""
    from stable_baselines3 import PPO

    from agents.common import MODEL_RECORD

    m = PPO.load(model, device="cpu")
    setattr(m, MODEL_RECORD, {**getattr(m, MODEL_RECORD), **changes})
    m.save(model)


def test_evaluate_model_whose_wrapper_cannot_be_imported_exits_2(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    meta = json.loads((run / "args.json").read_text())  # the run's record and the model's own agree
    meta["env_wrapper"] = "no_such_module_xyz.Wrapper"
    (run / "args.json").write_text(json.dumps(meta))
    _with_record(run / "final_model.zip", env_wrapper="no_such_module_xyz.Wrapper")
    r = ringenv("evaluate", "--policies", run, "--workloads", "idle", "--seeds", 1, "--workers", 1, "--no-progress",
                "--out", tmp_path / "ev")
    assert clean_usage_error(r), (r.returncode, r.stderr[-600:])
    assert "no_such_module_xyz" in r.stderr


def test_evaluate_warns_of_an_args_json_the_model_s_record_contradicts(tiny_run, tmp_path):
    """An args.json next to a model that its own saved record contradicts is another run's and
    is left aside (the model runs as trained): said, naming the file and the keys, not silent."""
    run = _copy_run(tiny_run, tmp_path / "run")
    meta = json.loads((run / "args.json").read_text())
    meta["env_wrapper"] = "no_such_module_xyz.Wrapper"
    (run / "args.json").write_text(json.dumps(meta))
    r = ringenv("evaluate", "--policies", run, "--workloads", "idle", "--seeds", 1, "--workers", 1, "--no-progress",
                "--out", tmp_path / "ev")
    err = " ".join(r.stderr.split())
    assert r.returncode == 0, r.stderr[-600:]
    assert (f"{run / 'args.json'} contradicts the record saved in the model on env_wrapper: left aside as another "
            "run's record, the model runs as it was trained") in err, err


@pytest.mark.parametrize("text", ["{bad", "[1]"])
def test_evaluate_model_with_unreadable_args_json_names_the_file(tiny_run, tmp_path, text):
    run = _copy_run(tiny_run, tmp_path / "run")
    (run / "args.json").write_text(text)
    r = ringenv("evaluate", "--policies", run, "--workloads", "idle", "--seeds", 1, "--workers", 1, "--no-progress",
                "--out", tmp_path / "ev")
    assert clean_usage_error(r), (r.returncode, r.stderr[-600:])
    assert "args.json" in r.stderr


# ------------------------------------------- 7. a training run that failed mid-way
CRASH = '''
import gymnasium as gym

class CrashAfter(gym.Wrapper):
    """Raises after n steps of all its instances: any runtime failure in the middle of a run."""
    count = 0

    def __init__(self, env, n=4000):
        super().__init__(env)
        self.n = n

    def step(self, action):
        CrashAfter.count += 1
        if CrashAfter.count > self.n:
            raise RuntimeError("simulated failure mid-training")
        return self.env.step(action)
'''


def test_a_training_run_that_failed_midway_is_not_left_looking_complete(tmp_path):
    """Ctrl-C marks args.json ``interrupted`` (evaluate warns); any other failure leaves the
    first args.json (no mark) next to the best model of an evaluation made before it, and
    ``evaluate --policies RUN`` takes it as a finished run without a word."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "crashwrap.py").write_text(CRASH)
    out = tmp_path / "runs"
    r = ringenv("train", "--timesteps", 64, "--n-envs", 1, "--hp", "n_steps=8", "batch_size=8", "action_repeat=1",
                "env_wrapper={crashwrap.CrashAfter: {n: 4000}}", "--evals", 2, "--checkpoints", 0, "--no-progress",
                "--no-tensorboard", "--out", out, "--name", "crashed", extra_path=mods, timeout=280)
    assert r.returncode != 0 and "simulated failure" in r.stderr, r.stderr[-600:]
    from agents.evaluate import find_model, model_meta

    run = out / "crashed"
    try:
        model = find_model(run)
    except FileNotFoundError:
        return  # nothing usable left behind: fine
    meta = model_meta(model)
    assert "simulated failure" in meta.get("failed", "") and meta["finished"] is False, \
        f"{model.name} of a failed run is presented as a complete one: args.json {sorted(meta)}"
    r = ringenv("evaluate", "--policies", run, "--workloads", "idle", "--seeds", 1, "--workers", 1, "--no-progress",
                "--out", tmp_path / "ev", extra_path=mods)
    assert r.returncode == 0, r.stderr[-600:]
    assert "did not finish (RuntimeError: simulated failure" in r.stderr, r.stderr[-600:]


# --------------------------------------------- 8. --out checked only after all the work
def test_evaluate_bad_out_is_a_usage_error_naming_the_flag(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    r = ringenv("evaluate", "--workloads", "idle", "--seeds", 1, "--workers", 1, "--no-progress", "--out", f)
    assert clean_usage_error(r), (r.returncode, r.stderr[-600:])
    assert "--out" in r.stderr


# ------------------------------------------ 9. replay: trace beyond the host's KVM limits
def _trace(tmp_path, **kw):
    t = {"slot_pages": 64, "ring_entries": 256, "reap_scope": "self", "vcpus": [{"writes": [1]}]}
    t.update(kw)
    p = tmp_path / "t.json"
    p.write_text(json.dumps(t))
    return p


def test_replay_trace_with_more_vcpus_than_kvm_allows_names_the_field(tmp_path):
    r = ringenv("replay", _trace(tmp_path, vcpus=[{"writes": [1]}] * 513))
    assert clean_usage_error(r), (r.returncode, r.stderr[-600:])
    assert "trace.vcpus" in r.stderr


def test_replay_trace_with_too_many_slot_pages_names_the_field(tmp_path):
    r = ringenv("replay", _trace(tmp_path, slot_pages=10**13))
    assert clean_usage_error(r), (r.returncode, r.stderr[-600:])
    assert "trace.slot_pages" in r.stderr


# ------------------------------------ 10. a host profile that accepts no ring size at all
def test_host_profile_leaving_no_ring_size_is_refused_naming_the_field(tmp_path):
    d = yaml.safe_load((ROOT / "configs/hosts/arm64-4k.yaml").read_text())
    d["name"] = "no-rings"
    d["arch_dirty_log_size"] = 10**6
    p = tmp_path / "no-rings.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="arch_dirty_log_size"):
        load_host_profile(p)


# -------------------------- 11. the bitmap baseline on an env that cannot run it (dirty-limit)
def test_evaluate_bitmap_with_dirty_limit_leaves_it_out_or_names_it(tmp_path):
    """evaluate(): 'Policies whose environment cannot provide them (the bitmap baseline on an
    env that forces the ring) are dropped with a note on stderr.' With --set
    throttle=dirty-limit (which needs the ring) the whole command fails instead, with a message
    about a `collector` override the user never gave."""
    r = ringenv("evaluate", "--policies", "qemu", "bitmap", "--set", "throttle=dirty-limit", "--workloads", "idle",
                "--seeds", 1, "--workers", 1, "--no-progress", "--out", tmp_path)
    ok = (r.returncode == 0 and "policy 'bitmap' left out" in r.stderr) or (
        clean_usage_error(r) and "bitmap" in r.stderr)
    assert ok, (r.returncode, r.stderr[-600:])


# ------------------------------------------- 12. YAML 1.1 exponent numbers read as strings
def test_scenario_number_in_exponent_notation_is_not_called_a_string(tmp_path):
    """PyYAML reads an unquoted 1e3 as a string; the error then says "'1e3' is a string" of a
    value the user wrote as a number (--hp converts these, config files and --set do not)."""
    p = tmp_path / "s.yaml"
    p.write_text("name: x\nvm: {memory: 1GiB, vcpus: 2}\nworkload: oltp\ninterval_ms: 1e3\n")
    try:
        cfg = load_scenario(p)
    except ConfigError as e:
        assert "is a string" not in str(e), str(e)
    else:
        assert cfg.interval_ms == 1000.0


# --------------------------------------------------------------- booleans, inf, flag naming
@pytest.mark.parametrize("override, field", [({"checkpoint": {"stop_the_world": 0}}, "checkpoint.stop_the_world"),
                                             ({"vm": {"with_bitmap": "yes"}}, "vm.with_bitmap"),
                                             ({"auto_converge": {"tailslow": 1}}, "auto_converge.tailslow")])
def test_a_boolean_field_takes_true_or_false_only(override, field):
    """pydantic's lax mode takes 0, 1, 'yes', 'off' as booleans; a config's booleans are YAML's
    true and false (null where the field allows it)."""
    with pytest.raises(ConfigError, match=rf"{field}: .* is not true or false"):
        load_scenario("checkpoint", **override)
    assert load_scenario("default", vm={"with_bitmap": None}).vm.with_bitmap is None


def test_max_bandwidth_must_be_finite():
    with pytest.raises(ConfigError, match=r"link.max_bandwidth_mibps: inf is not accepted; accepted: a finite"):
        load_scenario("default", link={"max_bandwidth_mibps": float("inf")})


def test_migrate_names_the_flag_only_for_what_came_from_a_flag(tmp_path):
    """`--scenario nope` names --scenario; a bad interval_ms from the scenario file does not
    blame --interval-ms; one given by --interval-ms does."""
    r = ringenv("migrate", "--scenario", "nope")
    assert clean_usage_error(r) and "scenario (--scenario): unknown scenario 'nope'" in r.stderr, r.stderr
    p = tmp_path / "s.yaml"
    p.write_text("name: x\nvm: {memory: 1GiB, vcpus: 2}\nworkload: oltp\ninterval_ms: -5\n")
    r = ringenv("migrate", "--scenario", p)
    assert clean_usage_error(r) and "  interval_ms: " in r.stderr and "--interval-ms" not in r.stderr, r.stderr
    r = ringenv("migrate", "--interval-ms", -1)
    assert clean_usage_error(r) and "interval_ms (--interval-ms): " in r.stderr, r.stderr


def test_results_of_an_earlier_run_that_this_one_does_not_write_are_removed(tmp_path):
    """evaluate / compare into a directory: compare's plots and table of an earlier run are not
    left next to new results that did not make them."""
    for name in ("pareto.png", "timeline.png", "table.md", "per_workload.csv", "meta.json"):
        (tmp_path / name).write_text("old")
    r = ringenv("compare", "--policies", "qemu", "--workloads", "idle", "--seeds", 1, "--workers", 1,
                "--no-progress", "--no-plots", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-600:]
    assert not (tmp_path / "pareto.png").exists() and not (tmp_path / "timeline.png").exists()
    assert (tmp_path / "table.md").read_text() != "old" and "removed pareto.png, timeline.png" in r.stderr
    r = ringenv("evaluate", "--policies", "qemu", "--workloads", "idle", "--seeds", 1, "--workers", 1,
                "--no-progress", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-600:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["episodes.csv", "meta.json", "summary.csv"]


def test_files_of_those_names_beside_no_run_s_results_are_left_alone(tmp_path):
    """A directory that holds no earlier run's results (no meta.json): a table.md or pareto.png
    of the user's own is not removed."""
    (tmp_path / "table.md").write_text("mine")
    r = ringenv("evaluate", "--policies", "qemu", "--workloads", "idle", "--seeds", 1, "--workers", 1,
                "--no-progress", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-600:]
    assert (tmp_path / "table.md").read_text() == "mine" and "left as they are" in r.stderr


def test_replay_reads_the_trace_from_standard_input_with_a_dash(tmp_path):
    """`ringenv replay -` reads stdin, as `kvm-replay -` does (the README calls them the same
    trace format); a bad trace there is named <stdin>."""
    trace = {"slot_pages": 64, "ring_entries": 256, "reap_scope": "all", "vcpus": [{"writes": [1, 2, 3], "syncs": [1]}]}
    f = tmp_path / "t.json"
    f.write_text(json.dumps(trace))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                                                      if os.environ.get("PYTHONPATH") else [])))

    def run(arg, text):
        return subprocess.run([sys.executable, "-m", "ringenv", "replay", arg], cwd=ROOT, env=env, input=text,
                              capture_output=True, text=True, timeout=240)

    from_file, from_stdin = run(str(f), ""), run("-", json.dumps(trace))
    assert from_file.returncode == from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == from_file.stdout and '"offsets"' in from_stdin.stdout
    bad = run("-", "{not json")
    assert clean_usage_error(bad) and "TRACE <stdin>: not valid JSON" in bad.stderr


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    """`ringenv replay t.json | head`: the write to the closed pipe ends the command with 141
    (128 + SIGPIPE), as a shell pipeline expects, not with '[Errno 32] Broken pipe' and 1."""
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"slot_pages": 30000, "ring_entries": 256, "reap_scope": "all",
                             "vcpus": [{"writes": list(range(30000)), "syncs": []}]}))  # ~200 KB of output
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                                                      if os.environ.get("PYTHONPATH") else [])))
    p = subprocess.Popen([sys.executable, "-m", "ringenv", "replay", str(f)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.read(1) == "{"  # (the JSON is one line: read a little of it only)
    p.stdout.close()
    rc = p.wait(timeout=240)
    # nothing but, with a cold numba cache (a fresh clone, or another worker still compiling),
    # the one-line notice that the kernels are being compiled
    err = "".join(ln for ln in p.stderr.read().splitlines(keepends=True)
                  if not ln.startswith("ringenv: compiling numba kernels not in the cache yet"))
    p.stderr.close()
    assert rc == 141 and err == "", err


def test_only_a_closed_standard_output_counts_as_the_reader_gone(monkeypatch):
    """A BrokenPipeError of another pipe (a SubprocVecEnv worker's) must not end a command
    quietly: stdout_reader_gone tells them apart by polling standard output."""
    from ringenv.cli import stdout_reader_gone

    r, w = os.pipe()
    out = os.fdopen(w, "w")
    monkeypatch.setattr(sys, "stdout", out)
    try:
        assert not stdout_reader_gone()
        os.close(r)
        assert stdout_reader_gone()
    finally:
        monkeypatch.undo()
        out.close()


def test_a_broken_pipe_that_is_not_standard_output_is_reported(capsys):
    from agents.common import run_reporting
    from ringenv.realkvm.cli import _guarded

    def worker_died():
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):  # not swallowed: ringenv's main reports it (exit 1)
        run_reporting(worker_died, "ringenv train")
    with pytest.raises(BrokenPipeError):
        _guarded("kvm-replay")(lambda args: worker_died())(None)

    import ringenv.cli as cli

    class Args:
        command = "train"

        @staticmethod
        def func(args):
            worker_died()

    monkey = cli.build_parser
    try:
        cli.build_parser = lambda: type("P", (), {"parse_args": staticmethod(lambda argv: Args)})()
        assert cli.main([]) == 1
    finally:
        cli.build_parser = monkey
    assert "ringenv train: [Errno 32] Broken pipe" in capsys.readouterr().err


def test_the_submodules_load_on_first_use_after_a_plain_import():
    """The README's `ringenv.config.scale_scenario(...)` after `import ringenv` used to fail
    with "module 'ringenv' has no attribute 'config'"."""
    code = ("import ringenv; s = ringenv.config.scale_scenario('default', '1GiB'); "
            "print(s.vm.memory, ringenv.env.MigrationEnv.__name__, hasattr(ringenv, 'nope'))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == [str(1 << 30), "MigrationEnv", "False"]


def test_the_demo_leaves_compilation_out_of_its_speed(monkeypatch):
    """`ringenv demo` right after an install reported the ~15 s compile as simulation time
    (speed_x 0.1): numba's compile time is now measured and taken out (compile_s)."""
    import time

    import numba.core.event as ev

    from ringenv import demo
    from ringenv.kvm import Vm

    real = Vm.run_until
    first = []

    def run_until(self, until):  # the first call "compiles" for 0.3 s, as numba reports it
        if not first:
            first.append(1)
            with ev.trigger_event("numba:compile", data={}):
                time.sleep(0.3)
        return real(self, until)

    monkeypatch.setattr(Vm, "run_until", run_until)
    t0 = time.perf_counter()
    out = demo.host_demo(seconds=0.05, nr_vcpus=1, mem_gib=1)
    total = time.perf_counter() - t0
    assert out["compile_s"] >= 0.3 and 0 < out["wall_s"] <= total - out["compile_s"] + 0.002
    # kernels already loaded (an earlier test in this worker): ~1 ms of simulation, still not 0
    assert demo.host_demo(seconds=0.05, nr_vcpus=1, mem_gib=1)["wall_s"] > 0
