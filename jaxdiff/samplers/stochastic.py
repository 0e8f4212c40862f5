"""Stochastic samplers: DDPM ancestral, Euler ancestral, DPM-Solver++(2M) SDE, Euler-Maruyama, predictor-corrector."""

SAMPLERS = {}
