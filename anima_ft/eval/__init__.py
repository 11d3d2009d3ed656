"""Knowledge diagnostics: where Anima's knowledge lives and how fast fine-tuning destroys it.

* :mod:`probe` / :mod:`probe_cli`: fixed-sigma forgetting probe (``ProbeRunner``, ``anima-ft probe``)
* :mod:`drift` / :mod:`drift_tracker`: weight drift between files (``anima-ft drift``) and during training
* :mod:`swap`: DiT / adapter composition and loss attribution (``anima-ft swap``)
* :mod:`sample_grid`: fixed prompts x seeds sample grids (``SampleGridRunner``)
* :mod:`budget`: forgetting budget on the replay-set probe (``ForgettingBudget``)

Trainer hooks (plain objects; call on every rank): ``ProbeRunner.run(model, step)``, ``DriftTracker.measure()``,
``SampleGridRunner.run(model, step)``, ``ForgettingBudget.update(probe_metrics, step)``.
"""

from anima_ft.eval.budget import BudgetDecision, ForgettingBudget
from anima_ft.eval.drift_tracker import DriftTracker
from anima_ft.eval.eval_sets import EvalSample, encode_image_folder, load_shard_eval_set
from anima_ft.eval.probe import DEFAULT_NUM_NOISES, DEFAULT_SIGMAS, ProbeRunner, evaluate_sets
from anima_ft.eval.sample_grid import SampleGridRunner

__all__ = [
    "DEFAULT_NUM_NOISES",
    "DEFAULT_SIGMAS",
    "BudgetDecision",
    "DriftTracker",
    "EvalSample",
    "ForgettingBudget",
    "ProbeRunner",
    "SampleGridRunner",
    "encode_image_folder",
    "evaluate_sets",
    "load_shard_eval_set",
]
