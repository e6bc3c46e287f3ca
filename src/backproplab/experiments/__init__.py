"""The reproductions: their registry (:mod:`.registry`), configs (:mod:`.config`) and runner (:mod:`.runner`).

An experiment is

* a config dataclass (subclass of :class:`ExperimentConfig`) that holds every hyper-parameter, so
  ``--set key=value`` reaches all of them, with ``smoke`` and ``quick`` overrides (``full`` = defaults);
* ``arms(cfg)``: typed arm records (:class:`Arm` subclasses; ``arm.name`` is the results folder);
* ``run_arm(run) -> dict``: trains one arm with one seed and returns its final metrics. The runner
  (:func:`run`) has already seeded every generator with the seed, resolved the device and data folder,
  and written ``config.json``; it writes ``final.json`` from the returned metrics, once;
* ``claims(cfg)``: the paper's claims (:class:`backproplab.evidence.Claim`) over those arms, judged
  by the runner from the finished runs with paired seeds;
* ``analyze(results) -> list[str]``: figures and descriptive notes from a :class:`Results`.

Layout::

    <out>/<experiment>/<arm>/seed<k>/{config.json, metrics.jsonl, final.json, model.pt}
    <out>/<experiment>/{summary.json, *.png}

A run's identity is its config without the fields that do not change results (:data:`NOT_IDENTITY`).
A finished run of the same identity is skipped, an interrupted one resumes; a folder written by another
identity stops the run with the differences named, unless ``overwrite`` is given (``resume=False`` starts
this config's own runs over, never another's).
"""


from ..fields import option
from .config import (DEVICE, FLOAT32_MAX, NOT_IDENTITY, ConfigKey, build_config, check_choices, check_n_train,
                     check_private_validation, check_values, config_keys, config_values, describe_fields,
                     describe_paper_scale, identity, identity_of, make_config, paper_scale_names,
                     private_selection_note, run_setting)
from .registry import (BUILTIN, MAX_SEEDS, REGISTRY, SCALES, Arm, ConfigError, Experiment, ExperimentConfig,
                       RUN_OWNED, all_claims, all_experiments, get, register, training_phase)
from .runner import (Job, Results, Run, check_data_present, final_values, finish, judge_claims, plan, preflight, run,
                     run_job, tuned, validation_split)

__all__ = ["BUILTIN", "DEVICE", "FLOAT32_MAX", "MAX_SEEDS", "NOT_IDENTITY", "REGISTRY", "RUN_OWNED", "SCALES", "Arm",
           "ConfigError", "ConfigKey", "build_config", "config_keys", "config_values",
           "Experiment", "ExperimentConfig", "Job", "Results", "Run", "all_claims", "all_experiments",
           "check_choices", "check_data_present", "check_n_train", "check_private_validation", "check_values",
           "describe_fields", "describe_paper_scale", "final_values", "finish", "get", "identity", "identity_of",
           "judge_claims", "make_config", "option", "paper_scale_names", "plan", "preflight", "private_selection_note",
           "register", "run", "run_job", "run_setting", "training_phase", "tuned", "validation_split"]
