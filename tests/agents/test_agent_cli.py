"""The ``ringenv`` command's own surface (ringenv/cli.py, ringenv/demo.py, agents/cli.py): the
top-level help and version, plain-text subcommand help, and bad arguments of ``demo`` and
``train`` ending with a message naming the argument and what is accepted (exit code 2), checked
before anything is written."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ringenv.cli import main

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--set", "vm.memory=1GiB", "vm.vcpus=2"]
RINGS = "256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536"


def ringenv(*args, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "ringenv", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def flat(text: str) -> str:
    return " ".join(text.split())


def test_top_level_help_names_both_groups_of_subcommands():
    p = ringenv("--help")
    assert p.returncode == 0
    head = flat(p.stdout.split("positional arguments")[0])
    assert "``" not in head
    # a complete description, not a first line cut mid-parenthesis
    assert "(run, train, evaluate, compare)" in head and head.rstrip().endswith("."), head
    for cmd in ("replay", "migrate", "demo", "run", "train", "evaluate", "compare"):
        assert cmd in head, cmd


def test_version_is_the_package_version():
    p = ringenv("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"ringenv {importlib.metadata.version('ringenv')}"


@pytest.mark.parametrize("cmd", ["demo", "run", "train", "evaluate", "compare"])
def test_subcommand_help_is_plain_text(cmd):
    p = ringenv(cmd, "--help")
    assert p.returncode == 0 and "usage: ringenv " + cmd in p.stdout
    assert not re.search(r"``|:(mod|class|func|meth):", p.stdout), p.stdout


def test_demo_ring_size_off_the_host_lists_the_accepted_sizes(capsys):
    assert main(["demo", "--ring-entries", "3000", "--seconds", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "--ring-entries 3000" in err and RINGS in err and "arm64-4k" in err and "Errno" not in err, err


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf", "soon", "3600.5", "1e12"])
def test_demo_seconds_must_be_a_positive_finite_number(seconds, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--seconds", seconds])
    assert e.value.code == 2 and "--seconds" in capsys.readouterr().err


def test_demo_runs_with_an_accepted_ring_size(capsys):
    assert main(["demo", "--ring-entries", "1024", "--seconds", "0.05"]) == 0
    assert re.search(r"ring_entries\s+1024", capsys.readouterr().out)


# ---------------------------------------------------------------------------------- train: --timesteps
def test_train_timesteps_counts_decisions_everywhere():
    """--timesteps counts the agent's decisions (SB3 timesteps); each is action_repeat env steps:
    the flag's help and the dataclass field's docstring say so in the same words."""
    from agents.common import field_docs
    from agents.train import Args

    doc = field_docs(Args)["timesteps"]
    assert "decisions" in doc and "action_repeat" in doc and "total environment steps" not in doc
    p = ringenv("train", "--help")
    assert flat(doc) in flat(p.stdout)


# ---------------------------------------------------------------------------------- train: --hp
def train_error(capsys, tmp_path, *args):
    rc = main(["train", "--timesteps", "10", "--out", str(tmp_path), "--no-progress", "--no-tensorboard", *SMALL,
               *map(str, args)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not list(tmp_path.iterdir()), "nothing is written for a bad argument"
    return flat(err)


def test_train_unknown_hyperparameter_names_the_key_and_the_accepted_ones(capsys, tmp_path):
    err = train_error(capsys, tmp_path, "--hp", "nosuch=1")
    assert "--hp nosuch=1" in err and "PPO" in err, err
    # the accepted ones: PPO's constructor keywords and the program's own keys
    for k in ("n_steps", "batch_size", "gamma", "gae_lambda", "clip_range", "ent_coef", "policy_kwargs",
              "action_repeat", "normalize", "n_envs", "n_timesteps", "policy"):
        assert re.search(rf"\b{k}\b", err.split("accepted")[1]), (k, err)
    for k in ("env", "seed", "device", "verbose", "tensorboard_log", "_init_setup_model"):  # set by the program
        assert not re.search(rf"[ ,:]{k}[,;)]", err.split("accepted")[1]), (k, err)
    # DQN's list is DQN's
    err = train_error(capsys, tmp_path, "--algo", "dqn", "--hp", "n_epochs=3")
    assert "--hp n_epochs=3" in err and "DQN" in err and "exploration_fraction" in err and "buffer_size" in err, err


@pytest.mark.parametrize("algo, hp, words", [
    ("ppo", "batch_size=1", ["batch_size", ">= 2"]),
    ("ppo", "gamma=1.5", ["gamma", "0 to 1"]),
    ("ppo", "n_steps=0", ["n_steps", ">= 1"]),
    ("ppo", "n_epochs=two", ["n_epochs", "integer"]),
    ("ppo", "learning_rate=fast", ["learning_rate", "lin_"]),
    ("ppo", "clip_range=-0.1", ["clip_range", "> 0"]),
    ("ppo", "normalize_advantage=maybe", ["normalize_advantage", "true or false"]),
    ("ppo", "policy_kwargs={activation_fn: sigmoid}", ["activation_fn", "tanh, relu, elu"]),
    ("ppo", "policy_kwargs=5", ["policy_kwargs", "mapping"]),
    ("ppo", "policy_kwargs={net_arch: 5}", ["net_arch 5", "a list of layer sizes", "{pi: [...], vf: [...]}"]),
    ("ppo", "policy_kwargs={net_arch: {pi: [64], vf: abc}}", ["net_arch", "a list of layer sizes"]),
    ("ppo", "policy_kwargs={ortho_init: maybe}", ["ortho_init maybe", "true or false"]),
    ("ppo", "policy_kwargs={ordinal: maybe}", ["ordinal maybe", "true or false"]),
    ("ppo", "policy_kwargs={log_std_init: high}", ["log_std_init high", "a finite number"]),
    ("ppo", "policy_kwargs={netarch: [64]}", ["takes no keyword 'netarch'", "net_arch", "ortho_init"]),
    ("dqn", "policy_kwargs={net_arch: {pi: [64]}}", ["net_arch", "a list of layer sizes (integers > 0)"]),
    ("ppo", "normalize={nosuch: 1}", ["normalize", "nosuch", "norm_obs", "norm_reward"]),
    ("ppo", "action_repeat=0", ["action_repeat", ">= 1"]),
    ("ppo", "n_envs=0", ["n_envs", ">= 1"]),
    ("ppo", "policy=nosuch.Policy", ["policy", "MlpPolicy", "package.module.Class"]),
    ("ppo", "policy=Mlp", ["policy", "MlpPolicy"]),
    ("ppo", "env_wrapper=nosuch.Wrapper", ["env_wrapper", "nosuch.Wrapper"]),
    ("dqn", "exploration_fraction=2", ["exploration_fraction", "0 to 1"]),
    ("dqn", "train_freq=0", ["train_freq", ">= 1"]),
    ("dqn", "buffer_size=-5", ["buffer_size", ">= 1"]),
])
def test_train_bad_hyperparameter_values_are_caught_before_training(capsys, tmp_path, algo, hp, words):
    err = train_error(capsys, tmp_path, "--algo", algo, "--hp", hp)
    assert f"--hp {hp}" in err or hp.split("=")[0] in err, err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("flag, value", [("--timesteps", -5), ("--n-envs", -1), ("--evals", -1),
                                         ("--checkpoints", -2), ("--eval-seeds", 0)])
def test_train_bad_counts_are_errors(capsys, tmp_path, flag, value):
    rc = main(["train", flag, str(value), "--out", str(tmp_path), "--no-progress", "--no-tensorboard", *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and str(value) in err, err
    assert not list(tmp_path.iterdir())


def test_hyperparameters_are_read_as_sb3_wants_them():
    """YAML reads 3e-4 as a string: a number is meant; lin_X is a schedule; integral floats of
    integer keywords become ints."""
    from agents.train import check_hyperparams

    hp = check_hyperparams("ppo", {"learning_rate": "3e-4", "n_steps": 64.0, "clip_range": "lin_0.2", "gamma": 1},
                           "--hp")
    assert hp["learning_rate"] == 3e-4 and hp["n_steps"] == 64 and isinstance(hp["n_steps"], int)
    assert hp["clip_range"](1.0) == pytest.approx(0.2) and hp["gamma"] == 1
    hp = check_hyperparams("dqn", {"train_freq": [4, "step"], "buffer_size": "1e5"}, "--hp")
    assert hp["train_freq"] == (4, "step") and hp["buffer_size"] == 100_000


def test_bad_hyperparameter_file_entry_names_the_file(capsys, tmp_path):
    f = tmp_path / "hp.yaml"
    f.write_text("ringenv/Migration-v0:\n  n_steps: 32\n  gama: 0.9\n")
    out = tmp_path / "out"
    out.mkdir()
    err = train_error(capsys, out, "--hyperparams", f)
    assert "hp.yaml" in err and "gama" in err and "gamma" in err, err


# ---------------------------------------------------------------------------------- env ids, seeds
def test_train_unknown_env_id_lists_the_environment_ids(capsys, tmp_path):
    err = train_error(capsys, tmp_path, "--algo", "a2c", "--env-id", "foo")
    assert "--env-id 'foo': unknown environment id; accepted:" in err, err
    for env_id in ("ringenv/Migration-v0", "ringenv/MigrationDiscrete-v0", "ringenv/Checkpoint-v0",
                   "ringenv/CheckpointDiscrete-v0"):
        assert env_id in err, (env_id, err)
    assert "has no entry" not in err, err


def test_train_env_id_the_algorithms_file_lacks_says_so(capsys, tmp_path):
    err = train_error(capsys, tmp_path, "--algo", "a2c", "--env-id", "ringenv/Checkpoint-v0")
    assert "unknown environment id" not in err, err
    assert "a2c.yaml has no entry for ringenv/Checkpoint-v0" in err and "ringenv/Migration-v0" in err, err
    assert "--hyperparams" in err, err


def one_line_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("cmd", ["evaluate", "compare"])
@pytest.mark.parametrize("flag, value, words", [("--seeds", 0, "an integer >= 1"), ("--seeds", -2, "an integer >= 1"),
                                               ("--seed0", -5, "an integer >= 0")])
def test_evaluation_seed_counts_are_checked_up_front(capsys, tmp_path, cmd, flag, value, words):
    out = tmp_path / "out"
    err = one_line_error(capsys, [cmd, flag, str(value), "--policies", "qemu", "--workloads", "oltp", "--workers", "2",
                                  "--out", str(out), "--no-progress", *SMALL])
    assert f"{flag} {value}: expected {words}" in err, err
    assert not out.exists()


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_train_seed_range_is_checked_up_front(capsys, tmp_path, seed):
    err = one_line_error(capsys, ["train", "--seed", str(seed), "--timesteps", "10", "--out", str(tmp_path),
                                  "--no-progress", "--no-tensorboard", *SMALL])
    assert f"--seed {seed}: expected an integer from 0 to 4294967295" in err and "hyperparameters" not in err, err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------- train: rounding
def test_rollout_rounding_of_the_budget():
    """SB3 runs whole rollouts: PPO/A2C n_steps x n_envs decisions, DQN train_freq x n_envs (in
    steps; a train_freq in episodes cannot be known in advance)."""
    from agents.train import rounded_timesteps

    assert rounded_timesteps("ppo", 1, {"n_steps": 128}, 2) == (256, 256)
    assert rounded_timesteps("ppo", 256, {"n_steps": 128}, 2) == (256, 256)
    assert rounded_timesteps("ppo", 257, {"n_steps": 128}, 2) == (512, 256)
    assert rounded_timesteps("ppo", 1, {}, 1) == (2048, 2048)  # PPO's default n_steps
    assert rounded_timesteps("a2c", 33, {"n_steps": 16}, 2) == (64, 32)
    assert rounded_timesteps("a2c", 1, {}, 1) == (5, 5)
    assert rounded_timesteps("dqn", 1, {"train_freq": 4}, 2) == (8, 8)
    assert rounded_timesteps("dqn", 9, {"train_freq": (2, "step")}, 1) == (10, 2)
    assert rounded_timesteps("dqn", 9, {}, 1) == (12, 4)  # DQN's default train_freq 4
    assert rounded_timesteps("dqn", 9, {"train_freq": (1, "episode")}, 1) == (9, None)


def test_train_timesteps_help_and_readme_say_the_budget_is_rounded_up():
    from agents.common import field_docs
    from agents.train import Args

    doc = field_docs(Args)["timesteps"]
    assert "rounded up" in doc and "n_steps x n_envs" in doc
    readme = flat((ROOT / "README.md").read_text())
    assert "N x `action_repeat` environment steps at most" not in readme
    assert "rounded up to whole rollouts" in readme


# ---------------------------------------------------------------------------------- evaluations without policies
@pytest.mark.parametrize("cmd", ["evaluate", "compare", "run"])
def test_an_evaluation_without_policies_is_a_usage_error(capsys, tmp_path, cmd):
    """`--policies` given no value: compare and run wrote an empty table and empty CSV files and
    exited 0 (evaluate said "no policies given", without the flag)."""
    out = tmp_path / "out"
    err = one_line_error(capsys, [cmd, "--policies", "--seeds", "1", "--out", str(out), "--no-progress", *SMALL])
    assert "--policies: none given; expected one or more heuristic specs (qemu, fixed:ENTRIES:MS" in err, err
    assert not out.exists()


@pytest.mark.parametrize("cmd", ["evaluate", "compare"])
def test_an_evaluation_whose_every_policy_is_left_out_is_a_usage_error(capsys, tmp_path, cmd):
    """The bitmap baseline is left out where the environment forces the ring (throttle=dirty-limit):
    with no other policy, evaluate and compare wrote empty files and exited 0."""
    out = tmp_path / "out"
    rc = main([cmd, "--policies", "bitmap", "--workloads", "oltp", "--seeds", "1", "--workers", "1", "--out", str(out),
               "--no-progress", *SMALL, "throttle=dirty-limit"])
    err = capsys.readouterr().err
    assert rc == 2 and "policy 'bitmap' left out" in err, err
    assert "--policies: every policy given (bitmap) was left out" in err and "Traceback" not in err, err
    assert not out.exists()


# ---------------------------------------------------------------------------------- errors name their flag
@pytest.mark.parametrize("argv, words", [
    (["train", "--set", "foo=1"], "--set foo: unknown argument; accepted: flatten_actions, render_mode, the env "
                                  "settings (control_interval_ms, "),
    (["train", "--set", "foo=1"], "scenario fields (host, vm, rate_scale, link, checkpoint, collector, throttle, "
                                  "auto_converge, dirty_limit, switchover, env) (the scenario, split, workloads are "
                                  "the command's --scenario, --split, --workloads)"),
    (["train", "--set", "vm.vcpus=0"], "--set: invalid scenario default.yaml with the keyword overrides (vm): "
                                       "vm.vcpus: Input should be greater than or equal to 1 (got 0)"),
    (["train", "--hyperparams", "{tmp}"], "--hyperparams '{tmp}': a directory, not a file; expected a YAML file"),
    (["train", "--hyperparams", "{tmp}/nosuch.yaml"], "--hyperparams '{tmp}/nosuch.yaml': no such file; expected"),
    (["train", "--scenario", "nosuch"], "scenario (--scenario): unknown scenario 'nosuch'; accepted: analytics,"),
    (["evaluate", "--scenario", "nosuch"], "scenario (--scenario): unknown scenario 'nosuch'; accepted: analytics,"),
    (["evaluate", "--policies", "fixed:1000:100"], "--policies 'fixed:1000:100': ENTRIES 1000 is not one of the "
                                                   f"environment's ring sizes; accepted ring_sizes: {RINGS}"),
    (["compare", "--policies", "qemu", "fixed:4096:150"], "--policies 'fixed:4096:150': interval 150 ms is not one"),
])
def test_bad_values_are_named_by_their_flag(capsys, tmp_path, argv, words):
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    extra = ["--timesteps", "10", "--no-tensorboard"] if argv[0] == "train" else ["--seeds", "1"]
    rc = main([*argv, *extra, "--out", str(out), "--no-progress"])
    err = flat(capsys.readouterr().err)
    assert rc == 2 and words.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err, err
    assert not out.exists()
