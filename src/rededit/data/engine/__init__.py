"""The data engine (report §2): Parquet-partitioned, resumable stages that filter, caption and transform
manifests. The stage contract lives in :mod:`rededit.data.engine.stage`; the runner in
:mod:`rededit.data.engine.runner`."""
