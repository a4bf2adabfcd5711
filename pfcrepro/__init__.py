"""pfcrepro: the reproduction harness that re-measures the Partial FC paper's claims.

The notebooks under ``notebooks/``, the head benchmark (``benchmarks/head.py``) and the README's
results table are built on it; it is not needed to use the head (that is :mod:`pfclib`, which never
imports this package). One job per module:

* :mod:`pfcrepro.trials` -- designs of training runs and the in-process trial runner;
* :mod:`pfcrepro.features` -- the feature-level instrument: generated identity worlds, an MLP backbone
  trained through the library's head, in milliseconds per step;
* :mod:`pfcrepro.stats` -- seed statistics, controls and the verdicts of a claim;
* :mod:`pfcrepro.classes` -- per-class analysis of a trained head (update counters, center drift
  and movement);
* :mod:`pfcrepro.headbench` -- peak memory and step time of the head alone, each point in a fresh process;
* :mod:`pfcrepro.nbrun` -- execute a notebook with its ``params.yaml`` section (every DVC stage's command);
* :mod:`pfcrepro.report` -- what a notebook writes at its end: figures, ``metrics.json``, headline rows;
* :mod:`pfcrepro.plots` -- the shared figure of paired differences (forest plot);
* :mod:`pfcrepro.results_page` -- ``results/RESULTS.md`` and the README's results table (the last stage);
* :mod:`pfcrepro.gpu_profile` -- the reduced GPU profile: a few notebooks on one GPU in about ten minutes.
"""
