"""Evaluation: benchmarks, the harness behind ``rededit-eval`` and the demo report.

Benchmark folders and manifests as items (:mod:`.benchmarks`: synthetic bench, REDEdit-Bench, ImgEdit,
GEdit), the harness (:mod:`.harness`: generate through the edit loop, score, aggregate over seeds), report
tables and chart (:mod:`.tables`), provenance (:mod:`.provenance`: weights hash, versions, generation
settings), the demo report (:mod:`.demo_report`) and the colour text-following check
(:mod:`.text_following`). Metrics and judges themselves are in :mod:`rededit.scoring`.

May import: ``rededit.datagen`` (the synthetic world's vocabulary), ``rededit.inference`` and the layers below.
"""
