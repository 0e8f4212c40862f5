"""Linear multistep ODE samplers: DPM-Solver++(2M/3M), DEIS-tAB, iPNDM, LMS."""

SAMPLERS = {}
