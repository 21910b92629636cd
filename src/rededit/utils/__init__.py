"""Utilities every layer may use: atomic files, hashing and strict JSON (:mod:`.io`), seeding from explicit parts
(:mod:`.seeding`), logging, the hub's offline switches, weights-only loading (:mod:`.safe_load`), the
``_target_`` allow-list for configs read from folders (:mod:`.trusted_config`), run-folder locks, run ids and
checkpoint resolution, the repository's paths.

May import: nothing from rededit above ``utils``.
"""
