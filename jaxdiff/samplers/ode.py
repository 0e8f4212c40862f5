"""Adaptive high-accuracy probability-flow ODE solver (diffrax)."""

SAMPLERS = {}
