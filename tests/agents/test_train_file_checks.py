"""The training hyperparameter files (configs/train/*.yaml) and --hp, as the fuzzing audit found
them: integers beyond any sensible value (``n_envs: 1e300`` hung building environments,
``buffer_size: 1e300`` reached DQN's "Maximum allowed dimension exceeded" naming no key), quoted
numbers taken as numbers (refused in every other config file), and an unknown top-level key
ignored. Each is an error naming the file, the key and what is accepted, before anything is built
or written."""

from __future__ import annotations

import pytest

from agents.common import load_hyperparams
from agents.train import Args, check_hyperparams, main

FILE = "ppo.yaml (ringenv/Migration-v0)"


def _from_file(hp: dict) -> dict:
    return {k: FILE for k in hp}


@pytest.mark.parametrize("algo, hp, needle", [
    ("ppo", {"n_envs": 1e300}, "n_envs: 1e+300: expected an integer from 1 to 256"),
    ("ppo", {"n_envs": 257}, "n_envs: 257: expected an integer from 1 to 256"),
    ("ppo", {"batch_size": 1e300}, "batch_size: 1e+300: expected an integer from 2 to 10000000"),
    ("ppo", {"n_steps": 10**30}, "n_steps: 1000000000000000000000000000000: expected an integer from 1 to 10000000"),
    ("ppo", {"n_epochs": 2.0**40}, "n_epochs: 1099511627776.0: expected an integer from 1 to 2147483647"),
    ("ppo", {"n_epochs": 2.5}, "n_epochs: 2.5: expected an integer from 1 to 2147483647"),
    ("ppo", {"n_timesteps": 1e300}, "n_timesteps: 1e+300: expected a number from 1 to 2147483647"),
    ("dqn", {"buffer_size": 1e300}, "buffer_size: 1e+300: expected an integer from 1 to 10000000"),
    ("dqn", {"train_freq": 1e300}, "train_freq: 1e+300: expected an integer from 1 to 2147483647"),
    ("ppo", {"batch_size": "64"}, "batch_size: 64: expected an integer, not the string '64' (a quoted number is text"),
    ("ppo", {"learning_rate": "3e-4"}, "learning_rate: 3e-4: expected a number, not the string '3e-4'"),
    ("ppo", {"gamma": "0.9"}, "gamma: 0.9: expected a number, not the string '0.9'"),
])
def test_a_file_value_out_of_range_or_quoted_names_the_file_the_key_and_the_range(algo, hp, needle):
    with pytest.raises(ValueError) as e:
        check_hyperparams(algo, hp, _from_file(hp))
    assert str(e.value).startswith(FILE) and needle in str(e.value), str(e.value)


@pytest.mark.parametrize("hp, needle", [
    ({"learning_rate": 1e300}, "--hp learning_rate=1e+300: expected a number within float32's range, |x| <= 3.403e+38"),
    ({"learning_rate": "lin_1e39"}, "--hp learning_rate=lin_1e39: expected a number within float32's range"),
    ({"clip_range": 1e39}, "--hp clip_range=1e+39: expected a number within float32's range"),
    ({"target_kl": -1e300}, "--hp target_kl=-1e+300: expected a number within float32's range"),
])
def test_a_float_beyond_float32_is_refused_naming_the_key(hp, needle):
    """learning_rate or clip_range 1e300 passed the check, then torch's Adam or the clipping raised
    "value cannot be converted to type float without overflow" with a traceback naming no key."""
    with pytest.raises(ValueError) as e:
        check_hyperparams("ppo", hp)
    assert needle in str(e.value), str(e.value)
    assert check_hyperparams("ppo", {"learning_rate": 3e38})["learning_rate"] == 3e38  # the range's edge


def test_an_integral_float_in_range_is_an_int_and_a_schedule_stays_text():
    hp = {"n_steps": 64.0, "batch_size": 32, "clip_range": "lin_0.2", "n_envs": 256.0}
    out = check_hyperparams("ppo", hp, _from_file(hp))
    assert out["n_steps"] == 64 and isinstance(out["n_steps"], int) and out["n_envs"] == 256
    assert out["clip_range"](1.0) == pytest.approx(0.2)


def test_an_unknown_top_level_key_in_a_hyperparameter_file_is_an_error_naming_it(tmp_path):
    f = tmp_path / "hp.yaml"
    f.write_text("ringenv/Migration-v0:\n  n_steps: 32\nbogus_key: 1\n")
    with pytest.raises(ValueError) as e:
        load_hyperparams("ppo", "ringenv/Migration-v0", f)
    msg = str(e.value)
    assert msg.startswith("hp.yaml: 'bogus_key' is not an environment id; accepted at the top: ringenv/Migration-v0, "
                          "ringenv/MigrationDiscrete-v0, ringenv/Checkpoint-v0, ringenv/CheckpointDiscrete-v0"), msg


@pytest.mark.parametrize("line, needle", [
    ("  n_envs: 1e300\n", "n_envs: 1e+300: expected an integer from 1 to 256"),
    ("  batch_size: '64'\n", "batch_size: 64: expected an integer, not the string '64'"),
])
def test_train_refuses_the_file_before_building_or_writing_anything(tmp_path, line, needle):
    """``n_envs: 1e300`` built environments until it hung; now the run stops at the check."""
    f = tmp_path / "hp.yaml"
    f.write_text("ringenv/Migration-v0:\n  n_steps: 32\n" + line)
    out = tmp_path / "out"
    args = Args(hyperparams=str(f), out=str(out), evals=0, checkpoints=0, vec_env="dummy", tensorboard=False,
                progress=False)
    with pytest.raises(ValueError) as e:
        main(args)
    assert needle in str(e.value) and "hp.yaml" in str(e.value), str(e.value)
    assert not out.exists()


def test_n_envs_flag_has_the_same_bound(tmp_path):
    args = Args(n_envs=10**6, out=str(tmp_path / "out"), tensorboard=False, progress=False)
    with pytest.raises(ValueError, match=r"--n-envs 1000000: expected an integer from 0 to 256"):
        main(args)


def test_a_directory_that_is_no_run_is_not_cleared(tmp_path):
    """--out/--name naming a directory with a ``checkpoints`` or ``eval`` folder but no args.json
    (not a training run's): an error before anything is built, nothing removed."""
    run = tmp_path / "mine"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds checkpoints but no args.json"):
        main(Args(out=str(tmp_path), name="mine", timesteps=64, hp=["n_steps=32"], evals=0, checkpoints=0,
                  tensorboard=False, progress=False, vec_env="dummy"))
    assert (run / "checkpoints" / "notes.txt").read_text() == "mine"


def test_a_schedule_is_recorded_as_written(tmp_path):
    """args.json records ``learning_rate: lin_0.001`` as written, not the repr of the function it
    becomes (a memory address: two identical runs wrote different files, and the value was lost)."""
    import json

    run = main(Args(out=str(tmp_path), name="lin", timesteps=64, hp=["n_steps=32", "batch_size=32",
                                                                      "learning_rate=lin_0.001"],
                    evals=0, checkpoints=0, tensorboard=False, progress=False, vec_env="dummy"))
    hp = json.loads((run / "args.json").read_text())["hyperparams"]
    assert hp["learning_rate"] == "lin_0.001", hp
