"""A federation's releases: when a campaign ends, evaluate, choose, gate and publish its model."""
