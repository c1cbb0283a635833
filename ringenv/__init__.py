"""ringenv: a Gymnasium environment around a simulated arm64 KVM host with per-vCPU dirty rings.

Importing the package registers the environments:

- ``ringenv/Migration-v0``: one live migration per episode, ``MultiDiscrete`` actions
- ``ringenv/Checkpoint-v0``: a fixed horizon of periodic checkpoints
- ``ringenv/MigrationDiscrete-v0``, ``ringenv/CheckpointDiscrete-v0``: the same with the action
  flattened to one ``Discrete`` (for DQN)
"""

__version__ = "0.1.0"


def _register() -> None:
    from gymnasium.envs.registration import register, registry

    for name, cls in (("Migration", "MigrationEnv"), ("Checkpoint", "CheckpointEnv")):
        for suffix, kwargs in (("", {}), ("Discrete", {"flatten_actions": True})):
            env_id = f"ringenv/{name}{suffix}-v0"
            if env_id not in registry:
                register(id=env_id, entry_point=f"ringenv.env:{cls}", kwargs=kwargs)


_register()
