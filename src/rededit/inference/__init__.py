"""Running a trained editor: loading it, sizing its inputs, and the one edit loop every caller uses.

:mod:`.editor` (``load_editor`` from an export, run folder or ``.ckpt``), :mod:`.sizing` (token-multiple
sizes, bucket assignment), :mod:`.images` (PIL ↔ tensors, atomic image files) and :mod:`.edit_loop`
(batched edits with per-item noise, object boxes passed through), :mod:`.pipeline_edit` (an editor from a
diffusers pipeline folder edits exactly as ``QwenImageEditPlusPipeline``). The ``rededit-edit`` command is
:mod:`rededit.cli.edit`.

May import: ``rededit.stages`` (the editor is a stage), ``rededit.data``, the core.
"""
