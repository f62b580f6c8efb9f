"""The paper's training stages: :mod:`~qzoom.train.labels` (the label logic, pure functions), :mod:`~qzoom.train.stage1`
(the SD-RPN, self-distilled), :mod:`~qzoom.train.stage2` (targeted post-SFT on zoom regressions),
:mod:`~qzoom.train.stage3` (the gate) and :mod:`~qzoom.train.common` (data format, run directory, optimisation loop).
The demo model's own recipe is in :mod:`qzoom.demo`."""
