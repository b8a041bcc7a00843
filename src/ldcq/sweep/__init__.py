"""``ldcq sweep``: a grid of config values × seeds, each point one pipeline run, and a comparison.

``ldcq sweep pipelines/pointmaze-umaze.yaml --grid horizon=10,20,30 --seeds 3`` runs, for every
grid point and seed, the pipeline with LDCQ's evaluation (``evaluation.selector=q``) and then the
BC baseline's (``vae-prior``), which reuses the trained stages. The runs share every artifact
whose fingerprint the point does not change (a sweep over the prior's schedule trains one skill
VAE per seed). Every run evaluates with ``evaluation.diagnostics=true``.

- Before anything trains, every grid key and value is checked: it must exist, hold a value of the
  key's type, be one a user may set (not a dataset-derived dim, not a key that follows another
  by interpolation), and build every stage's model.
- One MLflow parent run per sweep (tag ``ldcq.sweep``), the pipeline runs nested under it; the
  comparison is logged on it as artifacts.
- ``results/sweeps/<name>.json`` holds every run (point, seed, method, metrics, config hash,
  fingerprints, git sha, wall times) and the comparison: per swept key, mean ± std over seeds of
  each score for LDCQ and BC, with the effect of the key set against the seed-to-seed spread;
  ``results/sweeps/<name>-<key>.png`` plots it.
- A rerun of the same command skips the runs already recorded (in that file or, from a cluster's
  tasks, in the sweep's work folder); finished stages of an interrupted run are skipped as always.
- Launchers: ``inline`` (default) runs the runs one after another in this process; ``slurm``
  submits them as one SLURM job array through submitit, each task one run on the shared
  checkpoints folder (artifacts are locked one by one, so tasks that need the same upstream
  artifact wait for one maker); ``submitit-local`` runs the same array as local processes
  (submitit's local executor), the way the tests exercise the cluster path.
"""

from ldcq.sweep.compare import print_summary
from ldcq.sweep.grid import check_grid, parse_grid
from ldcq.sweep.run import LAUNCHERS, Sweep, run_sweep

__all__ = ["LAUNCHERS", "Sweep", "check_grid", "parse_grid", "print_summary", "run_sweep"]
