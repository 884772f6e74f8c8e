"""What every regime trains: the module learner, the batch schedule and the stage loop."""
