"""The offline data engine: everything that *makes* training data, run before training.

The synthetic world (:mod:`.synth`), the engine's filters, captioning, long-tail fill and task transforms
(:mod:`.engine`), DPO preference pairs (:mod:`.preference`), semi-hard mining for NFT (:mod:`.mining`), the tar
shard writer (:mod:`.shard_writer`) and face landmarks (:mod:`.face_landmarks`). Its output is a manifest that
:mod:`rededit.data` (the training input path) reads.

May import: ``rededit.inference`` (pairs and mining run an editor), ``rededit.stages``, ``rededit.rewards``,
``rededit.scoring``, ``rededit.data`` and the core. Never imported by training code.
"""
