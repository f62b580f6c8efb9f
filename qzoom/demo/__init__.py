"""The demo model ``qzoom-tiny``'s recipe: how the shipped checkpoint was made. Not part of the method; skip it to
read the paper (the stages are in :mod:`qzoom.train`).

* :mod:`qzoom.demo.model`: the tiny Qwen2.5-VL (stock architecture, a few million parameters) and its recipe fields.
* :mod:`qzoom.demo.examples`: the curriculum's training sequences, reading targets and drills.
* :mod:`qzoom.demo.base`: the curriculum that trains the backbone from scratch on the synthetic benchmark.
* :mod:`qzoom.demo.pipeline`: ``qzoom train demo``, the base model then the paper's Stages 1-3, seeded and resumable.
* :mod:`qzoom.demo.boxes`: ``qzoom train boxes``, the box settings (τ_roi, boxes per step) picked by the answers
  they lead to; not in the paper, measured per checkpoint.
"""
