"""Reading, checking, converting and synthesizing spine MRI data (the ground every stage stands on).

Modules: :mod:`data_prep.scan` (types, geometry, VerSe ids), :mod:`data_prep.io` (readers/writers),
:mod:`data_prep.dataset` (canonical folder layout, ``check-data``), :mod:`data_prep.synth` (synthetic
spine cohort), :mod:`data_prep.lesions` (lesion simulator), :mod:`data_prep.weak_labels` (loose
annotations derived from full masks), :mod:`data_prep.nnunet_io` (export to nnU-Net v2 raw format).
"""
