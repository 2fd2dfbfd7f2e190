"""Stage 2: per-vertebra classification (normal / inflammation / fat) whose verdict provably comes from
that vertebra.

* :mod:`stage2_classify.config`: :class:`~stage2_classify.config.Stage2Config` (saved with the model).
* :mod:`stage2_classify.patches`: fixed physical patches (world LPS axes) around a centroid, any input
  geometry; per-patch targets from full or weak annotations.
* :mod:`stage2_classify.model`: multitask 3D CNN; the ``cls`` path sees only ``image * region``.
* :mod:`stage2_classify.losses`: uncertainty weighting, soft labels, weak-label segmentation losses.
* :mod:`stage2_classify.evidence`: Integrated Gradients, evidence mass inside the body, pointing game.
* :mod:`stage2_classify.train`: ``train_stage2`` (DDP under torchrun, resumable).
* :mod:`stage2_classify.infer`: :class:`~stage2_classify.infer.Classifier`.
"""
