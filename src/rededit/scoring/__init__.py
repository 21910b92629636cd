"""Scoring tools shared by evaluation, rewards and the data engine.

OCR backends (:mod:`.ocr`) and the OCR metric (:mod:`.ocr_metric`), pixel edit metrics (:mod:`.edit_metrics`),
benchmark categories (:mod:`.categories`) and the judges (:mod:`.judges`: programmatic checks of the synthetic
bench, VLM judges and their prompts/parsing). They take images and text and return numbers; they know nothing
of editors, stages or benchmarks' folders.

May import: ``rededit.data`` (image loading), ``rededit.models``, ``rededit.utils``.
"""
