"""A Flower app a fleet operator could have written: federated DQN on highway-env's merge."""
