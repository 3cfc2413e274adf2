"""Public knowledge the attacker may use: road geometry, reward functions, state feasibility, dynamics.

Priors know nothing of federation, attacks or metrics.
"""
