"""Where the environment's time goes under PPO: its compiled kernels against the rest.

PPO (as in :mod:`benchmarks.env_speed`) on ``ringenv/Migration-v0`` with cProfile switched on
only inside the env's step and reset. The profile's own time for the numba kernels of ringenv
and numpy's array passes (sorts, scans, fills, copies) is what a fully compiled environment
would still spend: the floor under the compiled work of the event-exact model. The rest of the
env's time (its Python, slowed here by the profiler) is what compiling everything else could
save at most. Compare with the budget the PPO bar leaves (the env_speed row).
"""

from __future__ import annotations

import cProfile
import importlib
import pstats

import gymnasium as gym
import numba

import ringenv  # noqa: F401

from .env_speed import NullEnv, ppo_run, random_policy

TIMESTEPS = 4096
#: numpy's array passes (cProfile's names for C functions)
NUMPY_PASSES = ("<method 'sort' of 'numpy.ndarray' objects>", "<method 'nonzero' of 'numpy.ndarray' objects>",
                "<method 'fill' of 'numpy.ndarray' objects>", "<method 'copy' of 'numpy.ndarray' objects>",
                "<method 'reduce' of 'numpy.ufunc' objects>", "<built-in method numpy.arange>",
                "<built-in method numpy._core._multiarray_umath.count_nonzero>")


class Profiled(gym.Wrapper):
    """cProfile on inside the wrapped env's step and reset only."""

    def __init__(self, env: gym.Env, profile: cProfile.Profile):
        super().__init__(env)
        self.profile = profile

    def step(self, action):
        self.profile.enable()
        try:
            return self.env.step(action)
        finally:
            self.profile.disable()

    def reset(self, **kwargs):
        self.profile.enable()
        try:
            return self.env.reset(**kwargs)
        finally:
            self.profile.disable()


def kernel_modules() -> list[str]:
    """The modules whose numba kernels count as compiled work: every ringenv module that
    defines one (:func:`ringenv.jit.kernel_sources`, so a new kernel anywhere is counted)."""
    from ringenv.jit import PACKAGE, kernel_sources

    return [".".join(("ringenv",) + p.relative_to(PACKAGE).with_suffix("").parts) for p in kernel_sources()]


def kernel_keys() -> set[tuple[str, int, str]]:
    """cProfile's keys (file, first line, name) of the numba kernels of :func:`kernel_modules`."""
    keys = set()
    for name in kernel_modules():
        mod = importlib.import_module(name)
        for attr, obj in vars(mod).items():
            if isinstance(obj, numba.core.registry.CPUDispatcher):
                code = obj.py_func.__code__
                keys.add((code.co_filename, code.co_firstlineno, code.co_name))
    return keys


def floor(timesteps: int | None = None) -> dict:
    """us per PPO step: in the numba kernels, in numpy's array passes, and in the env in all
    (profiled), with the kernels' names by time."""
    timesteps = timesteps or TIMESTEPS
    profile = cProfile.Profile()
    ppo_run(Profiled(gym.make("ringenv/Migration-v0"), profile), timesteps)
    stats = pstats.Stats(profile).stats
    keys = kernel_keys()
    kernels, passes, total, by_name = 0.0, 0.0, 0.0, {}
    for (file, line, name), (_, _, tottime, _, _) in stats.items():
        total += tottime
        if (file, line, name) in keys:
            kernels += tottime
            by_name[name] = by_name.get(name, 0.0) + tottime
        elif file == "~" and name in NUMPY_PASSES:
            passes += tottime
    per = 1e6 / timesteps
    return {"kernels_us": kernels * per, "numpy_us": passes * per, "env_profiled_us": total * per,
            "top": sorted(((t * per, n) for n, t in by_name.items()), reverse=True)[:5]}


def main() -> list[tuple[str, str, str]]:
    import torch

    torch.set_num_threads(1)
    env = gym.make("ringenv/Migration-v0")
    random_policy(env, episodes=1)  # warm-up
    ppo_run(NullEnv(env), 1024)
    f = floor()
    top = ", ".join(f"{n} {us:.0f}" for us, n in f["top"][:3])
    return [
        ("env under PPO, us per step (cProfile inside the env): numba kernels / numpy array passes / "
         "all the env's time (profiled)",
         f"{f['kernels_us']:.0f} / {f['numpy_us']:.0f} / {f['env_profiled_us']:.0f} ({top})",
         "(the compiled floor: compare with the budget above)"),
    ]


if __name__ == "__main__":
    for row in main():
        print(" | ".join(row))
