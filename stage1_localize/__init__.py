"""Stage 1: find and name every vertebra (centre heatmap + level map, anatomical labelling).

Public API
----------
* :class:`stage1_localize.config.Stage1Config` (and ``NetworkPlan``, ``AugmentConfig``, ``LabellingConfig``)
* :func:`stage1_localize.train.train_stage1` ``(data_dir, out_dir, config=None, resume=False) -> Path``
* :class:`stage1_localize.infer.Localizer` ``(model_dir).localize(scan) -> list[Vertebra]``,
  :func:`stage1_localize.infer.localize`, :func:`stage1_localize.infer.write_centroids_csv`
* :func:`stage1_localize.labelling.assign_levels` (pure)
* :mod:`stage1_localize.targets` (pure target builders), :mod:`stage1_localize.plan` (nnU-Net-style planner)

Modules import torch / nnU-Net lazily where they can; import the submodules directly.
"""
