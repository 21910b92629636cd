"""Rectified flow (report §3.3, §3.8): the interpolation path and velocity, training-timestep samplers and
curricula, loss weighting (incl. the edit-region weight) and the Euler ODE / SDE samplers.

May import: ``rededit.models``, ``rededit.utils``. No Lightning.
"""
