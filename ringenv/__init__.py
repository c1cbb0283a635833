"""ringenv: a Gymnasium environment around a simulated arm64 KVM host with per-vCPU dirty rings.

Importing the package registers the environments:

- ``ringenv/Migration-v0``: one live migration per episode, ``MultiDiscrete`` actions
- ``ringenv/Checkpoint-v0``: a fixed horizon of periodic checkpoints
- ``ringenv/MigrationDiscrete-v0``, ``ringenv/CheckpointDiscrete-v0``: the same with the action
  flattened to one ``Discrete`` (for DQN)

Its submodules load when first used: ``ringenv.config.scale_scenario(...)`` and
``help(ringenv.env.MigrationEnv)`` work after a plain ``import ringenv``.

Beyond ``gymnasium.make`` / ``make_vec`` and the env's documented attributes (its class
docstring, "Attributes"), :data:`PUBLIC` names what a program built on ringenv may import from
it: the config loaders and objects, the file helpers, the action grid's nearest choice, and the
command-line conventions a front-end adding commands shares. ``agents/`` uses nothing else (a
test checks it).
"""

__version__ = "0.1.0"


def _register() -> None:
    from gymnasium.envs.registration import register, registry

    for name in ("Migration", "Checkpoint"):
        for suffix in ("", "Discrete"):
            env_id = f"ringenv/{name}{suffix}-v0"
            if env_id not in registry:
                register(id=env_id, entry_point=f"ringenv.env:{name}{suffix}Env")


_register()

#: the public names of ringenv's submodules, by module (see the module docstring)
PUBLIC = {
    "config": ("ConfigError", "ScenarioConfig", "EnvConfig", "HostProfile", "WorkloadConfig", "load_scenario",
               "load_workload", "load_host_profile", "load_workload_sets", "scale_scenario", "CONFIG_DIR",
               "parse_yaml", "read_text", "write_atomically"),
    "env": ("MigrationEnv", "CheckpointEnv", "MigrationDiscreteEnv", "CheckpointDiscreteEnv", "nearest_choices",
            "NOT_KEYWORDS"),
    "cli": ("stdout_reader_gone", "end_for_closed_stdout"),
}

#: the submodules ``ringenv.<name>`` imports on first use (:func:`__getattr__`)
_SUBMODULES = frozenset({"arrays", "cli", "config", "demo", "env", "guest", "jit", "kvm", "realkvm", "replay", "vmm"})


def __getattr__(name: str):
    """``ringenv.config`` and the other submodules without importing them first (PEP 562)."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
