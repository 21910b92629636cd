"""The data engine (report §2): Parquet-partitioned, resumable stages that filter, caption and transform
manifests. The stage contract lives in :mod:`rededit.datagen.engine.stage`; the runner in
:mod:`rededit.datagen.engine.runner`."""
