"""The LDCQ policy in the simulator: planner, vectorized rollouts, scores, pictures."""
