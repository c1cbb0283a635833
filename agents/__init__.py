"""Policies and programs for the ringenv environments, written against the public API only
(``gymnasium.make`` and the documented configs), as an outside user would.

- :mod:`agents.heuristics`: scripted collectors as policies (QEMU's default, a fixed grid member,
  a fill watermark, a dirty-rate-proportional interval, the bitmap baseline, random)
- :mod:`agents.train`: stable-baselines3 training (PPO, A2C, DQN), one readable program
- :mod:`agents.evaluate`: run policies on the test workloads with several seeds, aggregate
- :mod:`agents.compare`: the comparison table (Markdown, CSV) and the plots
- :mod:`agents.plots`: Pareto view and episode timeline (matplotlib, imported lazily)
- :mod:`agents.cli`: the ``ringenv run | train | evaluate | compare`` subcommands
"""
